"""Inference, what a notebook cannot run well (per-slice seeds, batch/order invariance, float16 storage, fold evaluation
against scikit-learn, resuming, the streamed ensemble against an in-memory average and the refusals are test cells in
nbs/09_inference.ipynb): a seed stable across processes, a 2-process gloo torchrun evaluation equal to the single-process
one, the ensemble's closest fold against chapter 10's, and the batched folds over three trained runs (module fixtures).
Everything runs a 2-step `tiny` UNet at 32x32 with a few sampling steps."""
import json, os, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import condiff.inference as I
from condiff.data import SliceSet, save_sliceset
from condiff.inference import ensemble, evaluate_fold, read_eval, restore_dataset, slice_seeds
from condiff.report import closest_fold as report_closest_fold
from condiff.ssim import anomaly_map
from condiff.train import TrainConfig, load_model, train

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def toy(n, seed, lesions=False, size=SIZE):
    "Disc 'brains' on a zero background; with lesions, every other slice has a bright blob (and its mask)."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    imgs, masks = [], []
    for i in range(n):
        r = rng.uniform(.35, .45) * size
        img = ((yy ** 2 + xx ** 2) < r ** 2) * (0.4 + 0.2 * rng.random((size, size)))
        m = np.zeros((size, size), bool)
        if lesions and i % 2:
            cy, cx = rng.uniform(-r / 2, r / 2, 2)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2
            img = np.where(m, 0.95, img)
        imgs.append(img); masks.append(m)
    return SliceSet(np.float32(imgs)[:, None], [f"t{seed}/z{i:03d}" for i in range(n)], 'MRI',
                    np.array(masks)[:, None] if lesions else None, f"toy{seed}")


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A real run folder: the tiny UNet trained for 2 steps at 32x32 by condiff.train."
    d = tmp_path_factory.mktemp('run')
    save_sliceset(toy(8, 1), d / 'train.npz'); save_sliceset(toy(4, 2), d / 'val.npz')
    cfg = TrainConfig.from_preset('tiny', dataset='toy', sequence=None, train_data=str(d / 'train.npz'),
                                  val_data=str(d / 'val.npz'), batch_size=4, val_batch_size=4, max_steps=2, val_start=1,
                                  val_every=1, checkpoint_every=2, num_workers=0, device='cpu')
    return train(cfg, d / 'runs', progress=False)


@pytest.fixture(scope='module')
def testset(): return toy(10, 3, lesions=True)


@pytest.fixture(scope='module')
def folds(run, testset, tmp_path_factory):
    "Three fold-like evaluations (same model, base seeds 0, 1, 2; different part sizes)."
    d = tmp_path_factory.mktemp('folds')
    for s in range(3):
        evaluate_fold(run, testset, d / f'fold{s}', seed=s, num_steps=3, batch_size=4, part_size=3 + s, progress=False)
    return [d / f'fold{s}' for s in range(3)]


def test_slice_seed_is_stable_across_processes():
    "Python's own hash() is salted per process; slice_seed is not."
    ids = [f"v{i}/z{j}" for i in range(30) for j in range(30)]
    s = slice_seeds(3, ids)
    out = subprocess.run([sys.executable, '-c', 'from condiff.inference import slice_seed; print(slice_seed(3, "v1/z2"))'],
                         capture_output=True, text=True, check=True, env={**os.environ, 'PYTHONHASHSEED': 'random'})
    assert int(out.stdout) == s[ids.index('v1/z2')]


def test_closest_fold_agrees_with_the_report(testset, folds, tmp_path):
    "The ensemble's per-slice fold deviations give, for a set of figure examples, report.closest_fold's choice (official criterion)."
    ensemble(folds, tmp_path / 'ens', 'MRI', chunk_size=3, progress=False)
    E = read_eval(tmp_path / 'ens')
    fold_maps = np.stack([read_eval(f)['maps'] for f in folds]).astype(np.float64)
    rows = [1, 3, 5]
    assert int(E['fold_deviation'][rows].mean(0).argmin()) == report_closest_fold(fold_maps[:, rows])


# ------------------------------------------------------------------------------------------------ torchrun
SCRIPT = textwrap.dedent("""
    import os, sys, json
    from condiff.data import load_sliceset
    from condiff.inference import evaluate_fold
    run, data, out = sys.argv[1:4]
    r = evaluate_fold(run, load_sliceset(data), out, num_steps=3, batch_size=2, part_size=3, device='cpu', progress=False)
    rank = int(os.environ.get('RANK', 0))
    open(f"{out}.rank{rank}.json", 'w').write(json.dumps({'world_size': r['world_size'], 'rank': rank, 'AP_p': r['AP_p']}))
""")


def test_two_process_gloo_torchrun_equals_single_process(run, testset, tmp_path):
    save_sliceset(testset, tmp_path / 'test.npz')
    (tmp_path / 'eval_script.py').write_text(SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    one = subprocess.run([sys.executable, tmp_path / 'eval_script.py', run, tmp_path / 'test.npz', tmp_path / 'one'],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name('torchrun')
    two = subprocess.run([torchrun, '--standalone', '--nproc_per_node', '2', tmp_path / 'eval_script.py', run,
                          tmp_path / 'test.npz', tmp_path / 'two'], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    outs = [json.loads((tmp_path / f'two.rank{r}.json').read_text()) for r in (0, 1)]  # every rank returns the metrics
    assert [o['rank'] for o in outs] == [0, 1] and all(o['world_size'] == 2 for o in outs)
    assert outs[0]['AP_p'] == outs[1]['AP_p']
    a, b = load_file(tmp_path / 'one' / 'maps.safetensors'), load_file(tmp_path / 'two' / 'maps.safetensors')
    assert a.keys() == b.keys()
    for k in a: assert np.array_equal(a[k], b[k]), k
    ma, mb = (json.loads((tmp_path / d / 'metrics.json').read_text()) for d in ('one', 'two'))
    assert {k: ma[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice', 'key')} == {k: mb[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice', 'key')}
    assert mb['world_size'] == 2 and not (tmp_path / 'two' / 'parts').exists()


# ------------------------------------------------------------------------------------------------ batched folds (issue 15)
@pytest.fixture(scope='module')
def three_runs(tmp_path_factory):
    "Three different fold models (seeds 0, 1, 2; folds 0, 1, 2), the tiny UNet trained 2 steps at 32x32."
    d = tmp_path_factory.mktemp('three')
    save_sliceset(toy(8, 1), d / 'train.npz'); save_sliceset(toy(4, 2), d / 'val.npz')
    out = []
    for f in range(3):
        cfg = TrainConfig.from_preset('tiny', dataset='toy', sequence=None, fold=f, seed=f, train_data=str(d / 'train.npz'),
                                      val_data=str(d / 'val.npz'), batch_size=4, val_batch_size=4, max_steps=2, val_start=1,
                                      val_every=1, checkpoint_every=2, num_workers=0, device='cpu')
        out.append(train(cfg, d / 'runs', progress=False))
    return out


MAP_TOL = 1e-4  # fp32 maps, batched vs per-fold (measured max ~1e-5: GroupNorm written out, grouped convolutions)


def test_batched_folds_equal_per_fold_on_8_slices(three_runs):
    ts = toy(8, 3, lesions=True)
    models = [load_model(r)[0] for r in three_runs]
    y = torch.from_numpy(ts.images)
    seeds = slice_seeds(0, ts.ids)
    per = I.restore_folds(models, y, seeds, num_steps=4, batch_size=3, batched=False, progress=False)
    bat = I.restore_folds(models, y, seeds, num_steps=4, batch_size=3, batched=True, progress=False)
    assert per.shape == bat.shape == (3, 8, 1, SIZE, SIZE)
    for f in range(3):  # the per-fold path is restore_dataset, fold by fold
        assert torch.equal(per[f], restore_dataset(models[f], y, seeds, num_steps=4, batch_size=3, progress=False))
    assert min((per[0] - per[f]).abs().max().item() for f in (1, 2)) > 1e-3  # three different models
    mp = torch.stack([anomaly_map(restoration=per[f], image=y, modality='MRI') for f in range(3)])
    mb = torch.stack([anomaly_map(restoration=bat[f], image=y, modality='MRI') for f in range(3)])
    assert (mp - mb).abs().max().item() <= MAP_TOL and (per - bat).abs().max().item() <= MAP_TOL
    with pytest.raises(ValueError, match='seeds'): I.restore_folds(models, y, seeds[:3], progress=False)


def test_evaluate_folds_batched_equals_per_fold(three_runs, tmp_path):
    ts = toy(8, 3, lesions=True)
    kw = dict(num_steps=3, batch_size=4, part_size=5, progress=False)
    a = I.evaluate_folds(three_runs, ts, [tmp_path / 'b' / f'f{f}' for f in range(3)], batched=True, **kw)
    b = [evaluate_fold(r, ts, tmp_path / 'p' / f'f{f}', **kw) for f, r in enumerate(three_runs)]
    for f in range(3):
        assert a[f]['key'] == b[f]['key']  # the same evaluation: either result serves the other
        ea, eb = read_eval(tmp_path / 'b' / f'f{f}'), read_eval(tmp_path / 'p' / f'f{f}')
        assert np.abs(ea['maps'] - eb['maps']).max() <= 1e-3  # float16 storage: one ulp at most
        for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice'): assert abs(a[f][k] - b[f][k]) <= 2e-3, (k, a[f][k], b[f][k])
    # a finished batched evaluation is not recomputed, and the ensemble of either is the same
    t0 = time.perf_counter(); I.evaluate_folds(three_runs, ts, [tmp_path / 'b' / f'f{f}' for f in range(3)], batched=True, **kw)
    assert time.perf_counter() - t0 < 5
    ma = ensemble([tmp_path / 'b' / f'f{f}' for f in range(3)], tmp_path / 'eb', 'MRI', progress=False)
    mb = ensemble([tmp_path / 'p' / f'f{f}' for f in range(3)], tmp_path / 'ep', 'MRI', progress=False)
    for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice'): assert abs(ma[k] - mb[k]) <= 2e-3
