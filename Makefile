# condiff: `make demo` sets up and runs the main job; `make test` sets up and runs every check.
# Override the torch requirement for a GPU build, e.g.  make test TORCH_SPEC="torch==2.13.0 --index-url <your index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.condiff-installed

.PHONY: setup demo test sync nbtest pytest clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default (phantom datasets, tiny preset, CPU).
demo: $(STAMP)
	$(BIN)/condiff reproduce --preset cpu --device cpu

# Every check, in order: notebooks and library in sync and clean, notebooks run as tests, pytest.
test: $(STAMP) sync nbtest pytest

sync: $(STAMP)
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	git diff --exit-code -- nbs condiff || (echo "notebooks and library out of sync or unclean: run nbdev-export && nbdev-clean and commit" && exit 1)

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers 2

pytest: $(STAMP)
	$(BIN)/python -m pytest -q tests
