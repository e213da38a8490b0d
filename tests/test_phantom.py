"""Checks of the embedded phantom datasets (condiff.phantom) beyond the chapter's test cells.

The oracles (scikit-image / PIL for the preprocessing, nilearn's MNI152 T1 template for the contrast, scikit-learn for
the random-classifier AP_p, the paper's Random row) are test cells in nbs/06_phantom.ipynb. These need larger sets or
pytest fixtures (module-scoped sets, `monkeypatch`, `tmp_path`, parametrised corruptions): determinism, values and
shapes, lesion statistics, disjoint subjects, the cache. Sizes are tiny (1–12 subjects, sparse planes)."""
import json, warnings
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import label
from skimage.transform import resize

from condiff import phantom as P
from condiff.data import SliceSet, load_sliceset, save_sliceset

NC = dict(cache_dir=False, progress=False)  # no cache, no progress bar


@pytest.fixture(scope='module')
def brats():
    return {s: P.phantom_brats(s, n_subjects=3, slice_step=20, **NC) for s in P.SEQUENCES}


@pytest.fixture(scope='module')
def brain_train():
    return P.phantom_brain('train', 't1', n_subjects=3, slice_step=6, **NC)


def _by_subject(ss):
    subj = np.array([i.split('/')[0] for i in ss.ids])
    return {s: np.flatnonzero(subj == s) for s in dict.fromkeys(subj)}


# ---------------------------------------------------------------- determinism
def test_same_seed_same_arrays_different_seed_different():
    a = P.phantom_brats('t2', seed=0, n_subjects=2, slice_step=30, **NC)
    b = P.phantom_brats('t2', seed=0, n_subjects=2, slice_step=30, **NC)
    c = P.phantom_brats('t2', seed=1, n_subjects=2, slice_step=30, **NC)
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.images.shape != c.images.shape or not np.array_equal(a.images, c.images)
    f1 = P.phantom_ddr(seed=0, n_images=4, **NC); f2 = P.phantom_ddr(seed=0, n_images=4, **NC)
    f3 = P.phantom_ddr(seed=5, n_images=4, **NC)
    np.testing.assert_array_equal(f1.images, f2.images)
    assert not np.array_equal(f1.images, f3.images)


def test_subject_does_not_depend_on_set_size():
    "Per-subject streams: subject 0 is the same in a 1-subject and a 2-subject set (no batch/order dependence)."
    one = P.phantom_atlas(n_subjects=1, slice_step=25, **NC)
    two = P.phantom_atlas(n_subjects=2, slice_step=25, **NC)
    n = len(one)
    assert two.ids[:n] == one.ids
    np.testing.assert_array_equal(two.images[:n], one.images)
    np.testing.assert_array_equal(two.masks[:n], one.masks)
    fa = P.phantom_fundus('train', n_images=3, **NC)  # int(0.95*3) = 2 train images
    fb = P.phantom_fundus('train', n_images=4, **NC)
    np.testing.assert_array_equal(fa.images, fb.images[:2])


# ---------------------------------------------------------------- values, shapes, background
def test_mri_values_background_and_volume_max(brain_train, brats):
    for ss in [brain_train, *brats.values()]:
        x = ss.images
        assert x.dtype == np.float32 and x.shape[1:] == (1, 128, 128) and ss.modality == 'MRI'
        assert x.min() == 0.0 and x.max() <= 1.0
        # skull-stripped: a wide frame around the brain is exactly 0 in every slice
        assert (x[..., :8, :] == 0).all() and (x[..., -8:, :] == 0).all()
        assert (x[..., :, :8] == 0).all() and (x[..., :, -8:] == 0).all()
        assert all(ss.images[i].reshape(len(i), -1).sum(1).min() > 0 for i in _by_subject(ss).values())  # brain in every kept slice
        # per-volume max scaling: every subject's brightest voxel is exactly 1 (the train split cuts the last subject)
        groups = list(_by_subject(ss).values())
        for idx in groups[:-1] if ss is brain_train else groups: assert ss.images[idx].max() == 1.0
        assert len(set(ss.ids)) == len(ss.ids)
    assert brain_train.masks is None
    for ss in brats.values(): assert ss.masks.dtype == bool and ss.masks.shape == (len(ss), 1, 128, 128)


def test_rf_values():
    tr = P.phantom_fundus('train', n_images=3, **NC)
    te = P.phantom_ddr(n_images=4, **NC)
    for ss in (tr, te):
        assert ss.modality == 'RF' and ss.images.shape[1:] == (3, 128, 128) and ss.images.dtype == np.float32
        assert 0 <= ss.images.min() and ss.images.max() <= 1
        assert (ss.images[:, :, :2, :2] == 0).all()  # outside the circular field of view
    assert tr.masks is None and te.masks.dtype == bool
    assert te.labels.tolist() == [0, 0, 1, 1]  # official order: healthy first, then unhealthy
    assert te.ids[:2] == ['healthy/0000', 'healthy/0001'] and te.ids[2] == 'unhealthy/0000'


def test_brain_coverage_at_most_39_percent(brain_train):
    cov = (brain_train.images[:, 0] > 0).mean((1, 2))
    assert 0.30 < cov.max() <= 0.39, cov.max()
    # the same share as the MNI brain itself in a 240×240 field of view (independent of the phantom's code path)
    mask = P.mni_tissues()['brain']
    fov = np.zeros((240, 240, mask.shape[2]), np.float32)
    fov[P.PAD[0]:P.PAD[0] + mask.shape[0], P.PAD[1]:P.PAD[1] + mask.shape[1]] = mask
    ref = resize(np.moveaxis(fov, 2, 0), (mask.shape[2], 128, 128), order=1, anti_aliasing=True)
    assert abs(cov.max() - (ref > 0).mean((1, 2)).max()) < 0.03


def test_train_val_split_is_95_5_in_order():
    tr = P.phantom_brain('train', 't2', n_subjects=2, slice_step=15, **NC)
    va = P.phantom_brain('val', 't2', n_subjects=2, slice_step=15, **NC)
    n = len(tr) + len(va)
    assert len(tr) == int(0.95 * n) and len(va) == n - int(0.95 * n)
    assert va.ids[-1].startswith('sub001/') and tr.ids[0].startswith('sub000/')
    assert not set(tr.ids) & set(va.ids)


# ---------------------------------------------------------------- contrast
def test_t1_t2_tissue_orderings():
    out = P.brain_subject(0, 'brain', 0, 12, with_tissues=True)
    t = out['tissues']
    pure = {k: t[k] > 0.9 for k in ('wm', 'gm', 'csf')}
    m1 = {k: out['t1'][0][v].mean() for k, v in pure.items()}
    m2 = {k: out['t2'][0][v].mean() for k, v in pure.items()}
    assert all(v.sum() > 50 for v in pure.values())
    assert m1['wm'] > m1['gm'] > m1['csf'], m1
    assert m2['csf'] > m2['gm'] > m2['wm'], m2


def test_brats_same_masks_both_sequences_and_t2_more_conspicuous(brats):
    t1, t2 = brats['t1'], brats['t2']
    assert t1.ids == t2.ids
    np.testing.assert_array_equal(t1.masks, t2.masks)
    assert 0 < t1.labels.mean() < 1
    ratios = []
    for i in range(3):
        b = P.brain_subject(0, 'brats', i, 20, lesion='tumour', with_healthy=True)
        d = {s: np.abs(b[s][0] - b['healthy'][s])[b[s][1]].mean() for s in P.SEQUENCES}
        ratios.append(d['t2'] / d['t1'])
    assert np.mean(ratios) > 2, ratios


def test_brats_labels_follow_the_real_mask_rule():
    "Masks are produced at 1 mm with BraTS labels (1, 2, 4) and binarised after resizing, like the real ones."
    p = P.tumour_params(np.random.default_rng(3))
    subj = P.BrainSubject(np.random.default_rng(3), deform=0)
    zs = [int(round(p['center'][2]))]
    q = subj.warp_planes(zs)
    lab, layers = P.tumour_layers(p, q, P.sample_tissues(P.mass_effect(q, p)))
    assert set(np.unique(lab)) <= {0, 1, 2, 4} and 2 in lab
    full = P._to_fov(lab)
    _, m, _ = P.preprocess_mri(P._to_fov(np.ones_like(lab)), full)
    np.testing.assert_array_equal(m, resize(full.astype(np.float64), (1, 128, 128), order=1, anti_aliasing=True) > 0.4)


def test_mass_effect_is_monotone():
    p = dict(center=np.zeros(3), mass=0.3, r_wt=30.0)
    r = np.linspace(0, 150, 400)
    q = np.stack([r, np.zeros_like(r), np.zeros_like(r)])
    rr = P.mass_effect(q, p)[0]
    assert (np.diff(rr) > 0).all() and (rr <= r + 1e-12).all() and abs(rr[-1] - r[-1]) < 1e-3


# ---------------------------------------------------------------- lesion statistics
def test_atlas_anomalous_fraction_about_30_percent():
    # many subjects with few planes each: the subject-to-subject spread of stroke sizes dominates the variance
    ss = P.phantom_atlas(n_subjects=40, slice_step=45, **NC)
    st = P.lesion_stats(ss)
    assert 0.22 <= st['anomalous_fraction'] <= 0.40, st  # paper: .30
    assert 0.01 <= st['random_AP_p'] <= 0.035, st  # paper: .02
    x = ss.images[:, 0]; m = ss.masks[:, 0]
    assert x[m].mean() < x[(x > 0) & ~m].mean()  # hypo-intense in T1


def test_ddr_microaneurysms_are_1_to_4_pixels():
    sizes = []
    for i in range(6):
        x, m, types = P.fundus_image(0, 'ddr', (1, i), lesions=True)
        assert set(types) == set(P.DR_TYPES)
        np.testing.assert_array_equal(m, np.logical_or.reduce(list(types.values())))
        sizes += np.bincount(label(types['MA'], connectivity=2).ravel())[1:].tolist()
    sizes = np.array(sizes)
    assert len(sizes) >= 6 and sizes.min() >= 1 and sizes.max() <= 4, sizes


# ---------------------------------------------------------------- disjoint subjects
def test_train_and_test_subjects_are_disjoint(brain_train, brats):
    atlas = P.phantom_atlas(n_subjects=2, slice_step=20, **NC)
    subj = lambda ss: {i.split('/')[0] for i in ss.ids}
    assert not subj(brain_train) & subj(brats['t1']) and not subj(brain_train) & subj(atlas)
    # different anatomy, not just different names: subject i of each stream has its own transform
    for i in range(3):
        s = [P.BrainSubject(P._rng(0, k, i, 0)).scale for k in ('brain', 'brats', 'atlas')]
        assert not np.allclose(s[0], s[1]) and not np.allclose(s[0], s[2])
    flat = lambda ss: {x.tobytes() for x in ss.images}
    assert not flat(brain_train) & flat(brats['t1'])
    fundus, ddr = P.phantom_fundus('train', n_images=4, **NC), P.phantom_ddr(n_images=4, **NC)
    assert not flat(fundus) & flat(ddr)


# ---------------------------------------------------------------- cache
def test_cache_hit_identical_and_no_rebuild(tmp_path, monkeypatch):
    a = P.phantom_brats('t1', n_subjects=1, slice_step=30, cache_dir=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.glob('*.npz'))
    assert len(files) == 2 and all(f.startswith('phantom-brats-t') for f in files)  # T1 and T2 cached together
    monkeypatch.setattr(P, '_mri_sets', lambda *a, **k: pytest.fail('rebuilt despite a valid cache'))
    b = P.phantom_brats('t1', n_subjects=1, slice_step=30, cache_dir=tmp_path, progress=False)
    c = P.phantom_brats('t2', n_subjects=1, slice_step=30, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(a.images, b.images); np.testing.assert_array_equal(a.masks, b.masks)
    assert a.ids == b.ids == c.ids
    # a different key (seed) is a different file
    monkeypatch.undo()
    P.phantom_brats('t1', seed=1, n_subjects=1, slice_step=30, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob('*.npz'))) == 4


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'tamper'])
def test_corrupt_cache_is_detected_and_regenerated(tmp_path, damage):
    kw = dict(n_images=4, cache_dir=tmp_path, progress=False)
    a = P.phantom_ddr(**kw)
    (path,) = tmp_path.glob('*.npz')
    if damage == 'truncate': path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif damage == 'garbage': path.write_bytes(b'not a zip file at all')
    else:  # a readable file whose content no longer matches its checksum
        ss = load_sliceset(path); ss.images[0, 0, 60, 60] = 0.5; save_sliceset(ss, path)
    with pytest.warns(RuntimeWarning, match='corrupt or stale'):
        b = P.phantom_ddr(**kw)
    np.testing.assert_array_equal(a.images, b.images); np.testing.assert_array_equal(a.masks, b.masks)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        c = P.phantom_ddr(**kw)  # repaired: loads cleanly now
    np.testing.assert_array_equal(a.images, c.images)
    assert not list(tmp_path.glob('.*'))  # atomic writes leave no temporary files


def test_cache_dir_default_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv('CONDIFF_CACHE', str(tmp_path / 'cc'))
    assert P.phantom_cache_dir() == tmp_path / 'cc' / 'phantom'
    assert P.phantom_cache_dir(tmp_path / 'x') == tmp_path / 'x' and P.phantom_cache_dir(False) is None
    P.phantom_fundus('val', n_images=2, progress=False)
    assert len(list((tmp_path / 'cc' / 'phantom').glob('phantom-fundus-v*.npz'))) == 1
    monkeypatch.delenv('CONDIFF_CACHE')
    assert P.phantom_cache_dir() == Path('~/.cache/condiff/phantom').expanduser()


# ---------------------------------------------------------------- bad parameters
@pytest.mark.parametrize('call, match', [
    (lambda: P.phantom_brain('test', 't1', **NC), 'split'),
    (lambda: P.phantom_brain('train', 'flair', **NC), 'sequence'),
    (lambda: P.phantom_brats('t3', **NC), 'sequence'),
    (lambda: P.phantom_brats('t1', seed=-1, **NC), 'seed'),
    (lambda: P.phantom_brats('t1', seed=1.5, **NC), 'seed'),
    (lambda: P.phantom_brats('t1', seed=True, **NC), 'seed'),
    (lambda: P.phantom_atlas(n_subjects=0, **NC), 'n_subjects'),
    (lambda: P.phantom_atlas(n_subjects=2.0, **NC), 'n_subjects'),
    (lambda: P.phantom_atlas(slice_step=0, **NC), 'slice_step'),
    (lambda: P.phantom_atlas(slice_step=500, **NC), 'slice_step'),
    (lambda: P.phantom_fundus('test', **NC), 'split'),
    (lambda: P.phantom_fundus('train', n_images=1, **NC), 'n_images'),
    (lambda: P.phantom_ddr(n_images=1, **NC), 'n_images'),
    (lambda: P.phantom_ddr(n_images='80', **NC), 'n_images'),
    (lambda: P.brain_subject(0, 'brain', 0, 30, lesion='cyst'), 'lesion'),
])
def test_bad_parameters_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match): call()


# ---------------------------------------------------------------- the contract other modules use
def test_get_dataset_reaches_the_phantoms():
    from condiff.experiment import get_dataset
    a = get_dataset('phantom-brats', 'test', 't2', n_subjects=1, slice_step=30, **NC)
    b = P.phantom_brats('t2', n_subjects=1, slice_step=30, **NC)
    assert isinstance(a, SliceSet) and a.ids == b.ids
    np.testing.assert_array_equal(a.images, b.images)
