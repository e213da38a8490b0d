"""tools/nbdocs.py, the check behind `make test`'s nbtest: what counts as "the committed outputs are current"
(DEVELOPING.md, Outputs), and the notebook a reader sees on the site."""
import base64, copy, importlib.util, io, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('nbdocs', ROOT / 'tools' / 'nbdocs.py')
nbdocs = importlib.util.module_from_spec(spec); spec.loader.exec_module(nbdocs)


def png(arr):
    from PIL import Image
    b = io.BytesIO(); Image.fromarray(arr.astype(np.uint8)).save(b, format='PNG')
    return base64.b64encode(b.getvalue()).decode()


def nb(text='0.25\n', fig=None, src='x = 1\nx'):
    outs = [{'output_type': 'stream', 'name': 'stdout', 'text': [text]}]
    if fig is not None: outs.append({'output_type': 'display_data', 'metadata': {}, 'data': {'image/png': fig, 'text/plain': ['<Figure>']}})
    return {'cells': [{'cell_type': 'markdown', 'source': '# T', 'metadata': {}},
                      {'cell_type': 'code', 'source': src, 'metadata': {}, 'outputs': outs, 'execution_count': None}]}


IMG = np.random.default_rng(0).integers(0, 255, (40, 60, 3))


def test_same_outputs_pass():
    a = nb(fig=png(IMG))
    assert nbdocs.compare_outputs(a, copy.deepcopy(a), [1], 'x.ipynb') == []


def test_a_changed_number_fails_naming_the_cell():
    p = nbdocs.compare_outputs(nb('0.25\n'), nb('0.26\n'), [1], 'x.ipynb')
    assert len(p) == 1 and 'x.ipynb cell 1' in p[0] and "'0.25\\n'" in p[0] and "'0.26\\n'" in p[0]


def test_a_missing_or_new_figure_fails():
    assert 'outputs committed' in nbdocs.compare_outputs(nb(fig=png(IMG)), nb(), [1], 'x.ipynb')[0]
    assert nbdocs.compare_outputs(nb(), nb(fig=png(IMG)), [1], 'x.ipynb')


def test_figures_compare_by_pixels():
    a = IMG.copy(); b = IMG.copy(); b[0, 0] = (b[0, 0] + 100) % 256  # one pixel of 2400: tolerated (0.04 %)
    assert nbdocs.compare_outputs(nb(fig=png(a)), nb(fig=png(b)), [1], 'x.ipynb') == []
    c = IMG.copy(); c[:10] = 255 - c[:10]                           # a quarter of the figure changed
    p = nbdocs.compare_outputs(nb(fig=png(a)), nb(fig=png(c)), [1], 'x.ipynb')
    assert len(p) == 1 and 'figure differs' in p[0]
    p = nbdocs.compare_outputs(nb(fig=png(a)), nb(fig=png(a[:, :50])), [1], 'x.ipynb')  # another size
    assert 'figure differs in 100.0%' in p[0]


def test_cells_that_did_not_run_are_not_compared():
    assert nbdocs.compare_outputs(nb('a\n'), nb('b\n'), [], 'x.ipynb') == []  # e.g. a #| slow cell


def test_the_page_a_reader_sees():
    n = nb()
    n['cells'] += [{'cell_type': 'code', 'source': '#| hide\nimport secrets', 'metadata': {}, 'outputs': []},
                   {'cell_type': 'code', 'source': '#| export\ndef f(): pass', 'metadata': {}, 'outputs': []},
                   {'cell_type': 'code', 'source': '#| default_exp x', 'metadata': {}, 'outputs': []}]
    out = nbdocs._strip_directives(n)
    assert [c['source'] for c in out['cells']] == ['# T', 'x = 1\nx', 'def f(): pass']


def test_every_chapter_is_found_in_file_name_order():
    files = nbdocs.chapters()
    assert files == sorted(files) and len(files) >= 10 and all(f.suffix == '.ipynb' for f in files)
    with pytest.raises(SystemExit, match='not a notebook'): nbdocs.chapters(['README.md'])
