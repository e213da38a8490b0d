"""Inference: per-slice seeds, batch/order invariance, float16 storage, fold evaluation against scikit-learn, resuming,
the streamed ensemble against a direct in-memory average, refusals, and a 2-process gloo torchrun evaluation equal to
the single-process one. Everything runs an untrained or 2-step `tiny` UNet at 32x32 with a few sampling steps."""
import hashlib, json, os, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import condiff.inference as I
from condiff.data import SliceSet, save_sliceset
from condiff.inference import (TensorFile, TensorFileWriter, ensemble, evaluate_fold, evaluate_model, read_eval,
                               restore_dataset, slice_seed, slice_seeds)
from condiff.report import closest_fold as report_closest_fold
from condiff.ssim import anomaly_map
from condiff.train import TrainConfig, load_model, train
from condiff.unet import build_unet

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


# ------------------------------------------------------------------------------------------------ seeds, samplers
def test_slice_seed_is_a_stable_hash_of_seed_and_id():
    want = int.from_bytes(hashlib.blake2b(b"7\x1fBraTS20_Training_001/z077", digest_size=8).digest(), 'little') & (2**63 - 1)
    assert slice_seed(7, 'BraTS20_Training_001/z077') == want
    ids = [f"v{i}/z{j}" for i in range(30) for j in range(30)]
    s = slice_seeds(3, ids)
    assert len(set(s)) == len(ids)
    assert slice_seeds(3, ids[::-1]) == s[::-1]
    # stable across processes (Python's own hash() is salted per process)
    out = subprocess.run([sys.executable, '-c', 'from condiff.inference import slice_seed; print(slice_seed(3, "v1/z2"))'],
                         capture_output=True, text=True, check=True, env={**os.environ, 'PYTHONHASHSEED': 'random'})
    assert int(out.stdout) == s[ids.index('v1/z2')]


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_restore_same_seed_same_result_whatever_batch_and_order(sampler):
    torch.manual_seed(0)
    net = build_unet('tiny', 1)
    y = torch.rand(8, 1, SIZE, SIZE)
    sd = slice_seeds(0, [f"s{i}" for i in range(8)])
    r8 = restore_dataset(net, y, sd, sampler=sampler, num_steps=3, batch_size=8, progress=False)
    r1 = restore_dataset(net, y, sd, sampler=sampler, num_steps=3, batch_size=1, progress=False)
    p = [5, 2, 7, 0, 3, 6, 1, 4]
    rp = restore_dataset(net, y[p], [sd[i] for i in p], sampler=sampler, num_steps=3, batch_size=3, progress=False)
    # same noise streams; only the rounding of batched convolutions may differ
    assert (r1 - r8).abs().max() < 1e-4 and (rp - r8[p]).abs().max() < 1e-4
    other = restore_dataset(net, y[:2], slice_seeds(1, ['s0', 's1']), sampler=sampler, num_steps=3, progress=False)
    assert (other - r8[:2]).abs().max() > 1e-2


def test_restore_rejects_bad_input():
    net = build_unet('tiny', 1)
    sd = slice_seeds(0, ['a', 'b'])
    with pytest.raises(ValueError, match='channel'): restore_dataset(net, torch.rand(2, 3, SIZE, SIZE), sd)
    with pytest.raises(ValueError, match='NaN'): restore_dataset(net, torch.full((2, 1, SIZE, SIZE), float('nan')), sd)
    with pytest.raises(ValueError, match='N×C×H×W'): restore_dataset(net, torch.rand(2, SIZE, SIZE), sd)
    with pytest.raises(ValueError, match='seeds'): restore_dataset(net, torch.rand(2, 1, SIZE, SIZE), sd[:1])
    with pytest.raises(ValueError, match='unknown sampler'): restore_dataset(net, torch.rand(2, 1, SIZE, SIZE), sd, sampler='euler')
    with pytest.raises(ValueError, match='empty'): restore_dataset(net, torch.rand(0, 1, SIZE, SIZE), [])


# ------------------------------------------------------------------------------------------------ storage
def test_tensor_file_round_trip_through_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.random((7, 1, 5, 6)).astype(np.float32) ** 4  # many small values, as SSIM maps
    lab = rng.integers(0, 2, 7)
    with TensorFileWriter(tmp_path / 'x.safetensors', {'maps': (np.float16, maps.shape), 'labels': (np.int64, (7,)),
                                                       'bits': (np.uint8, (7, 4))}, {'ids': list('abcdefg')}) as w:
        for a in (0, 3, 5):  # interleaved, uneven row blocks
            b = {0: 3, 3: 5, 5: 7}[a]
            w.write('labels', lab[a:b]); w.write('maps', maps[a:b]); w.write('bits', np.full((b - a, 4), a, np.uint8))
    ref = load_file(tmp_path / 'x.safetensors')  # the official reader
    assert ref['maps'].dtype == np.float16 and np.array_equal(ref['maps'], maps.astype(np.float16))
    assert np.array_equal(ref['labels'], lab)
    with TensorFile(tmp_path / 'x.safetensors') as f:
        assert f.meta['ids'] == list('abcdefg')
        assert np.array_equal(f.rows('maps', 2, 6), maps[2:6].astype(np.float16))
    # an incomplete or failed write leaves nothing behind
    with pytest.raises(ValueError, match='incomplete'):
        with TensorFileWriter(tmp_path / 'y.safetensors', {'a': (np.float32, (3,))}) as w: w.write('a', np.zeros(2))
    with pytest.raises(RuntimeError):
        with TensorFileWriter(tmp_path / 'z.safetensors', {'a': (np.float32, (3,))}) as w: raise RuntimeError('boom')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.safetensors']
    with pytest.raises(FileNotFoundError): TensorFile(tmp_path / 'none.safetensors')
    (tmp_path / 'bad.safetensors').write_bytes(b'\x05\x00\x00\x00\x00\x00\x00\x00{oops')
    with pytest.raises(ValueError, match='bad.safetensors'): TensorFile(tmp_path / 'bad.safetensors')


def test_stored_maps_are_float16_of_the_paper_maps(run, testset, folds):
    "Recompute restorations and maps independently (restore_dataset + condiff.ssim) and compare with the file."
    ev = read_eval(folds[0])
    model, _ = load_model(run, 'best')
    y = torch.from_numpy(testset.images)
    rest = restore_dataset(model, y, slice_seeds(0, testset.ids), num_steps=3, batch_size=4, progress=False)
    maps = anomaly_map(restoration=rest, image=y, modality='MRI').numpy()
    raw = load_file(folds[0] / 'maps.safetensors')
    assert raw['maps'].dtype == np.float16 and raw['restorations'].dtype == np.float16
    assert np.abs(raw['maps'].astype(np.float32) - maps).max() <= 1e-3 * max(maps.max(), 1e-3)
    assert np.array_equal(ev['maps'], raw['maps'].astype(np.float32))  # read_eval: float16 → float32 exactly
    assert np.abs(ev['restorations'] - rest.numpy()).max() < 2e-3
    assert np.allclose(ev['scores'], maps.mean((1, 2, 3)), rtol=1e-4, atol=1e-7)
    assert ev['ids'] == testset.ids and np.array_equal(ev['masks'], testset.masks)
    assert np.array_equal(ev['labels'], testset.labels) and np.array_equal(ev['foreground'], testset.images > 0)
    assert not ev['maps'][~ev['foreground']].any()


def sk_metrics(labels, scores, masks, maps):
    "scikit-learn oracle for the four metrics (spec §6)."
    y, p = masks.reshape(-1).astype(int), maps.reshape(-1).astype(np.float64)
    pr, rc, _ = precision_recall_curve(y, p)
    f1 = np.where(pr + rc > 0, 2 * pr * rc / np.maximum(pr + rc, 1e-300), 0)
    return {'AP_i': average_precision_score(labels, scores), 'AUROC': roc_auc_score(labels, scores),
            'AP_p': average_precision_score(y, p), 'max_Dice': float(np.max(f1))}


def test_fold_metrics_equal_scikit_learn_on_the_stored_maps(testset, folds):
    for f in folds:
        ev, m = read_eval(f), json.loads((f / 'metrics.json').read_text())
        ref = sk_metrics(ev['labels'], ev['scores'].astype(np.float64), ev['masks'], ev['maps'])
        for k, v in ref.items(): assert abs(m[k] - v) < 1e-9, (f, k, m[k], v)
        assert m['lesion_pixel_fraction'] == pytest.approx(testset.masks.mean())
        assert m['n_images'] == len(testset) and m['sampler'] == 'ddpm' and m['num_steps'] == 3
        assert sorted(p.name for p in f.iterdir()) == ['maps.safetensors', 'metrics.json']


# ------------------------------------------------------------------------------------------------ resuming
def test_finished_evaluation_is_skipped_and_changed_settings_recompute(run, testset, folds):
    f = folds[0]
    before = ((f / 'maps.safetensors').stat().st_mtime_ns, (f / 'metrics.json').read_text())
    r = evaluate_fold(run, testset, f, seed=0, num_steps=3, batch_size=2, part_size=5, progress=False)
    assert ((f / 'maps.safetensors').stat().st_mtime_ns, (f / 'metrics.json').read_text()) == before
    assert r == json.loads(before[1])


def test_interrupted_evaluation_resumes_from_finished_parts(run, testset, folds, tmp_path, monkeypatch):
    calls, real = [], I._restore_part
    def failing(*a, **k):
        calls.append(a[3])
        if len(calls) == 2: raise KeyboardInterrupt('killed')
        return real(*a, **k)
    monkeypatch.setattr(I, '_restore_part', failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate_fold(run, testset, tmp_path / 'e', seed=0, num_steps=3, batch_size=4, part_size=4, progress=False)
    assert not (tmp_path / 'e' / 'maps.safetensors').exists()
    assert [p.name for p in (tmp_path / 'e' / 'parts').glob('*.safetensors')] == ['00000000-00000004.safetensors']
    calls.clear()
    monkeypatch.setattr(I, '_restore_part', lambda *a, **k: (calls.append(a[3]), real(*a, **k)))
    r = evaluate_fold(run, testset, tmp_path / 'e', seed=0, num_steps=3, batch_size=4, part_size=4, progress=False)
    assert calls == [4, 8]  # only the unfinished parts
    ref = load_file(folds[0] / 'maps.safetensors'); got = load_file(tmp_path / 'e' / 'maps.safetensors')
    for k in ('maps', 'scores', 'restorations', 'labels', 'seeds'):  # same per-slice seeds as the seed-0 fold
        assert np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)).max() <= 1e-3, k
    assert r['key'] == json.loads((folds[0] / 'metrics.json').read_text())['key']


# ------------------------------------------------------------------------------------------------ bad input
def test_evaluate_fold_rejects_incompatible_input(run, testset, tmp_path):
    rgb = SliceSet(np.repeat(testset.images, 3, 1), testset.ids, 'RF', testset.masks, 'rgb')
    with pytest.raises(ValueError, match='1-channel'): evaluate_fold(run, rgb, tmp_path / 'a')
    big = toy(2, 5, lesions=True, size=64)
    with pytest.raises(ValueError, match=r'trained on \(32, 32\)'): evaluate_fold(run, big, tmp_path / 'a')
    with pytest.raises(FileNotFoundError, match='does not exist'): evaluate_fold(tmp_path / 'nope', testset, tmp_path / 'a')
    bad = toy(4, 6, lesions=True); bad.images[1, 0, 3, 3] = np.nan  # corrupted after construction
    with pytest.raises(ValueError, match='NaN'): evaluate_fold(run, bad, tmp_path / 'a')
    with pytest.raises(ValueError, match='unknown sampler'): evaluate_fold(run, testset, tmp_path / 'a', sampler='plms')
    with pytest.raises(ValueError, match='SliceSet'): evaluate_fold(run, testset.images, tmp_path / 'a')
    assert not (tmp_path / 'a').exists()


def test_unlabelled_test_set_gives_maps_without_metrics(run, tmp_path):
    healthy = toy(4, 7)  # no masks: a practitioner's new scans
    r = evaluate_fold(run, healthy, tmp_path / 'h', num_steps=1, progress=False)
    assert r['AP_p'] is None and 'no ground-truth masks' in r['metrics_note']
    ev = read_eval(tmp_path / 'h')
    assert ev['maps'].shape == (4, 1, SIZE, SIZE) and 'masks' not in ev and ev['ids'] == healthy.ids
    e = ensemble([tmp_path / 'h'], tmp_path / 'he', 'MRI', progress=False)
    assert e['AP_i'] is None and np.array_equal(read_eval(tmp_path / 'he')['maps'], ev['maps'])


def test_incompatible_checkpoint_is_refused(run, testset, tmp_path):
    "A checkpoint of another preset (here: the config says 'fast') is refused by load_model with a clear error."
    import shutil
    other = tmp_path / 'run'; shutil.copytree(run, other, symlinks=True)
    cfg = json.loads((other / 'config.json').read_text()); cfg['unet'] = 'fast'
    (other / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='incompatible checkpoint'): evaluate_fold(other, testset, tmp_path / 'a')


# ------------------------------------------------------------------------------------------------ ensemble
def test_streamed_ensemble_equals_direct_in_memory_average(testset, folds, tmp_path):
    res = ensemble(folds, tmp_path / 'ens', 'MRI', chunk_size=3, progress=False)
    fold_maps = np.stack([read_eval(f)['maps'] for f in folds]).astype(np.float64)  # F×N×1×H×W
    direct = fold_maps.mean(0) * (testset.images > 0)
    E = read_eval(tmp_path / 'ens')
    assert np.abs(E['maps'] - direct).max() <= 1e-3 * direct.max()  # float16 storage
    assert np.abs(E['maps'] - direct.astype(np.float16)).max() <= np.spacing(np.float16(direct.max()))
    assert np.allclose(E['scores'], direct.mean((1, 2, 3)), rtol=1e-5, atol=1e-8)
    ref = sk_metrics(testset.labels, E['scores'].astype(np.float64), testset.masks, E['maps'])
    for k, v in ref.items(): assert abs(res[k] - v) < 1e-9, k
    per = [json.loads((f / 'metrics.json').read_text()) for f in folds]
    for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice'):
        v = np.array([m[k] for m in per])
        assert res['avg'][k] == pytest.approx(v.mean()) and res['max'][k] == pytest.approx(v.max())
        assert res['std'][k] == pytest.approx(v.std(ddof=res['std_ddof']))
    # which fold is closest to the ensemble mean: per slice, and for a set of figure examples (official criterion)
    dev = np.abs(fold_maps - direct[None]).mean((2, 3, 4)).T  # N×F
    assert np.allclose(E['fold_deviation'], dev, rtol=1e-3, atol=1e-9)
    assert np.array_equal(E['closest_fold'], dev.argmin(1))
    rows = [1, 3, 5]
    assert int(E['fold_deviation'][rows].mean(0).argmin()) == report_closest_fold(fold_maps[:, rows])
    # chunking does not change anything
    res2 = ensemble(folds, tmp_path / 'ens2', 'MRI', chunk_size=64, progress=False)
    assert all(res2[k] == res[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice'))
    assert np.array_equal(read_eval(tmp_path / 'ens2')['maps'], E['maps'])


def test_ensemble_refuses_folds_that_differ(run, testset, folds, tmp_path):
    evaluate_fold(run, testset.subset(range(8)), tmp_path / 'short', num_steps=1, progress=False)
    evaluate_fold(run, testset.subset([1, 0] + list(range(2, 10))), tmp_path / 'swapped', num_steps=1, progress=False)
    other = toy(10, 4, lesions=True)  # other slices, other ids
    evaluate_fold(run, other, tmp_path / 'other', num_steps=1, progress=False)
    masks = testset.masks.copy(); masks[0, 0, 16, 16] = True  # slice 0 becomes anomalous
    relabel = SliceSet(testset.images, testset.ids, 'MRI', masks, 'relabelled')
    evaluate_fold(run, relabel, tmp_path / 'relabel', num_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"fold .*short.* 8 slices"): ensemble(folds + [tmp_path / 'short'], tmp_path / 'x', 'MRI')
    with pytest.raises(ValueError, match=r"swapped.*different order"): ensemble(folds + [tmp_path / 'swapped'], tmp_path / 'x', 'MRI')
    with pytest.raises(ValueError, match=r"other.*slice 0 is 't4/z000'"): ensemble([folds[0], tmp_path / 'other'], tmp_path / 'x', 'MRI')
    with pytest.raises(ValueError, match=r"relabel.*labels differ"): ensemble([folds[0], tmp_path / 'relabel'], tmp_path / 'x', 'MRI')
    with pytest.raises(ValueError, match='modality'): ensemble(folds, tmp_path / 'x', 'RF')
    with pytest.raises(ValueError, match='twice'): ensemble([folds[0], folds[0]], tmp_path / 'x', 'MRI')
    with pytest.raises(FileNotFoundError, match='does not exist'): ensemble([folds[0], tmp_path / 'missing'], tmp_path / 'x', 'MRI')
    with pytest.raises(ValueError, match='at least one'): ensemble([], tmp_path / 'x', 'MRI')
    assert not (tmp_path / 'x').exists()


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


def test_cuda_graphs_option_falls_back_on_cpu_with_a_warning():
    torch.manual_seed(0)
    net = build_unet('tiny', 1)
    y = torch.rand(2, 1, SIZE, SIZE)
    sd = slice_seeds(0, ['a/z0', 'a/z1'])
    ref = restore_dataset(net, y, sd, num_steps=3, progress=False)
    with pytest.warns(RuntimeWarning, match='cuda_graphs=True needs a CUDA device'):
        got = restore_dataset(net, y, sd, num_steps=3, progress=False, cuda_graphs=True)
    assert torch.equal(ref, got)
