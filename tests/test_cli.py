"""condiff.cli: `detect` keeps the input's grid and affine and writes nothing for a corrupt input; the preprocessing it
applies agrees with condiff.data's (an independent implementation of spec §7.3) and is inverted exactly where it can
be; `reproduce` resumes, skipping finished folds. Models are trained for two steps: the plumbing is under test."""
import dataclasses, json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import nibabel as nib
from PIL import Image
from condiff import cli, experiment
from condiff.pipeline import ReproduceConfig, fold_config, reproduce, subsample, train_fold
from condiff.detect import detect, detect_outputs, load_ensemble, slices_to_volume, volume_to_slices
from condiff.cli import main
from condiff.experiment import parse_folds
from condiff.data import SliceSet, preprocess_volume, save_sliceset, load_fundus

AFFINE = np.array([[0.9, 0.1, 0.0, -20.0], [0.0, 1.1, 0.05, 12.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])


from conftest import ellipsoid  # a noisy ellipsoid "scan" for the detect tests


from conftest import tiny_preset

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def run_cli(*argv, capsys=None):
    try: code = main(tiny_preset(argv))
    except SystemExit as e: code = e.code
    return code


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Two MRI folds and one fundus fold, two training steps each, on small slice sets written here."
    root = tmp_path_factory.mktemp('cli')
    sl, _ = volume_to_slices(ellipsoid())
    keep = sl.reshape(len(sl), -1).max(1) > 0
    mri = SliceSet(sl[keep], [f"s/z{i}" for i in range(int(keep.sum()))], 'MRI')
    save_sliceset(mri, root / 'mri.npz')
    rng = np.random.default_rng(1)
    rf = SliceSet(rng.random((4, 3, 128, 128), dtype=np.float32), [f"f/{i}" for i in range(4)], 'RF')
    save_sliceset(rf, root / 'rf.npz')
    small = dict(max_steps=2, batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1)
    for f in (0, 1):
        train_fold(fold_config('phantom-brain', 't1', f, train_data=str(root / 'mri.npz'), val_data=str(root / 'mri.npz'),
                               **small, preset='tiny'), root / 'runs', progress=False)
    train_fold(fold_config('phantom-fundus', None, 0, train_data=str(root / 'rf.npz'), val_data=str(root / 'rf.npz'),
                           **small, preset='tiny'), root / 'runs', progress=False)
    return root


# -- the preprocessing of detect, against condiff.data ------------------------------------------------------------

@pytest.mark.parametrize('shape', [(40, 36, 5), (30, 52, 3), (200, 170, 2)])
def test_volume_to_slices_matches_condiff_data(tmp_path, shape):
    vol = ellipsoid(shape)
    vol[0, 0, 0] = 5e-5  # below the 1e-4 threshold: zeroed
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / 'v.nii.gz')
    want, _, z = preprocess_volume(tmp_path / 'v.nii.gz', drop_empty=False)
    got, geo = volume_to_slices(vol)
    assert got.shape == want.shape and list(z) == list(range(shape[2]))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    L = min(shape[:2])
    assert geo.crop[1] - geo.crop[0] == L and geo.crop[3] - geo.crop[2] == L


def test_slices_to_volume_inverts_exactly_at_128():
    "On a 128×128 plane the resizes are identities, so the round trip gives back the (zeroed) volume."
    vol = ellipsoid((128, 128, 3))
    sl, geo = volume_to_slices(vol)
    back = slices_to_volume(sl, geo, rescale=True)
    np.testing.assert_allclose(back, np.where(vol < 1e-4, 0, vol), rtol=1e-5, atol=1e-3)


def test_slices_to_volume_smooth_round_trip_and_uncrop():
    x, y = np.meshgrid(np.linspace(0, 1, 300), np.linspace(0, 1, 256), indexing='ij')
    vol = np.stack([1 + np.sin(3 * x + z) * np.cos(2 * y) for z in range(2)], -1).astype(np.float32) + 1
    sl, geo = volume_to_slices(vol)
    assert geo.crop == (22, 278, 0, 256)
    back = slices_to_volume(sl, geo, fill=-1.0, rescale=True)
    assert back.shape == vol.shape
    inner = back[22 + 4:278 - 4, 4:-4]
    assert np.abs(inner - vol[22 + 4:278 - 4, 4:-4]).max() < 0.02 * vol.max()
    assert (back[:22] == -1).all() and (back[278:] == -1).all()
    with pytest.raises(ValueError, match='do not match'): slices_to_volume(sl[:1], geo)


# -- detect ----------------------------------------------------------------------------------------------------------

def test_detect_nifti_keeps_shape_and_affine(runs, tmp_path):
    vol = ellipsoid((44, 38, 5))
    src = tmp_path / 'patient.nii.gz'
    nib.save(nib.Nifti1Image(vol, AFFINE), src)
    code = run_cli('detect', src, '--run', runs / 'runs/phantom-brain-t1/tiny', '--num-steps', 2, '--no-progress')
    assert code == 0
    outs = detect_outputs(src)
    m, r = nib.load(outs['map']), nib.load(outs['restoration'])
    assert m.shape == r.shape == vol.shape
    np.testing.assert_allclose(m.affine, AFFINE); np.testing.assert_allclose(r.affine, AFFINE)
    np.testing.assert_allclose(m.header.get_zooms(), nib.load(src).header.get_zooms())
    M, R = np.asarray(m.dataobj), np.asarray(r.dataobj)
    assert np.isfinite(M).all() and M.min() >= 0 and M.max() <= 1 and M.max() > 0
    assert (M[vol < 1e-4] == 0).all() and (R[vol < 1e-4] == 0).all()  # background stays background
    assert R.max() <= vol.max() * 1.0001 + 1e-6 and R.min() >= 0
    # the same call again refuses to overwrite; --overwrite replaces
    assert run_cli('detect', src, '--run', runs / 'runs/phantom-brain-t1/tiny', '--num-steps', 2, '--no-progress') == 2
    assert run_cli('detect', src, '--run', runs / 'runs/phantom-brain-t1/tiny', '--num-steps', 2, '--no-progress', '--overwrite') == 0


def test_detect_is_seeded_and_uses_every_fold(runs, tmp_path):
    vol = ellipsoid((36, 36, 3))
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / 'a.nii')
    r1 = detect(tmp_path / 'a.nii', runs / 'runs/phantom-brain-t1/tiny', tmp_path / 'o1', num_steps=2, progress=False)
    r2 = detect(tmp_path / 'a.nii', runs / 'runs/phantom-brain-t1/tiny', tmp_path / 'o2', num_steps=2, batch_size=1, progress=False)
    assert r1['n_folds'] == 2 and r1['fold'] in ('fold0', 'fold1')
    np.testing.assert_allclose(np.asarray(nib.load(r1['map']).dataobj), np.asarray(nib.load(r2['map']).dataobj), atol=1e-6)
    one = detect(tmp_path / 'a.nii', runs / 'runs/phantom-brain-t1/tiny', tmp_path / 'o3', num_steps=2, folds='1', progress=False)
    assert one['n_folds'] == 1 and one['fold'] == 'fold1'
    # both folds in one batched pass (FoldStack): the same map to float tolerance
    rb = detect(tmp_path / 'a.nii', runs / 'runs/phantom-brain-t1/tiny', tmp_path / 'o4', num_steps=2, progress=False, batched_folds=True)
    np.testing.assert_allclose(np.asarray(nib.load(rb['map']).dataobj), np.asarray(nib.load(r1['map']).dataobj), atol=1e-4)


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'nan'])
def test_detect_corrupt_nifti_fails_clearly_and_writes_nothing(runs, tmp_path, capsys, damage):
    src = tmp_path / 'broken.nii.gz'
    vol = ellipsoid((30, 30, 3))
    if damage == 'nan': vol[5, 5, 1] = np.nan
    nib.save(nib.Nifti1Image(vol, AFFINE), src)
    if damage == 'truncate': src.write_bytes(src.read_bytes()[:200])
    if damage == 'garbage': src.write_bytes(b'\x1f\x8b\x08\x00 definitely not a volume')
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_cli('detect', src, '--run', runs / 'runs/phantom-brain-t1/tiny', '--num-steps', 2, '--no-progress')
    err = capsys.readouterr().err
    assert code == 2 and 'condiff detect: error:' in err and 'broken.nii.gz' in err, err
    assert ('NaN' in err) if damage == 'nan' else ('corrupt' in err or 'cannot read' in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left


def test_detect_bad_inputs(runs, tmp_path, capsys):
    assert run_cli('detect', tmp_path / 'missing.nii.gz', '--run', runs / 'runs/phantom-brain-t1/tiny') == 2
    assert 'not found' in capsys.readouterr().err
    (tmp_path / 'x.mha').write_bytes(b'x')
    assert run_cli('detect', tmp_path / 'x.mha', '--run', runs / 'runs/phantom-brain-t1/tiny') == 2
    assert 'unsupported file type' in capsys.readouterr().err
    nib.save(nib.Nifti1Image(ellipsoid((30, 30, 3)), AFFINE), tmp_path / 'v.nii.gz')
    assert run_cli('detect', tmp_path / 'v.nii.gz', '--run', tmp_path / 'nope') == 2
    assert 'run folder not found' in capsys.readouterr().err
    assert run_cli('detect', tmp_path / 'v.nii.gz', '--run', runs / 'runs/phantom-fundus/tiny', '--num-steps', 2) == 2
    assert 'trained on RF data' in capsys.readouterr().err
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 3), np.float32), AFFINE), tmp_path / 'empty.nii.gz')
    assert run_cli('detect', tmp_path / 'empty.nii.gz', '--run', runs / 'runs/phantom-brain-t1/tiny') == 2
    assert 'empty volume' in capsys.readouterr().err
    assert not list(tmp_path.glob('*_anomaly_map*')) and not list(tmp_path.glob('*_restoration*'))


def test_detect_fundus(runs, tmp_path, capsys):
    rng = np.random.default_rng(3)
    photo = (rng.random((150, 200, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / 'eye.jpg', quality=95)
    r = detect(tmp_path / 'eye.jpg', runs / 'runs/phantom-fundus/tiny', num_steps=2, progress=False)
    m, rest = Image.open(r['map']), Image.open(r['restoration'])
    assert m.size == rest.size == (200, 150) and m.mode in ('I;16', 'I') and rest.mode == 'RGB'
    M = np.asarray(m)
    assert M[:, :25].max() == 0 and M[:, 175:].max() == 0 and M[:, 25:175].max() > 0  # outside the centred square: 0
    orig = np.asarray(Image.open(tmp_path / 'eye.jpg').convert('RGB'))
    assert (np.asarray(rest)[:, :25] == orig[:, :25]).all()
    (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
    assert run_cli('detect', tmp_path / 'bad.png', '--run', runs / 'runs/phantom-fundus/tiny') == 2
    assert 'bad.png' in capsys.readouterr().err and not (tmp_path / 'bad_anomaly_map.png').exists()


def test_console_script(runs, tmp_path):
    exe = Path(sys.executable).with_name('condiff')
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'condiff.cli']
    out = subprocess.run(cmd + ['--help'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'reproduce' in out.stdout and 'detect' in out.stdout
    out = subprocess.run(cmd + ['train', 'phantom-ddr', '--fold', '12'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and '--fold: got 12; allowed: an int in 0..9' in out.stderr and 'Traceback' not in out.stderr


# -- reproduce ------------------------------------------------------------------------------------------------------

def test_parse_folds_and_config_errors():
    assert parse_folds('0-3,8') == [0, 1, 2, 3, 8] and parse_folds([2, 1]) == [2, 1]
    for bad, msg in [('0-10', '0..9'), ('a', "look like"), ('1,1', 'repeated')]:
        with pytest.raises(ValueError, match=msg): parse_folds(bad)
    with pytest.raises(ValueError, match='unknown test set'): ReproduceConfig(testsets=('atlas-t1',))
    with pytest.raises(ValueError, match='num_steps'): ReproduceConfig(num_steps=0)
    with pytest.raises(ValueError, match='data_root'): ReproduceConfig(testsets=('ddr',))


def test_subsample_keeps_both_classes():
    m = np.zeros((50, 1, 4, 4), bool); m[10:20, 0, 0, 0] = True
    ss = SliceSet(np.zeros((50, 1, 4, 4), np.float32), [f"v/z{i}" for i in range(50)], 'MRI', m)
    sub = subsample(ss, 7)
    assert len(sub) == 7 and sub.labels.sum() == 4 and list(sub.ids) == sorted(sub.ids, key=lambda s: int(s[3:]))
    assert sub.ids == subsample(ss, 7).ids  # deterministic


def weights(run_dir):
    "SHA-256 of a run's latest weights (the tensors: safetensors' header order may differ between writes)."
    from safetensors.torch import load_file
    from condiff.train import weights_digest
    return weights_digest(load_file(str(run_dir / 'checkpoints/latest/model.safetensors')))


def test_train_fold_refuses_a_folder_trained_with_another_config(runs, tmp_path):
    shutil.copytree(runs / 'runs', tmp_path / 'runs', symlinks=True)
    small = dict(max_steps=2, batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1)
    c = fold_config('phantom-brain', 't1', 0, train_data=str(runs / 'mri.npz'), val_data=str(runs / 'mri.npz'), **small, preset='tiny')
    rd, finished = train_fold(c, tmp_path / 'runs', progress=False)
    assert finished
    with pytest.raises(ValueError, match="different config.*'lr'"): train_fold(c.replace(lr=1e-3), tmp_path / 'runs', progress=False)
    cj = rd / 'config.json'; d = json.loads(cj.read_text()); del d['task_clip']; cj.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="different config.*'task_clip': \\('image', 'column'\\)"):  # saved before the option
        train_fold(c, tmp_path / 'runs', progress=False)
    assert train_fold(c.replace(task_clip='image'), tmp_path / 'runs', progress=False) == (rd, True)


def test_reproduce_resumes_and_skips_finished_folds(runs, tmp_path):
    cfg = ReproduceConfig(testsets=('phantom-brats-t1',), folds=(0, 1), max_steps=2, num_steps=2, test_images=6, preset='tiny',
                          runs=str(tmp_path / 'runs'), out=str(tmp_path / 'pf'), jobs=2,
                          train_overrides=dict(train_data=str(runs / 'mri.npz'), val_data=str(runs / 'mri.npz'),
                                               batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1))
    logs = []
    m1 = reproduce(cfg, progress=False, log=logs.append)
    assert m1['skipped'] == {'train': [], 'evaluate': [], 'ensemble': []} and m1['jobs'] == 2 and m1['threads_per_job'] == 1
    pf = tmp_path / 'pf'
    assert sorted(p.name for p in pf.iterdir()) == ['figure3.pdf', 'figure3.png', 'manifest.json', 'table1.csv',
                                                     'table1.md', 'table1.tex', 'table1_restoration.csv']
    man = json.loads((pf / 'manifest.json').read_text())
    for k in ('commit', 'config', 'train_configs', 'seeds', 'wall_s', 'stage_wall_s', 'machine', 'versions', 'results'):
        assert k in man, k
    assert man['config']['folds'] == [0, 1] and man['seeds']['train'] == 42 and man['machine']['cpu_count'] >= 1
    assert man['results']['phantom-brats-t1']['n_images'] == 6 and man['versions']['torch']
    ens = json.loads((experiment.ensemble_dir(cfg.runs, 'phantom-brats-t1', 'tiny') / 'metrics.json').read_text())
    md = (pf / 'table1.md').read_text()
    from condiff.report import format_value
    assert f"| **Ours_ens** | **ours** | – | – | – | – | {format_value(ens['AP_i'])} |" in md
    assert '| **Intensity** | **ours** |' in md and '| **Random** | **ours** |' in md
    assert man['results']['phantom-brats-t1']['intensity_control']['AP_p'] > 0
    # an interrupted run: fold 1's training did not record its end, fold 0's evaluation and fold 1's run were lost
    fold0, fold1 = (experiment.fold_dir(cfg.runs, 'phantom-brats-t1', 'tiny', f) for f in (0, 1))
    st = json.loads((fold0 / 'run.json').read_text()); st['status'] = 'interrupted'
    (fold0 / 'run.json').write_text(json.dumps(st))
    w0, w1 = weights(fold0), weights(fold1)
    e0 = json.loads((experiment.eval_dir(cfg.runs, 'phantom-brats-t1', 'tiny', 0) / 'metrics.json').read_text())
    shutil.rmtree(experiment.eval_dir(cfg.runs, 'phantom-brats-t1', 'tiny', 0)); shutil.rmtree(fold1)
    one_job = dataclasses.replace(cfg, jobs=1)
    m2 = reproduce(one_job, progress=False, log=logs.append)
    assert m2['skipped']['train'] == [] and m2['skipped']['evaluate'] == [] and m2['jobs'] == 1
    assert weights(fold0) == w0  # resumed at max_steps: nothing retrained
    assert json.loads((fold0 / 'run.json').read_text())['status'] == 'finished'
    # recomputed in one process: the same numbers as with two worker processes
    assert weights(fold1) == w1
    e0b = json.loads((experiment.eval_dir(cfg.runs, 'phantom-brats-t1', 'tiny', 0) / 'metrics.json').read_text())
    assert {k: e0b[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice')} == {k: e0[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice')}
    assert m2['results'] == m1['results']
    m3 = reproduce(cfg, progress=False, log=logs.append)
    assert m3['skipped']['train'] == ['phantom-brain-t1/fold0', 'phantom-brain-t1/fold1']
    assert m3['skipped']['evaluate'] == ['phantom-brats-t1/fold0', 'phantom-brats-t1/fold1']
    assert m3['skipped']['ensemble'] == ['phantom-brats-t1'] and m3['resumed']
    assert any('finished before, skipped' in l for l in logs)


# -- issue 15: the data seed reaches training; folds spread over GPUs ------------------------------------------------

class _Stop(Exception): pass


def test_data_seed_reaches_training(tmp_path, monkeypatch):
    "`condiff reproduce --data-seed 1`: the build-once step and every fold's Trainer load the same, seed-1 phantoms."
    import condiff.cli as C
    import condiff.pipeline as Pl
    import condiff.train as T
    from condiff.experiment import get_dataset as real
    small = lambda name, split, **kw: real(name, split, **{**kw, 'n_subjects': 2, 'slice_step': 40, 'progress': False})  # noqa: E731
    calls = {'cli': [], 'train': []}
    def rec(where):
        def fn(name, split, **kw):
            calls[where].append((name, split, kw.get('sequence'), kw.get('seed'), kw.get('cache_dir'))); return small(name, split, **kw)
        return fn
    monkeypatch.setattr(Pl, 'get_dataset', rec('cli')); monkeypatch.setattr(T, 'get_dataset', rec('train'))
    seen = {}
    def stop(steps, *a, **k): seen['steps'] = steps; raise _Stop
    monkeypatch.setattr(Pl, '_run_steps', stop)
    def rec_reproduce(progress=True, log=None, cluster=None, retries=2, **fields):  # what `condiff reproduce` calls: the ReproduceConfig fields by keyword (and --cluster, --retries)
        seen['cfg'] = Pl.ReproduceConfig(**fields)
        return Pl.reproduce(seen['cfg'], progress=False, log=None)
    monkeypatch.setitem(C.COMMANDS['reproduce'], 'func', rec_reproduce)
    with pytest.raises(_Stop):
        main(['reproduce', '--preset', 'tiny', '--testsets', 'phantom-brats-t1', '--folds', '0', '--data-seed', '1', '--runs', str(tmp_path / 'r'),
              '--out', str(tmp_path / 'pf'), '--no-progress'])
    assert seen['cfg'].data_seed == 1
    tc = T.TrainConfig.from_json(json.dumps(seen['steps'][0][1]['config']))
    assert tc.data_seed == 1
    assert ('phantom-brain', 'train', 't1', 1, None) in calls['cli'] and ('phantom-brats', 'test', 't1', 1, None) in calls['cli']
    # the fold's Trainer asks for exactly what the build-once step built (so the cache is used), and seed 1 differs from 0
    tc = tc.replace(cache_dir=str(tmp_path / 'cache'), batch_size=2, val_batch_size=2, max_steps=1, num_workers=0, device='cpu')
    a = T.Trainer(tc, tmp_path / 'a', progress=False)
    b = T.Trainer(tc.replace(data_seed=0), tmp_path / 'b', progress=False)
    assert calls['train'][0][:4] == ('phantom-brain', 'train', 't1', 1)
    assert a.train_set.images.shape == b.train_set.images.shape and not np.array_equal(a.train_set.images, b.train_set.images)


def test_folds_spread_over_visible_gpus(monkeypatch):
    import torch
    import condiff.pipeline as C
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 3)
    c = ReproduceConfig(device='cuda')
    assert c.job_devices() == ['cuda:0', 'cuda:1', 'cuda:2'] and c.resolved_jobs() == (3, 1)
    assert ReproduceConfig(device='auto', folds_per_gpu=2).resolved_jobs() == (6, 1)
    assert ReproduceConfig(device='cuda:1').job_devices() == ['cuda:1'] and ReproduceConfig(device='cuda:1').resolved_jobs() == (1, None)
    assert ReproduceConfig(device='cpu', jobs=2).job_devices() == ['cpu']
    with pytest.raises(ValueError, match='folds_per_gpu'): ReproduceConfig(folds_per_gpu=0)
    kw = dict(config=dict(device='cuda', fold=3), runs='r')
    assert C._on_device('train', kw, 'cuda:2') == dict(config=dict(device='cuda:2', fold=3), runs='r') and kw['config']['device'] == 'cuda'
    assert C._on_device('evaluate', dict(device='cuda', fold=1), 'cuda:1') == dict(device='cuda:1', fold=1)
    assert C._on_device('train', kw, None) is kw
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert ReproduceConfig(device='cuda').resolved_jobs() == (1, None)  # one GPU: one process, as before


def test_reproduce_batched_folds_matches_per_fold(runs, tmp_path):
    "reproduce with batched_folds=True: one evaluation step per test set, both folds restored together, the same metrics."
    cfg = ReproduceConfig(testsets=('phantom-brats-t1',), folds=(0, 1), max_steps=2, num_steps=2, test_images=6, preset='tiny',
                          runs=str(tmp_path / 'runs'), out=str(tmp_path / 'pf'), jobs=1, batched_folds=False,
                          train_overrides=dict(train_data=str(runs / 'mri.npz'), val_data=str(runs / 'mri.npz'),
                                               batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1))
    m1 = reproduce(cfg, progress=False, log=None)
    for f in (0, 1): shutil.rmtree(experiment.eval_dir(cfg.runs, 'phantom-brats-t1', 'tiny', f))
    shutil.rmtree(experiment.ensemble_dir(cfg.runs, 'phantom-brats-t1', 'tiny'))
    logs = []
    m2 = reproduce(dataclasses.replace(cfg, batched_folds=True), progress=False, log=logs.append)
    assert m2['batched_folds'] is True and m1['batched_folds'] is False and m2['skipped']['evaluate'] == []
    assert sum(l.startswith('evaluate phantom-brats-t1/fold') for l in logs) == 2
    r1, r2 = m1['results']['phantom-brats-t1'], m2['results']['phantom-brats-t1']
    for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice'):
        assert abs(r1['ensemble'][k] - r2['ensemble'][k]) <= 2e-3
        for f in ('0', '1'): assert abs(r1['folds'][f][k] - r2['folds'][f][k]) <= 2e-3
    m3 = reproduce(dataclasses.replace(cfg, batched_folds=True), progress=False, log=None)
    assert m3['skipped']['evaluate'] == ['phantom-brats-t1/fold0', 'phantom-brats-t1/fold1']
