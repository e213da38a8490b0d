# condiff: `make demo` sets up and runs the main job; `make test` sets up and runs every check.
# Override the torch requirement for a GPU build, e.g.  make test TORCH_SPEC="torch==2.13.0 --index-url <your index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The install stamp is named by pyproject.toml's content, not its time: nbdev-export rewrites the file (same bytes)
# on every run, and a time-based stamp reinstalled the package at every make call after `make sync`.
STAMP := $(VENV)/.condiff-installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: setup demo test sync nbtest pytest clean-runs docs docs-site chromium

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.condiff-installed*
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

# The notebooks run as tests, as nbdev-test runs them (same cells, same executor), and their committed outputs must be
# the ones re-execution gives (texts exactly, figures present and alike): tools/nbdocs.py, DEVELOPING.md "Outputs".
nbtest: $(STAMP)
	$(BIN)/python tools/nbdocs.py check --jobs 2

# The chapters with their outputs: execute every notebook in order and save the outputs into nbs/ (commit them),
# then the docs site from them in _docs/site/ (not committed; open _docs/site/index.html, no server needed).
docs: $(STAMP)
	$(BIN)/python tools/nbdocs.py execute --jobs 2
	$(BIN)/nbdev-clean
	$(BIN)/python tools/nbdocs.py site

# Only the site, from the committed notebooks.
docs-site: $(STAMP)
	$(BIN)/python tools/nbdocs.py site

# Headless Chromium for tests/test_docs_site.py (Debian's package; the test is skipped without it).
chromium:
	command -v chromium || (apt-get update && apt-get install -y chromium)

pytest: $(STAMP)
	$(BIN)/python -m pytest -q tests
