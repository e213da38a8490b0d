"""The bad-input table of issue 12: every case a new user tried that went wrong, across the CLI, the papermill notebooks
and the Python API. Each case asserts the exit status (or the exception), that the message names the option or the
file, and that no output file is left or changed. Then one fault test per recovery path: a bit-flipped or truncated
checkpoint (resume falls back, evaluate refuses), a truncated maps file (recomputed, reported), a killed reproduce
followed by a second one (refused or waits; no interleaved log; no orphan process, checked by pid), and the measured
batch-size bound of the evaluation maps. Models are trained for two steps: the plumbing is under test."""
import errno, json, math, os, shutil, signal, subprocess, sys, time, warnings
from pathlib import Path
import numpy as np
import pytest
import nibabel as nib
from PIL import Image
import torch
from condiff import cli, experiment
from condiff.cli import main
from condiff.pipeline import fold_config, train_fold, evaluate, ensemble_folds, ReproduceConfig, collect_results, figure3_panels, check_same_family, train_config
from condiff.detect import volume_to_slices, detect, load_ensemble
from condiff.experiment import eval_dir, fold_dir
from condiff.checks import BadInput, lock_holder, _pid_alive
from condiff.data import SliceSet, save_sliceset
from condiff.train import load_model, CorruptCheckpoint, read_log

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py
TS = 'phantom-brats-t1'
SMALL = dict(max_steps=2, batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
NO_GPU = not torch.cuda.is_available()


from conftest import ellipsoid  # a noisy ellipsoid "scan" for the detect tests


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Two T1 folds (evaluated on a 6-image phantom-brats-t1 subset and ensembled), a T2 fold, a fundus fold; a T2
    family holding a copied T1 fold; a folder mixing a T1 and a T2 fold; inputs for detect."""
    root = tmp_path_factory.mktemp('bad')
    sl, _ = volume_to_slices(ellipsoid())
    keep = sl.reshape(len(sl), -1).max(1) > 0
    save_sliceset(SliceSet(sl[keep], [f"s/z{i}" for i in range(int(keep.sum()))], 'MRI'), root / 'mri.npz')
    rng = np.random.default_rng(1)
    save_sliceset(SliceSet(rng.random((4, 3, 128, 128), dtype=np.float32), [f"f/{i}" for i in range(4)], 'RF'), root / 'rf.npz')
    runs = root / 'runs'
    mri = dict(train_data=str(root / 'mri.npz'), val_data=str(root / 'mri.npz'))
    for f in (0, 1): train_fold(fold_config('phantom-brain', 't1', f, **mri, **SMALL, preset='tiny'), runs, progress=False)
    train_fold(fold_config('phantom-brain', 't2', 0, **mri, **SMALL, preset='tiny'), runs, progress=False)
    train_fold(fold_config('phantom-fundus', None, 0, train_data=str(root / 'rf.npz'), val_data=str(root / 'rf.npz'), **SMALL, preset='tiny'),
               runs, progress=False)
    for f in (0, 1): evaluate(TS, f, runs=runs, num_steps=2, test_images=6, progress=False, preset='tiny')
    ensemble_folds(TS, '0,1', runs=runs, progress=False, preset='tiny')
    t1 = runs / 'phantom-brain-t1' / 'tiny'
    shutil.copytree(t1 / 'fold0', root / 't2copy' / 'phantom-brain-t2' / 'tiny' / 'fold0')  # a T1 fold in a T2 family
    shutil.copytree(t1 / 'fold0', root / 'mixed' / 'fold0')
    shutil.copytree(runs / 'phantom-brain-t2' / 'tiny' / 'fold0', root / 'mixed' / 'fold1')  # T1 and T2 mixed
    (root / 'in').mkdir()
    nib.save(nib.Nifti1Image(ellipsoid((30, 30, 3)), AFFINE), root / 'in' / 'v.nii.gz')
    (root / 'in' / 'dir.nii.gz').mkdir()
    (root / 'afile').write_text('not a folder')
    return dict(root=root, runs=runs, t1=t1, afile=root / 'afile', nii=root / 'in' / 'v.nii.gz')


def snapshot(*dirs) -> dict:
    "Every file under `dirs` with its size and mtime (lock files are advisory state, not output)."
    out = {}
    for d in dirs:
        for p in Path(d).rglob('*'):
            if p.name == '.lock' or p.is_dir(): continue
            st = p.lstat(); out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


from conftest import tiny_preset


def run_cli(argv, capsys):
    try: code = main(tiny_preset(argv))
    except SystemExit as e: code = e.code
    r = capsys.readouterr()
    run_cli.out = r.out  # what the command printed (JSON), for the cases that read it
    return code, r.err


# -- the CLI table --------------------------------------------------------------------------------------------------
# (id, argv given the env E, exit status, substrings the message must hold); R = the run root, O = an output folder
R = lambda E: ['--runs', E['runs']]
EV = lambda E, *a: ['evaluate', TS, '--fold', 0, '--test-images', 6, '--num-steps', 2, *R(E), *a]
TR = lambda E, *a: ['train', TS, '--fold', 0, '--runs', E['root'] / 'newruns', *a]
RP = lambda E, *a: ['reproduce', '--testsets', TS, '--folds', '0,1', '--max-steps', 2, '--test-images', 6, '--num-steps', 2,
                    '--runs', E['root'] / 'newruns', '--out', E['root'] / 'newout', *a]
DT = lambda E, *a: ['detect', E['nii'], '--run', E['t1'], '--out', E['root'] / 'newout', '--num-steps', 2, *a]
CLI_CASES = [
    # evaluate: None means the default, 0 is refused (was: silently the defaults)
    ('evaluate-batch-size-0', lambda E: EV(E, '--batch-size', 0), 2, ['--batch-size', 'got 0']),
    ('evaluate-batch-size-negative', lambda E: EV(E, '--batch-size', -3), 2, ['--batch-size', '-3']),
    ('evaluate-num-steps-0', lambda E: ['evaluate', TS, '--fold', 0, '--test-images', 6, '--num-steps', 0, *R(E)], 2, ['--num-steps', 'got 0']),
    ('evaluate-seed-negative', lambda E: EV(E, '--seed', -1), 2, ['--seed', '-1']),
    ('evaluate-fold-10', lambda E: ['evaluate', TS, '--fold', 10, *R(E)], 2, ['--fold', '10', '0..9']),
    ('evaluate-device-foo', lambda E: EV(E, '--device', 'foo'), 2, ['--device', "'foo'", 'cuda:N']),
    ('evaluate-device-cuda-x', lambda E: EV(E, '--device', 'cuda:x'), 2, ['--device', 'cuda:x']),
    ('evaluate-runs-is-a-file', lambda E: ['evaluate', TS, '--fold', 0, '--runs', E['afile']], 2, ['--runs', 'afile', 'is a file']),
    ('evaluate-test-images-1', lambda E: EV(E, '--test-images', 1), 2, ['--test-images', 'got 1']),
    ('evaluate-unknown-testset', lambda E: ['evaluate', 'phantom-brats', '--fold', 0, *R(E)], 2, ["'phantom-brats'", 'known']),
    ('evaluate-unknown-preset', lambda E: EV(E, '--preset', 'huge'), 2, ['--preset', 'huge']),
    ('evaluate-unknown-sampler', lambda E: EV(E, '--sampler', 'euler'), 2, ['--sampler', 'euler']),
    ('evaluate-not-trained', lambda E: ['evaluate', TS, '--fold', 5, *R(E)], 2, ['fold5', 'not trained']),
    ('evaluate-t1-fold-in-t2-family', lambda E: ['evaluate', 'phantom-brats-t2', '--fold', 0, '--runs', E['root'] / 't2copy'], 2,
     ['fold0', "sequence='t1'", "sequence='t2'"]),
    # ensemble
    ('ensemble-folds-out-of-range', lambda E: ['ensemble', TS, '--folds', '0-12', *R(E)], 2, ['folds', '0..9']),
    ('ensemble-folds-repeated', lambda E: ['ensemble', TS, '--folds', '0,0', *R(E)], 2, ['fold is repeated']),
    ('ensemble-folds-garbage', lambda E: ['ensemble', TS, '--folds', 'a-b', *R(E)], 2, ['folds', "'a-b'"]),
    ('ensemble-fold-missing', lambda E: ['ensemble', TS, '--folds', '0,1,2', *R(E)], 2, ['fold2', 'missing']),
    ('ensemble-runs-is-a-file', lambda E: ['ensemble', TS, '--folds', '0,1', '--runs', E['afile']], 2, ['--runs', 'is a file']),
    # table1 / figure3: a result must not be labelled with folds it does not come from
    ('table1-folds-0-over-2-fold-ensemble', lambda E: ['table1', '--testsets', TS, '--folds', '0', *R(E), '--out', E['root'] / 'newout',
                                                      '--test-images', 6], 2, ['folds 0,1', '--folds 0']),
    ('figure3-folds-0-over-2-fold-ensemble', lambda E: ['figure3', '--testsets', TS, '--folds', '0', *R(E), '--out', E['root'] / 'newout',
                                                       '--test-images', 6], 2, ['folds 0,1', '--folds 0']),
    ('table1-folds-0-2-over-2-fold-ensemble', lambda E: ['table1', '--testsets', TS, '--folds', '0-2', *R(E), '--out', E['root'] / 'newout'],
     2, ['folds 0,1', '--folds 0,1,2']),
    ('table1-out-is-a-file', lambda E: ['table1', '--testsets', TS, '--folds', '0,1', *R(E), '--out', E['afile']], 2, ['--out', 'is a file']),
    ('table1-runs-is-a-file', lambda E: ['table1', '--testsets', TS, '--runs', E['afile']], 2, ['--runs', 'is a file']),
    ('table1-runs-missing', lambda E: ['table1', '--testsets', TS, '--runs', E['root'] / 'nope'], 2, ['--runs', 'nope', 'not found']),
    ('table1-test-images-1', lambda E: ['table1', '--testsets', TS, *R(E), '--test-images', 1], 2, ['--test-images']),
    ('table1-unknown-testset', lambda E: ['table1', '--testsets', 'mnist', *R(E)], 2, ["'mnist'"]),
    ('figure3-examples-0', lambda E: ['figure3', '--testsets', TS, *R(E), '--examples', 0], 2, ['--examples', 'got 0']),
    ('figure3-examples-9', lambda E: ['figure3', '--testsets', TS, *R(E), '--examples', 9], 2, ['--examples', '1..8']),
    ('figure3-out-is-a-file', lambda E: ['figure3', '--testsets', TS, *R(E), '--out', E['afile']], 2, ['--out', 'is a file']),
    # train: --set of a field with its own option (was: TypeError)
    ('train-set-seed', lambda E: TR(E, '--set', 'seed=2'), 2, ['--set', 'use --seed']),
    ('train-set-max-steps', lambda E: TR(E, '--set', 'max_steps=3'), 2, ['--set', 'use --max-steps']),
    ('train-set-fold', lambda E: TR(E, '--set', 'fold=1'), 2, ['--set', 'use --fold']),
    ('train-set-device', lambda E: TR(E, '--set', 'device="cpu"'), 2, ['--set', 'use --device']),
    ('train-set-dataset', lambda E: TR(E, '--set', 'dataset="phantom-fundus"'), 2, ['--set', 'dataset', 'model family']),
    ('train-set-sequence', lambda E: TR(E, '--set', 'sequence="t2"'), 2, ['--set', 'sequence', 'model family']),
    ('train-set-unknown-field', lambda E: TR(E, '--set', 'learning_rate=1e-3'), 2, ['--set', 'learning_rate', 'unknown TrainConfig field']),
    ('train-set-no-equals', lambda E: TR(E, '--set', 'lr'), 2, ['--set', 'KEY=VALUE']),
    ('train-set-bad-value', lambda E: TR(E, '--set', 'batch_size=0'), 2, ['batch_size']),
    ('train-runs-is-a-file', lambda E: ['train', TS, '--fold', 0, '--runs', E['afile']], 2, ['--runs', 'is a file']),
    ('train-runs-below-a-file', lambda E: ['train', TS, '--fold', 0, '--runs', E['afile'] / 'sub'], 2, ['--runs', 'is a file']),
    ('train-device-foo', lambda E: TR(E, '--device', 'foo'), 2, ['--device', "'foo'"]),
    ('train-max-steps-0', lambda E: TR(E, '--max-steps', 0), 2, ['--max-steps', 'got 0']),
    ('train-fold-negative', lambda E: ['train', TS, '--fold', -1, '--runs', E['root'] / 'newruns'], 2, ['--fold', '-1']),
    ('train-seed-negative', lambda E: TR(E, '--seed', -4), 2, ['--seed', '-4']),
    ('train-data-root-missing', lambda E: TR(E, '--data-root', E['root'] / 'nodata'), 2, ['--data-root', 'nodata']),
    ('train-fold-not-an-int', lambda E: ['train', TS, '--fold', 'x'], 2, ['--fold']),
    # reproduce: refused before any training (was: --out a file failed after all the work)
    ('reproduce-out-is-a-file', lambda E: [*RP(E)[:-2], '--out', E['afile']], 2, ['--out', 'is a file']),
    ('reproduce-runs-is-a-file', lambda E: ['reproduce', '--testsets', TS, '--runs', E['afile'], '--out', E['root'] / 'newout'], 2,
     ['--runs', 'is a file']),
    ('reproduce-batch-size-0', lambda E: RP(E, '--batch-size', 0), 2, ['--batch-size', 'got 0']),
    ('reproduce-num-steps-0', lambda E: [*RP(E), '--num-steps', 0], 2, ['--num-steps', 'got 0']),
    ('reproduce-max-steps-0', lambda E: [*RP(E), '--max-steps', 0], 2, ['--max-steps', 'got 0']),
    ('reproduce-test-images-1', lambda E: [*RP(E), '--test-images', 1], 2, ['--test-images', 'got 1']),
    ('reproduce-examples-0', lambda E: RP(E, '--examples', 0), 2, ['--examples', 'got 0']),
    ('reproduce-train-seed-negative', lambda E: RP(E, '--train-seed', -1), 2, ['--train-seed', '-1']),
    ('reproduce-set-seed', lambda E: RP(E, '--set', 'seed=3'), 2, ['--set', '--train-seed']),
    ('reproduce-set-unknown', lambda E: RP(E, '--set', 'foo=3'), 2, ['--set', 'foo']),
    ('reproduce-real-without-data-root', lambda E: ['reproduce', '--testsets', 'brats-t2', '--runs', E['root'] / 'newruns',
                                                    '--out', E['root'] / 'newout'], 2, ['data_root', '--data-root']),
    ('reproduce-data-root-missing', lambda E: RP(E, '--data-root', E['root'] / 'nodata'), 2, ['--data-root', 'nodata']),
    ('reproduce-device-foo', lambda E: RP(E, '--device', 'foo'), 2, ['--device', "'foo'"]),
    ('reproduce-folds-bad', lambda E: [*RP(E), '--folds', '3-1x'], 2, ['folds', '3-1x']),
    # detect
    ('detect-zero-below-nan', lambda E: DT(E, '--zero-below', 'nan'), 2, ['--zero-below', 'nan', 'finite']),
    ('detect-zero-below-inf', lambda E: DT(E, '--zero-below', 'inf'), 2, ['--zero-below', 'inf']),
    ('detect-zero-below-negative', lambda E: DT(E, '--zero-below', '-1'), 2, ['--zero-below', '-1']),
    ('detect-batch-size-0', lambda E: DT(E, '--batch-size', 0), 2, ['--batch-size', 'got 0']),
    ('detect-num-steps-0', lambda E: [*DT(E), '--num-steps', 0], 2, ['--num-steps', 'got 0']),
    ('detect-seed-negative', lambda E: DT(E, '--seed', -2), 2, ['--seed', '-2']),
    ('detect-device-foo', lambda E: DT(E, '--device', 'foo'), 2, ['--device', "'foo'"]),
    ('detect-input-missing', lambda E: ['detect', E['root'] / 'in' / 'missing.nii.gz', '--run', E['t1']], 2, ['INPUT', 'missing.nii.gz', 'not found']),
    ('detect-input-is-a-folder', lambda E: ['detect', E['root'] / 'in' / 'dir.nii.gz', '--run', E['t1']], 2, ['INPUT', 'dir.nii.gz', 'folder']),
    ('detect-input-unsupported', lambda E: ['detect', E['afile'], '--run', E['t1']], 2, ['afile', 'unsupported file type']),
    ('detect-out-is-a-file', lambda E: ['detect', E['nii'], '--run', E['t1'], '--out', E['afile']], 2, ['--out', 'is a file']),
    ('detect-folds-11', lambda E: DT(E, '--folds', '11'), 2, ['folds', '11']),
    ('detect-run-missing', lambda E: ['detect', E['nii'], '--run', E['root'] / 'norun'], 2, ['norun', 'run folder not found']),
    ('detect-t1-and-t2-folds-mixed', lambda E: ['detect', E['nii'], '--run', E['root'] / 'mixed', '--out', E['root'] / 'newout'], 2,
     ['fold1', "sequence='t2'", "sequence='t1'"]),
    ('detect-nifti-on-fundus-run', lambda E: DT(E, '--run', E['runs'] / 'phantom-fundus' / 'tiny'), 2, ['v.nii.gz', 'RF']),
    ('detect-outputs-exist', lambda E: ['detect', E['nii'], '--run', E['t1']], 2, ['v_anomaly_map.nii.gz', '--overwrite']),
]
if NO_GPU:  # without a GPU (was: RuntimeError / AssertionError tracebacks)
    CLI_CASES += [
        ('evaluate-device-cuda-no-gpu', lambda E: EV(E, '--device', 'cuda'), 2, ['--device', "'cuda'", 'CUDA is not available']),
        ('train-device-cuda-no-gpu', lambda E: TR(E, '--device', 'cuda'), 2, ['--device', 'CUDA is not available']),
        ('reproduce-device-cuda-no-gpu', lambda E: RP(E, '--device', 'cuda:0'), 2, ['--device', 'CUDA is not available']),
        ('detect-device-cuda-no-gpu', lambda E: DT(E, '--device', 'cuda'), 2, ['--device', 'CUDA is not available']),
    ]


@pytest.mark.parametrize('case', CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(env, case, capsys):
    name, argv, code, needles = case
    if name == 'detect-outputs-exist':  # outputs already there (and no --overwrite): refused, untouched
        for k in ('anomaly_map', 'restoration'): (env['root'] / 'in' / f"v_{k}.nii.gz").write_bytes(b'old')
    before = snapshot(env['root'])
    got, err = run_cli(argv(env), capsys)
    assert got == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"condiff {argv(env)[0]}: error: "), err
    assert 'Traceback' not in err and (err.startswith('usage:') or len(err.strip().splitlines()) == 1), err  # one line (argparse: usage + one)
    for n in needles: assert n in err, (n, err)
    assert snapshot(env['root']) == before  # no output file left or changed
    for d in ('newruns', 'newout'): assert not (env['root'] / d).exists(), d
    if name == 'detect-outputs-exist':
        for k in ('anomaly_map', 'restoration'): (env['root'] / 'in' / f"v_{k}.nii.gz").unlink()


# -- OS errors: one line naming the path, nothing half-written ------------------------------------------------------

def test_cli_output_path_is_a_folder(env, tmp_path, capsys):
    shutil.copy(env['nii'], tmp_path / 'w.nii.gz')
    (tmp_path / 'w_anomaly_map.nii.gz').mkdir()  # where a file should go
    before = snapshot(tmp_path)
    code, err = run_cli(['detect', tmp_path / 'w.nii.gz', '--run', env['t1'], '--num-steps', 2, '--overwrite', '--no-progress'], capsys)
    assert code == 1 and 'w_anomaly_map.nii.gz' in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before and not list(tmp_path.glob('.w_*'))  # no temporary left


@pytest.mark.parametrize('err_no,what', [(errno.ENOSPC, 'the disk is full'), (errno.EROFS, 'the file system is read-only'),
                                          (errno.EACCES, 'permission denied')])
def test_cli_disk_full_or_read_only(env, tmp_path, capsys, monkeypatch, err_no, what):
    "A full disk / read-only file system / no permission while Table 1 is written (simulated: the write fails; tests run as root)."
    real = Path.write_text
    def full(self, *a, **k):
        if str(self).startswith(str(tmp_path)): raise OSError(err_no, os.strerror(err_no), str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, 'write_text', full)
    code, err = run_cli(['table1', '--testsets', TS, '--folds', '0,1', '--runs', env['runs'], '--out', tmp_path / 'o',
                         '--test-images', 6], capsys)
    assert code == 1 and what in err and str(tmp_path / 'o') in err and len(err.strip().splitlines()) == 1, err
    assert not [p for p in tmp_path.rglob('*') if p.is_file()]


# -- the papermill notebooks ----------------------------------------------------------------------------------------

def run_nb(name, workdir, **params):
    import papermill
    out = Path(workdir) / f"{name}-out.ipynb"
    old = os.environ.get('OMP_NUM_THREADS'); os.environ['OMP_NUM_THREADS'] = '1'
    try:
        papermill.execute_notebook(str(Path(__file__).resolve().parents[1] / 'nbs' / f"{name}.ipynb"), str(out), parameters=params,
                                   kernel_name='python3', progress_bar=False, cwd=str(workdir))
    finally:
        if old is None: os.environ.pop('OMP_NUM_THREADS', None)
        else: os.environ['OMP_NUM_THREADS'] = old


PM = lambda E: dict(testset=TS, runs=str(E['runs']), test_images=6, num_steps=2)
PM_CASES = [
    # a misspelt parameter (was: the defaults ran and overwrote fold 0's result)
    ('evaluate-fold_id', 'evaluate', lambda E: dict(PM(E), fold_id=1), ['fold_id', 'unknown notebook parameter']),
    ('train-fold_id', 'train', lambda E: dict(fold_id=3, out_dir=str(E['root'] / 'newruns'), max_steps=2), ['fold_id', 'unknown']),
    ('table1-fold', 'table1', lambda E: dict(testsets=TS, fold='0', runs=str(E['runs']), out=str(E['root'] / 'newout')), ["fold:", 'folds']),
    ('figure3-n_example', 'figure3', lambda E: dict(testsets=TS, n_example=3, runs=str(E['runs']), out=str(E['root'] / 'newout')), ['n_example']),
    ('evaluate-device-foo', 'evaluate', lambda E: dict(PM(E), device='foo'), ['device', "'foo'"]),
    ('evaluate-batch-size-0', 'evaluate', lambda E: dict(PM(E), batch_size=0), ['batch_size', '0']),
]
if NO_GPU: PM_CASES.append(('train-device-cuda-no-gpu', 'train', lambda E: dict(device='cuda', out_dir=str(E['root'] / 'newruns')),
                            ['device', 'CUDA is not available']))


@pytest.mark.parametrize('case', PM_CASES, ids=[c[0] for c in PM_CASES])
def test_papermill_bad_parameter(env, case, tmp_path):
    papermill = pytest.importorskip('papermill')
    name, nb, params, needles = case
    before = snapshot(env['root'])
    with pytest.raises(papermill.PapermillExecutionError) as ei: run_nb(nb, tmp_path, **params(env))
    for n in needles: assert n in ei.value.evalue, (n, ei.value.evalue)
    out = json.loads((tmp_path / f"{nb}-out.ipynb").read_text())
    code = [c for c in out['cells'] if c['cell_type'] == 'code']
    failed = [i for i, c in enumerate(code) if any(o.get('output_type') == 'error' for o in c.get('outputs', []))]
    assert failed == [2]  # stopped in the validation cell, before anything ran
    assert snapshot(env['root']) == before
    for d in ('newruns', 'newout'): assert not (env['root'] / d).exists(), d
    assert [p.name for p in tmp_path.iterdir()] == [f"{nb}-out.ipynb"]


# -- the Python API -------------------------------------------------------------------------------------------------
API_CASES = [
    ('evaluate-batch_size-0', lambda E: evaluate(TS, 0, runs=E['runs'], batch_size=0, test_images=6, progress=False, preset='tiny'), BadInput, ['batch_size', '0']),
    ('evaluate-num_steps-0', lambda E: evaluate(TS, 0, runs=E['runs'], num_steps=0, progress=False, preset='tiny'), BadInput, ['num_steps']),
    ('evaluate-sampler', lambda E: evaluate(TS, 0, runs=E['runs'], sampler='plms', progress=False, preset='tiny'), BadInput, ['sampler', 'plms']),
    ('evaluate-device', lambda E: evaluate(TS, 0, runs=E['runs'], device='tpu', progress=False, preset='tiny'), BadInput, ['device', 'tpu']),
    ('evaluate-fold-float', lambda E: evaluate(TS, 1.0, runs=E['runs'], progress=False, preset='tiny'), BadInput, ['fold', '1.0']),
    ('evaluate-t1-fold-in-t2-family', lambda E: evaluate('phantom-brats-t2', 0, runs=E['root'] / 't2copy', progress=False, preset='tiny'), ValueError,
     ['fold0', "sequence='t1'"]),
    ('detect-zero_below-nan', lambda E: detect(E['nii'], E['t1'], E['root'] / 'newout', zero_below=float('nan')), BadInput, ['zero_below', 'nan']),
    ('detect-batch_size-0', lambda E: detect(E['nii'], E['t1'], E['root'] / 'newout', batch_size=0), BadInput, ['batch_size']),
    ('reproduce-config-out-file', lambda E: ReproduceConfig(out=str(E['afile'])), BadInput, ['out', 'is a file']),
    ('reproduce-config-eval_batch_size-0', lambda E: ReproduceConfig(eval_batch_size=0), BadInput, ['eval_batch_size']),
    ('reproduce-config-overrides-seed', lambda E: ReproduceConfig(train_overrides={'seed': 1}), BadInput, ['train_overrides', 'seed']),
    ('reproduce-config-jobs-0', lambda E: ReproduceConfig(jobs=0), BadInput, ['jobs']),
    ('collect-results-folds-mismatch', lambda E: collect_results([TS], folds=[0], runs=E['runs'], controls=False, preset='tiny'), ValueError,
     ['folds 0,1', '--folds 0']),
    ('figure3-panels-folds-mismatch', lambda E: figure3_panels([TS], folds=[1], runs=E['runs'], test_images=6, preset='tiny'), ValueError, ['folds 0,1']),
    ('load-ensemble-mixed-families', lambda E: load_ensemble(E['root'] / 'mixed'), ValueError, ['fold1', "sequence='t2'"]),
    ('check-same-family-mixed', lambda E: check_same_family([E['t1'] / 'fold0', E['runs'] / 'phantom-brain-t2' / 'tiny' / 'fold0']),
     ValueError, ['fold0', 't2']),
    ('train-config-fold-10', lambda E: train_config(TS, 10, preset='tiny'), ValueError, ['fold']),
]


@pytest.mark.parametrize('case', API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(env, case):
    name, fn, exc, needles = case
    before = snapshot(env['root'])
    with pytest.raises(exc) as ei: fn(env)
    for n in needles: assert n in str(ei.value), (n, str(ei.value))
    assert snapshot(env['root']) == before
    for d in ('newruns', 'newout'): assert not (env['root'] / d).exists(), d


# -- fault tests: every recovery path -------------------------------------------------------------------------------

def damage(path:Path, how:str):
    raw = bytearray(path.read_bytes())
    if how == 'bitflip': raw[len(raw) // 2] ^= 0x10
    else: raw = raw[:len(raw) // 3]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize('how', ['bitflip', 'truncate'])
def test_corrupt_checkpoint_resume_falls_back_and_evaluate_refuses(env, tmp_path, how, capsys):
    runs = tmp_path / 'runs'
    fd = runs / 'phantom-brain-t1' / 'tiny' / 'fold0'
    shutil.copytree(env['t1'] / 'fold0', fd, symlinks=True)
    shutil.rmtree(fd / 'eval')
    ck = fd / 'checkpoints'
    latest, best, prev = (os.readlink(ck / t) for t in ('latest', 'best', 'previous'))
    assert latest == 'step-00000002' and prev == 'step-00000001'  # two steps, a checkpoint each: the old latest is kept
    damage(ck / latest / 'ema.safetensors', how)
    with pytest.raises(CorruptCheckpoint, match='ema.safetensors'): load_model(fd, 'latest')
    # evaluate refuses the damaged checkpoint, naming the file, and writes nothing
    (ck / 'best').unlink(); os.symlink(latest, ck / 'best')
    before = snapshot(tmp_path)
    code, err = run_cli(['evaluate', TS, '--fold', 0, '--runs', runs, '--test-images', 6, '--num-steps', 2, '--no-progress'], capsys)
    assert code == 2 and 'ema.safetensors' in err and ('corrupt' in err or 'SHA-256' in err), err
    assert snapshot(tmp_path) == before and not (fd / 'eval').exists()
    # resume: falls back to the newest checkpoint that verifies, says so, moves the bad one aside
    cfg = fold_config('phantom-brain', 't1', 0, train_data=str(env['root'] / 'mri.npz'), val_data=str(env['root'] / 'mri.npz'),
                      **{**SMALL, 'max_steps': 3}, preset='tiny')
    with pytest.warns(RuntimeWarning, match='newest checkpoint that verifies'):
        train_fold(cfg, runs, progress=False)
    st = json.loads((fd / 'run.json').read_text())
    assert st['status'] == 'finished' and st['step'] == 3 and st['recovered'][0]['checkpoint'] == latest
    assert (ck / st['recovered'][0]['moved_to']).is_dir()
    steps = [r['step'] for r in read_log(fd) if 'loss' in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the log was cut back to the fallback: no repeat
    load_model(fd, 'latest')  # the new latest verifies


def test_truncated_maps_are_recomputed_and_reported(env, tmp_path, capsys):
    runs = tmp_path / 'runs'
    shutil.copytree(env['runs'], runs, symlinks=True, ignore=shutil.ignore_patterns('phantom-fundus', 'phantom-brain-t2'))
    ed = eval_dir(runs, TS, 'tiny', 0)
    m0 = json.loads((ed / 'metrics.json').read_text())
    os.truncate(ed / 'maps.safetensors', 5000)
    with pytest.warns(RuntimeWarning, match='moved aside'):
        code, err = run_cli(['evaluate', TS, '--fold', 0, '--runs', runs, '--test-images', 6, '--num-steps', 2, '--no-progress'], capsys)
    assert code == 0, err
    m1 = json.loads((ed / 'metrics.json').read_text())
    assert m1['recovered'] and m1['recovered'][0]['file'].endswith('maps.safetensors')
    assert {k: m1[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice')} == {k: m0[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice')}
    assert len(list(ed.glob('maps.safetensors.corrupt-*'))) == 1 and len(list(ed.glob('metrics.json.corrupt-*'))) == 1
    from condiff.inference import TensorFile
    with TensorFile(ed / 'maps.safetensors') as f: f.verify(rows=6)
    # the ensemble then works (it verifies each fold's maps first)
    code, err = run_cli(['ensemble', TS, '--folds', '0,1', '--runs', runs], capsys)
    assert code == 0, err
    # a bit-flipped fold result: the ensemble refuses it, naming the fold
    damage(eval_dir(runs, TS, 'tiny', 1) / 'maps.safetensors', 'bitflip')
    code, err = run_cli(['ensemble', TS, '--folds', '0,1', '--runs', runs], capsys)
    assert code == 2 and 'fold1' in err and 'corrupt' in err, err


def test_killed_reproduce_then_a_second_one(env, tmp_path):
    "kill -9 of reproduce: its workers stop (no orphans, by pid); a second reproduce is refused while they live; the log never interleaves."
    exe = Path(sys.executable).with_name('condiff')
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'condiff.cli']
    runs = tmp_path / 'runs'
    data = str(env['root'] / 'mri.npz')
    args = ['reproduce', '--preset', 'tiny', '--testsets', TS, '--folds', '0,1', '--test-images', 6, '--num-steps', 2, '--runs', runs, '--out', tmp_path / 'pf',
            '--set', f'train_data="{data}"', '--set', f'val_data="{data}"', '--set', 'batch_size=2', '--set', 'val_batch_size=2',
            '--set', 'log_every=1', '--set', 'checkpoint_every=5', '--no-progress']  # the second run: --max-steps 2, reached already: it only resumes, evaluates, ensembles
    env_vars = dict(os.environ, OMP_NUM_THREADS='1')
    a = subprocess.Popen(cmd + [str(x) for x in args] + ['--max-steps', '100000'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env_vars, start_new_session=True)
    folds = [runs / 'phantom-brain-t1' / 'tiny' / f'fold{f}' for f in (0, 1)]
    t0 = time.time()
    while time.time() - t0 < 120:  # until both workers are training (they hold their folds' locks and have logged)
        hold = [lock_holder(d) for d in folds]
        if all(h.get('alive') for h in hold) and all((d / 'log.jsonl').exists() and (d / 'log.jsonl').read_text().count('\n') >= 2 for d in folds):
            break
        assert a.poll() is None, a.stderr.read().decode()
        time.sleep(0.3)
    else: pytest.fail('the workers did not start training')
    workers = [h['pid'] for h in hold]
    assert a.pid not in workers and all(_pid_alive(p) for p in workers)
    os.kill(a.pid, signal.SIGKILL); a.wait()
    # at once a second reproduce: the orphans (if still alive) hold the folds: refused naming the holder, or it runs after them
    b = subprocess.run(cmd + [str(x) for x in args] + ['--max-steps', '2'], capture_output=True, text=True, env=env_vars, timeout=300)
    assert b.returncode in (0, 2), b.stderr
    print(f"second reproduce right after the kill: exit {b.returncode}")
    if b.returncode == 2: assert 'in use by another process' in b.stderr and 'pid' in b.stderr, b.stderr
    t0 = time.time()
    while any(_pid_alive(p) for p in workers) and time.time() - t0 < 30: time.sleep(0.2)
    alive = [p for p in workers if _pid_alive(p)]
    assert not alive, f"orphan workers still running: {alive}"
    if b.returncode == 2:  # the orphans are gone now: a third run completes
        c = subprocess.run(cmd + [str(x) for x in args] + ['--max-steps', '2'], capture_output=True, text=True, env=env_vars, timeout=300)
        assert c.returncode == 0, c.stderr
    for d in folds:
        steps = [r['step'] for r in read_log(d) if 'loss' in r]
        assert steps == sorted(steps) and len(steps) == len(set(steps)), steps  # no interleaving, no repeat
        assert json.loads((d / 'run.json').read_text())['status'] == 'finished'
    assert (tmp_path / 'pf' / 'manifest.json').is_file()


# -- documented guarantees ------------------------------------------------------------------------------------------

def test_batch_size_bound_of_the_maps(tmp_path):
    """The contract (DEVELOPING.md, condiff.inference): maps do not depend on the batch beyond one float16 unit in the
    last place per pixel (CPU convolutions pick batch-dependent kernels); image metrics are equal, |ΔAP_p| <= 1e-6."""
    from condiff.unet import build_unet
    from condiff.inference import evaluate_model, read_eval
    torch.manual_seed(0)
    m = build_unet('tiny', 1).eval()
    rng = np.random.default_rng(0)
    N = 8
    img = (rng.random((N, 1, 32, 32), dtype=np.float32) * (rng.random((N, 1, 1, 1)) > 0.1)).astype(np.float32)
    masks = np.zeros((N, 1, 32, 32), bool); masks[::2, :, 10:20, 10:20] = True
    ss = SliceSet(img, [f"v{i}/z{i:03d}" for i in range(N)], 'MRI', masks)
    r = {bs: evaluate_model(m, ss, tmp_path / f'b{bs}', 'ddim', 4, 0, bs, 'cpu', progress=False) for bs in (1, 3, 8)}
    maps = {bs: read_eval(tmp_path / f'b{bs}')['maps'].astype(np.float16) for bs in r}
    for bs in (3, 8):
        ulps = np.abs(maps[1].view(np.int16).astype(int) - maps[bs].view(np.int16).astype(int)).max()
        assert ulps <= 1, ulps
        for k in ('AP_i', 'AUROC', 'max_Dice'): assert abs(r[bs][k] - r[1][k]) <= 1e-6, k
        assert abs(r[bs]['AP_p'] - r[1]['AP_p']) <= 1e-6


def test_second_writer_is_refused_naming_the_holder(env, tmp_path, capsys):
    "A fold folder held by another live process: `condiff train` is refused (exit 2) with the holder's pid; nothing changes."
    runs = tmp_path / 'runs'
    fd = runs / 'phantom-brain-t1' / 'tiny' / 'fold0'
    shutil.copytree(env['t1'] / 'fold0', fd, symlinks=True)
    holder = subprocess.Popen([sys.executable, '-c', "import sys, time; from condiff.checks import FolderLock\n"
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(fd)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        before = snapshot(runs)
        data = str(env['root'] / 'mri.npz')
        code, err = run_cli(['train', TS, '--fold', 0, '--runs', runs, '--max-steps', 3, '--no-progress', '--set', f'train_data="{data}"',
                             '--set', f'val_data="{data}"', '--set', 'batch_size=2', '--set', 'val_batch_size=2',
                             '--set', 'val_start=1', '--set', 'val_every=1', '--set', 'checkpoint_every=1'], capsys)
        assert code == 2 and f"pid {holder.pid}" in err and 'fold0' in err and 'in use by another process' in err, err
        assert snapshot(runs) == before
    finally:
        holder.kill(); holder.wait()
    # its holder gone (killed), the lock is taken over and the run resumes
    code, err = run_cli(['train', TS, '--fold', 0, '--runs', runs, '--max-steps', 3, '--no-progress', '--set', f'train_data="{data}"',
                         '--set', f'val_data="{data}"', '--set', 'batch_size=2', '--set', 'val_batch_size=2',
                         '--set', 'val_start=1', '--set', 'val_every=1', '--set', 'checkpoint_every=1'], capsys)
    assert code == 0, err
    assert json.loads((fd / 'run.json').read_text())['step'] == 3


def test_a_crash_leaves_run_json_failed_with_the_reason(env, tmp_path, monkeypatch):
    from condiff import train as T
    def boom(self, batch): raise RuntimeError('simulated crash in a training step')
    monkeypatch.setattr(T.Trainer, 'train_step', boom)
    cfg = fold_config('phantom-brain', 't1', 0, train_data=str(env['root'] / 'mri.npz'), val_data=str(env['root'] / 'mri.npz'), **SMALL, preset='tiny')
    with pytest.raises(RuntimeError, match='simulated crash'): T.train(cfg, tmp_path / 'runs', progress=False)
    st = json.loads((T.run_dir_for(cfg, tmp_path / 'runs') / 'run.json').read_text())
    assert st['status'] == 'failed' and st['reason'] == 'RuntimeError: simulated crash in a training step'
    assert not lock_holder(T.run_dir_for(cfg, tmp_path / 'runs'))['alive']  # the lock went with it


def test_output_files_have_one_mode(env):
    "Every output file (atomic writes, tensor files, checkpoints) has mode 0o666 minus the umask."
    from condiff.checks import file_mode
    files = [p for p in env['runs'].rglob('*') if p.is_file() and not p.is_symlink() and p.name != '.lock']
    assert files
    modes = {oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {oct(file_mode())}, {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != file_mode()}


def test_16bit_fundus_png_is_scaled_not_saturated(env, tmp_path, capsys):
    "A 16-bit greyscale fundus PNG (was: saturated to 8 bits, its bright lesion gone): scaled by its bit depth, range recorded."
    from condiff.data import load_fundus
    g = np.full((160, 200), 20000, np.uint16); g[60:90, 80:110] = 60000  # a bright lesion, far above 255
    Image.fromarray(g).save(tmp_path / 'eye16.png')
    x = load_fundus(tmp_path / 'eye16.png')
    assert x.max() < 0.95 and x.max() - x.min() > 0.5  # not all white: the lesion keeps its contrast
    code, _ = run_cli(['detect', tmp_path / 'eye16.png', '--run', env['runs'] / 'phantom-fundus' / 'tiny', '--num-steps', 2, '--no-progress'], capsys)
    assert code == 0
    r = json.loads(run_cli.out)
    assert r['input_range'] == dict(mode='I;16', bits=16, min=20000.0, max=60000.0) and r['warnings'] == []
    assert Image.open(tmp_path / 'eye16_restoration.png').size == (200, 160)
    rest = np.asarray(Image.open(tmp_path / 'eye16_restoration.png'))
    assert rest[5, 5, 0] == round(20000 / 65535 * 255)  # outside the model's square: the photograph itself, not saturated (255)


def test_nifti_with_negative_values_is_warned(env, tmp_path, capsys):
    "Decision (data card, detect chapter): a NIfTI volume with negative values is warned about, in stderr and the JSON, not refused."
    vol = ellipsoid((30, 30, 3)) - 40.0  # a background below 0, as after z-scoring or CT
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / 'neg.nii.gz')
    with pytest.warns(RuntimeWarning, match='negative values'):
        r = detect(tmp_path / 'neg.nii.gz', env['t1'], num_steps=2, progress=False)
    assert r['input_range']['min'] < 0 and r['input_range']['max'] > 0 and r['warnings'] and 'neg.nii.gz' in r['warnings'][0]
    assert Path(r['map']).exists()


def test_no_progress_silences_every_bar(env, tmp_path, capsys, monkeypatch):
    "--no-progress: no progress bar is shown by train, evaluate, ensemble, table1 or detect (every tqdm created is disabled)."
    import tqdm.std
    shown, real = [], tqdm.std.tqdm.__init__
    def spy(self, *a, **k):
        if not k.get('disable', False): shown.append(k.get('desc'))
        real(self, *a, **k)
    monkeypatch.setattr(tqdm.std.tqdm, '__init__', spy)
    runs, data = tmp_path / 'runs', str(env['root'] / 'mri.npz')
    shutil.copytree(env['runs'], runs, symlinks=True, ignore=shutil.ignore_patterns('phantom-fundus', 'phantom-brain-t2', 'eval', 'ensemble'))
    small = [x for k, v in SMALL.items() if k != 'max_steps' for x in ('--set', f'{k}={v}')]
    code, err = run_cli(['train', TS, '--fold', 0, '--runs', runs, '--max-steps', 3, '--no-progress', '--set', f'train_data="{data}"',
                         '--set', f'val_data="{data}"', *small], capsys)  # resumes: one more step
    assert code == 0, err
    for f in (0, 1):
        code, err = run_cli(['evaluate', TS, '--fold', f, '--runs', runs, '--test-images', 6, '--num-steps', 2, '--no-progress'], capsys)
        assert code == 0, err
    for argv in (['ensemble', TS, '--folds', '0,1', '--runs', runs, '--no-progress'],
                 ['table1', '--testsets', TS, '--folds', '0,1', '--runs', runs, '--out', tmp_path / 'pf', '--test-images', 6, '--no-progress'],
                 ['detect', env['nii'], '--run', runs / 'phantom-brain-t1' / 'tiny', '--out', tmp_path / 'd', '--num-steps', 2, '--no-progress']):
        code, err = run_cli(argv, capsys)
        assert code == 0 and err == '', err
    assert shown == [], shown
