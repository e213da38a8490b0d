"""The papermill experiment notebooks (nbs/train, evaluate, table1, figure3) run with smoke parameters and write their
files; a wrong parameter stops in the validation cell right after the parameters with a message naming it;
`papermill --help-notebook` documents every parameter; nbdev-test does not execute them."""
import json, os, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

papermill = pytest.importorskip('papermill')
NBS = Path(__file__).resolve().parents[1] / 'nbs'
NOTEBOOKS = ('train', 'evaluate', 'table1', 'figure3')


def run_nb(name, workdir, **params):
    "Execute nbs/<name>.ipynb with `params` (kernel with one torch thread: smoke runs are tiny, CI machines shared)."
    out = Path(workdir) / f"{name}-out.ipynb"
    old = os.environ.get('OMP_NUM_THREADS')
    os.environ['OMP_NUM_THREADS'] = '1'
    try:
        papermill.execute_notebook(str(NBS / f"{name}.ipynb"), str(out), parameters=params, kernel_name='python3',
                                   progress_bar=False, cwd=str(workdir))
    finally:
        if old is None: os.environ.pop('OMP_NUM_THREADS', None)
        else: os.environ['OMP_NUM_THREADS'] = old
    return json.loads(out.read_text())


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def outputs_text(nb):
    return '\n'.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', ''))
                     for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []))


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    "Train two folds (one through train.ipynb), evaluate both on a small phantom test subset, ensemble them."
    from condiff.pipeline import fold_config, train_fold, evaluate
    d = tmp_path_factory.mktemp('pm')
    runs = d / 'runs'
    nb = run_nb('train', d, dataset='phantom-brain', sequence='t2', fold=0, preset='tiny', max_steps=3, batch_size=2, n_subjects=2,
                num_examples=2, num_steps=2, out_dir=str(runs))
    data = sorted((runs / '_data').glob('*.npz'))
    cfg = fold_config('phantom-brain', 't2', 1, max_steps=3, batch_size=2, val_batch_size=2,
                      train_data=str([p for p in data if p.name.endswith('-train.npz')][0]),
                      val_data=str([p for p in data if p.name.endswith('-val.npz')][0]), preset='tiny')
    train_fold(cfg, runs, progress=False)
    ev0 = run_nb('evaluate', d, testset='phantom-brats-t2', fold=0, preset='tiny', test_images=6, num_steps=2, runs=str(runs), num_examples=2)
    evaluate('phantom-brats-t2', 1, runs=runs, num_steps=2, test_images=6, progress=False, preset='tiny')
    ens = run_nb('evaluate', d, testset='phantom-brats-t2', fold='ensemble', preset='tiny', folds='0,1', runs=str(runs), test_images=6, num_examples=2)
    return dict(dir=d, runs=runs, train=nb, ev0=ev0, ens=ens)


def test_train_notebook_writes_a_run(smoke):
    run = smoke['runs'] / 'phantom-brain-t2' / 'tiny' / 'fold0'
    for f in ('config.json', 'log.jsonl', 'loss.png', 'run.json', 'restorations.png', 'checkpoints/latest/model.safetensors'):
        assert (run / f).exists(), f
    st = json.loads((run / 'run.json').read_text())
    assert st['status'] == 'finished' and st['step'] == 3
    cfg = json.loads((run / 'config.json').read_text())
    assert (cfg['fold'], cfg['preset'], cfg['max_steps'], cfg['batch_size']) == (0, 'tiny', 3, 2)
    assert 'parameters OK' in outputs_text(smoke['train'])
    png = [o for c in smoke['train']['cells'] for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert len(png) >= 2  # the loss curve and the restorations are shown


def test_evaluate_notebook_fold_and_ensemble(smoke):
    from condiff.experiment import eval_dir, ensemble_dir
    m0 = json.loads((eval_dir(smoke['runs'], 'phantom-brats-t2', 'tiny', 0) / 'metrics.json').read_text())
    assert m0['n_images'] == 6 and m0['num_steps'] == 2 and 0 <= m0['AP_p'] <= 1
    assert (eval_dir(smoke['runs'], 'phantom-brats-t2', 'tiny', 0) / 'maps.safetensors').exists()
    e = json.loads((ensemble_dir(smoke['runs'], 'phantom-brats-t2', 'tiny') / 'metrics.json').read_text())
    assert e['n_folds'] == 2 and e['n_images'] == 6
    assert f'"AP_p": {json.dumps(e["AP_p"])}' in outputs_text(smoke['ens'])


def test_table1_and_figure3_notebooks(smoke):
    from condiff.experiment import ensemble_dir
    from condiff.report import read_table1_csv
    out = smoke['dir'] / 'pf'
    run_nb('table1', smoke['dir'], testsets='phantom-brats-t2', preset='tiny', folds='0,1', runs=str(smoke['runs']), out=str(out), test_images=6)
    assert sorted(p.name for p in out.iterdir()) == ['table1.csv', 'table1.md', 'table1.tex', 'table1_restoration.csv']  # phantoms: the restoration block
    t = read_table1_csv(out / 'table1.csv')
    e = json.loads((ensemble_dir(smoke['runs'], 'phantom-brats-t2', 'tiny') / 'metrics.json').read_text())
    assert t.row('Ours_ens').values[('BraTS-T2', 'AP_i')] == pytest.approx(e['AP_i'], abs=0.006)
    assert len(t.quoted) == 18 and t.row('Ours_ens').values[('DDR', 'AP_i')] is None
    run_nb('figure3', smoke['dir'], testsets='phantom-brats-t2', preset='tiny', folds='0,1', runs=str(smoke['runs']), out=str(out), test_images=6)
    from PIL import Image
    assert Image.open(out / 'figure3.png').size[0] > 300 and (out / 'figure3.pdf').read_bytes()[:5] == b'%PDF-'


def test_train_notebook_progress_is_a_few_lines(tmp_path, monkeypatch):
    """`papermill nbs/train.ipynb out.ipynb -p fold 0` with 60 training steps: the saved notebook shows the training
    progress as a few lines (a line per quarter, condiff.progress.LogBar), not one per step, and no library warning
    (tqdm.auto's "IProgress not found" before issue 14)."""
    monkeypatch.delenv('CONDIFF_PROGRESS', raising=False)  # the default choice, as a user gets it
    nb = run_nb('train', tmp_path, fold=0, preset='tiny', max_steps=60, batch_size=2, n_subjects=2, num_examples=1,
                num_steps=2, out_dir=str(tmp_path / 'runs'))
    streams = [''.join(o['text']) for c in nb['cells'] for o in c.get('outputs', []) if o['output_type'] == 'stream']
    text = '\n'.join(streams)
    bars = [l for l in text.replace('\r', '\n').splitlines() if re.search(r'\d+/\d+ \[', l)]
    assert 1 <= len(bars) <= 5, bars
    assert '60/60' in bars[-1] and '100%' in bars[-1], bars
    assert '\r' not in text
    for bad in ('IProgress', 'Warning', 'warn('):
        assert bad not in text, (bad, text[:2000])


@pytest.mark.parametrize('name,params,msg', [
    ('train', dict(dataset='imagenet'), "unknown dataset 'imagenet'"),
    ('train', dict(fold=10), 'fold: got 10; allowed: an int in 0..9'),
    ('train', dict(max_steps=-5), 'max_steps: got -5; allowed: an int >= 1 or None (the default)'),
    ('train', dict(max_steps=0), 'max_steps: got 0'),  # None means the default, 0 is refused
    ('evaluate', dict(testset='phantom-brats'), "unknown test set 'phantom-brats'"),
    ('evaluate', dict(fold=10), "fold must be an int in 0..9 or 'ensemble', got 10"),
    ('table1', dict(folds='0-12'), 'folds must be in 0..9'),
    ('figure3', dict(testsets='phantom-brats-t2,mnist'), "unknown test set(s) ['mnist']"),
])
def test_wrong_parameter_stops_in_the_validation_cell(tmp_path, name, params, msg):
    with pytest.raises(papermill.PapermillExecutionError) as ei:
        run_nb(name, tmp_path, **params)
    assert ei.value.ename in ('ValueError', 'BadInput') and msg in ei.value.evalue, ei.value.evalue  # BadInput is a ValueError
    nb = json.loads((tmp_path / f"{name}-out.ipynb").read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    tags = [c['metadata'].get('tags', []) for c in code]
    assert 'parameters' in tags[0] and 'injected-parameters' in tags[1]
    failed = [i for i, c in enumerate(code) if any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    assert failed == [2]  # the cell right after the parameters (and papermill's injected ones)
    assert all(c.get('execution_count') is None for c in code[3:])  # nothing after it ran


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_help_notebook_documents_every_parameter(name):
    exe = Path(sys.executable).with_name('papermill')
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'papermill']
    out = subprocess.run(cmd + ['--help-notebook', str(NBS / f"{name}.ipynb")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    params = papermill.inspect_notebook(str(NBS / f"{name}.ipynb"))
    assert len(params) >= 5
    for p, info in params.items():
        assert f"  {p}: " in out.stdout
        assert info['help'] and info['inferred_type_name'] != 'None', (p, info)  # a comment and a type for each
    if name == 'train':
        for p in ('dataset', 'sequence', 'fold', 'preset', 'max_steps', 'device', 'seed', 'out_dir'): assert p in params


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_nbdev_test_skips_the_experiment_notebooks(name):
    from nbdev.test import test_nb
    assert test_nb(NBS / f"{name}.ipynb") == (True, 0)  # skip_exec front matter: not executed
