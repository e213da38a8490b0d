"""condiff.data: the benchmark preprocessing checked step by step against hand-computed expectations and
scikit-image, on small NIfTI / PNG / JPEG files written in the official layouts; splits, caching, bad input,
phantom dispatch and atlas registration (dipy, when installed)."""
import gzip
import logging
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from skimage.transform import resize as sk_resize

import condiff.data as D
from condiff.data import SliceSet, load_folder, load_fundus, load_fundus_mask, load_sliceset, preprocess_volume, read_volume, split_slices, split_volumes, to_model_space
from condiff.experiment import get_dataset

BRATS = 'MRI/BraTS/MICCAI_BraTS2020_TrainingData'
ATLAS = 'MRI/ATLAS/ATLAS_2/Training'
CAMCAN = 'MRI/CamCAN'
DDR = 'RF/DDR-dataset'


# ---------------------------------------------------------------- helpers that write files
def write_nii(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


def ellipsoid(shape, value=100.0, z_empty=()):
    "A bright ellipsoid filling most of the field; the listed axial slices are zeroed."
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij')
    r = np.sqrt((g[0] / 0.8) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 3) ** 2)
    v = np.where(r < 1, value * (1.5 - r), 0.0).astype(np.float32)
    for z in z_empty: v[:, :, z] = 0
    return v


def write_brats(root, n, shape=(16, 16, 5), lesion_case=None):
    "n BraTS cases (t1 and t2 registered + anomaly_segmentation.nii); written in reverse order."
    for i in reversed(range(1, n + 1)):
        case = root / BRATS / f'BraTS20_Training_{i:03d}'
        t1 = ellipsoid(shape, 10.0 * i)
        t2 = ellipsoid(shape, 20.0 * i) + 1.0 * (ellipsoid(shape) > 0)
        seg = np.zeros(shape, np.int16)
        if lesion_case is None or lesion_case == i: seg[4:7, 5:9, 2] = [1, 2, 4][i % 3]
        write_nii(case / f'BraTS20_Training_{i:03d}_t1_registered.nii', t1)
        write_nii(case / f'BraTS20_Training_{i:03d}_t2_registered.nii', t2)
        write_nii(case / 'anomaly_segmentation.nii', seg)
    return root


def write_camcan(root, subjects, shape=(16, 16, 6), sub='', z_empty=()):
    for s in reversed(subjects):
        d = root / CAMCAN / sub / s
        for seq, val in (('T1', 50.0), ('T2', 80.0)):
            write_nii(d / f'{s}_{seq}w_stripped_registered.nii.gz', ellipsoid(shape, val, z_empty))
    return root


def atlas_dir(root, i):
    return root / ATLAS / f'R{i:03d}' / f'sub-r{i:03d}s001' / 'ses-1' / 'anat'


def write_atlas(root, n, shape=(16, 16, 4)):
    for i in range(1, n + 1):
        d = atlas_dir(root, i)
        v = ellipsoid(shape, 1.0)          # brain values in (0, 1.5]
        v[0, 0, :] = 0.05                  # below ATLAS's 0.1 threshold, above 1e-4
        seg = np.zeros(shape, np.int16); seg[6:9, 6:9, 1] = 1
        write_nii(d / f'sub-r{i:03d}s001_ses-1_space-orig_T1w_stripped_registered.nii.gz', v)
        write_nii(d / 'anomaly_segmentation.nii.gz', seg)
    return root


def write_ddr(root, n_healthy=12, n_anom=6, size=(200, 160)):
    "Healthy .jpg, unhealthy images as JPEG bytes named .png (as the official copy), 0/255 PNG masks."
    h = root / DDR / 'healthy'; ui = root / DDR / 'unhealthy' / 'images'; us = root / DDR / 'unhealthy' / 'segmentations'
    for d in (h, ui, us): d.mkdir(parents=True, exist_ok=True)
    w, hh = size
    for i in range(n_healthy):
        Image.fromarray(np.full((hh, w, 3), (20 + i, 100, 50), np.uint8)).save(h / f'h{i:03d}.jpg', quality=95)
    for i in range(n_anom):
        Image.fromarray(np.full((hh, w, 3), (200, 30 + i, 60), np.uint8)).save(ui / f'a{i:03d}.png', format='JPEG')
        m = np.zeros((hh, w), np.uint8)
        if i % 2 == 0: m[60:80, 80:110] = 255        # a blot that survives
        else: m[62, 82] = 255                         # one pixel that nearest resampling skips (see below)
        Image.fromarray(m).save(us / f'a{i:03d}.png')
    return root


def cache_files(d):
    return sorted(p.name for p in d.rglob('*')) if d.exists() else []


# ---------------------------------------------------------------- step by step


# ---------------------------------------------------------------- layouts, splits, summaries
def test_camcan_sorted_volumes_and_95_5_split(tmp_path, caplog):
    subs = [f'sub-CC{i:06d}' for i in (110033, 110037, 110045)]
    write_camcan(tmp_path, subs, shape=(16, 16, 20), z_empty=(0, 19))      # 18 kept slices each: N = 54
    with caplog.at_level(logging.INFO, logger='condiff.data'):
        tr = get_dataset('camcan', 'train', 't2', root=tmp_path, cache_dir=False, size=16, progress=False)
    va = get_dataset('camcan', 'val', 't2', root=tmp_path, cache_dir=False, size=16, progress=False)
    assert len(tr) == int(0.95 * 54) == 51 and len(va) == 3
    assert tr.ids[0] == 'sub-CC110033/z001' and va.ids == [f'sub-CC110045/z0{z}' for z in (16, 17, 18)]
    assert tr.masks is None and tr.modality == 'MRI' and tr.images.shape[1:] == (1, 16, 16)
    assert tr.name == 'camcan-t2-train' and tr.meta['summary']['slices'] == 51
    assert any('54 slices' in r.getMessage() for r in caplog.records)
    # the folder the official preparation script moves subjects to is accepted too
    write_camcan(tmp_path, ['sub-CC120000'], shape=(16, 16, 20), sub='normal')
    tr2 = get_dataset('camcan', 'train', 't1', root=tmp_path, cache_dir=False, size=16, progress=False)
    assert tr2.meta['volumes'][0] == 'sub-CC120000' and len(tr2) == int(0.95 * (54 + 20))  # sorted by path: 'normal/' < 'sub-'


# ---------------------------------------------------------------- DDR


# ---------------------------------------------------------------- bad input: clear errors, nothing half-written


# ---------------------------------------------------------------- cache
def test_cache_hit_key_and_invalidation(tmp_path, monkeypatch):
    write_brats(tmp_path, 3)
    cache = tmp_path / 'cache'
    kw = dict(root=tmp_path, cache_dir=cache, size=16, progress=False)
    first = get_dataset('brats', 'test', 't2', **kw)
    assert len(list(cache.glob('brats-t2-test-*.npz'))) == 1
    calls = []
    real = D.preprocess_volume
    monkeypatch.setattr(D, 'preprocess_volume', lambda *a, **k: calls.append(a) or real(*a, **k))
    second = get_dataset('brats', 'test', 't2', **kw)
    assert calls == [] and second.ids == first.ids and np.array_equal(second.images, first.images)
    get_dataset('brats', 'test', 't2', test_split='all', **kw)           # same pool: still cached
    assert calls == []
    get_dataset('brats', 'test', 't2', **{**kw, 'size': 8})              # preprocessing option: a new entry
    assert len(calls) == 3 and len(list(cache.glob('*.npz'))) == 2
    f = tmp_path / BRATS / 'BraTS20_Training_001' / 'BraTS20_Training_001_t2_registered.nii'
    st = os.stat(f); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # an edited file: rebuilt
    get_dataset('brats', 'test', 't2', **kw)
    assert len(calls) == 6 and len(list(cache.glob('*.npz'))) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith('.')]    # no temporary files left
    # a corrupt cache entry is rebuilt, not trusted
    for p in cache.glob('*.npz'): p.write_bytes(b'broken')
    again = get_dataset('brats', 'test', 't2', **kw)
    assert np.array_equal(again.images, first.images)
    assert isinstance(load_sliceset(max(cache.glob('*.npz'), key=os.path.getmtime)), SliceSet)


def test_cache_disabled_and_default_location(tmp_path, monkeypatch):
    write_brats(tmp_path, 2)
    monkeypatch.setenv('CONDIFF_CACHE', str(tmp_path / 'env'))
    assert D.default_cache_dir() == tmp_path / 'env' / 'real'
    get_dataset('brats', 'test', 't1', root=tmp_path, cache_dir=False, size=8, progress=False)
    assert not (tmp_path / 'env').exists()
    get_dataset('brats', 'test', 't1', root=tmp_path, size=8, progress=False)
    assert len(list((tmp_path / 'env' / 'real').glob('brats-t1-test-*.npz'))) == 1


# ---------------------------------------------------------------- phantoms are dispatched lazily
def test_phantom_dispatch(monkeypatch):
    "get_dataset reaches the phantoms through the registry they fill (condiff.phantom.phantom_dataset)."
    import condiff.phantom as fake
    calls = []
    def rec(fn):
        def f(*a, **k):
            calls.append((fn, a, k))
            return SliceSet(np.zeros((1, 1, 4, 4), np.float32), ['x/z000'], name=fn)
        return f
    for fn in ('phantom_brain', 'phantom_brats', 'phantom_atlas', 'phantom_fundus', 'phantom_ddr'):
        monkeypatch.setattr(fake, fn, rec(fn))
    get_dataset('phantom-brain', 'val', 'T2', seed=3, cache_dir='/c')
    get_dataset('phantom-brats', 'test', 't1', seed=4)
    get_dataset('phantom-atlas', 'test', seed=5, n_subjects=2)
    get_dataset('phantom-fundus', 'train')
    get_dataset('phantom-ddr', 'test', seed=7)
    assert calls == [('phantom_brain', ('val', 't2'), dict(seed=3, cache_dir='/c')),
                     ('phantom_brats', ('t1',), dict(seed=4, cache_dir=None)),
                     ('phantom_atlas', (), dict(seed=5, cache_dir=None, n_subjects=2)),
                     ('phantom_fundus', ('train',), dict(seed=0, cache_dir=None)),
                     ('phantom_ddr', (), dict(seed=7, cache_dir=None))]
    with pytest.raises(ValueError, match="split must be 'test'"): get_dataset('phantom-ddr', 'train')
    with pytest.raises(ValueError, match="'train' or 'val'"): get_dataset('phantom-brain', 'test', 't1')
    with pytest.raises(ValueError, match="sequence 't1' or 't2'"): get_dataset('phantom-brats', 'test')


# ---------------------------------------------------------------- registration (dipy, optional extra)
def blob(n=36, shift=(0, 0, 0)):
    g = np.mgrid[:n, :n, :n].astype(float) - n / 2 + 0.5
    g = g - np.asarray(shift, float)[:, None, None, None]
    r = np.sqrt((g[0] / 12) ** 2 + (g[1] / 9) ** 2 + (g[2] / 10) ** 2)
    inner = np.exp(-(((g[0] - 4) / 3) ** 2 + ((g[1] + 2) / 2) ** 2 + (g[2] / 3) ** 2) / 2)
    return (100 / (1 + np.exp((r - 1) * 12)) + 60 * inner).astype(np.float32), (r < 0.6).astype(np.int16)


def dice(a, b): return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_register_to_atlas_recovers_a_shift(tmp_path):
    pytest.importorskip('dipy')
    A = np.diag([2.0, 2.0, 2.0, 1.0])
    (atlas, atlas_mask), (mov, mov_mask) = blob(), blob(shift=(3, -2, 1.5))
    write_nii(tmp_path / 'atlas.nii.gz', atlas, A)
    write_nii(tmp_path / 'mov.nii.gz', mov, A); write_nii(tmp_path / 'mov_mask.nii.gz', mov_mask, A)
    aff = D.register_to_atlas(tmp_path / 'mov.nii.gz', tmp_path / 'atlas.nii.gz', tmp_path / 'out' / 'reg.nii.gz',
                              [(tmp_path / 'mov_mask.nii.gz', tmp_path / 'out' / 'mask.nii.gz')])
    np.testing.assert_allclose(aff[:3, 3], [6, -4, 3], atol=0.5)           # 2 mm × the voxel shift
    np.testing.assert_allclose(aff[:3, :3], np.eye(3), atol=0.05)
    reg = nib.load(tmp_path / 'out' / 'reg.nii.gz')
    assert reg.shape == atlas.shape and np.allclose(reg.affine, A) and reg.get_data_dtype() == np.float32
    assert np.corrcoef(reg.get_fdata().ravel(), atlas.ravel())[0, 1] > 0.99
    assert dice(nib.load(tmp_path / 'out' / 'mask.nii.gz').get_fdata() > 0.4, atlas_mask > 0) > 0.9
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['mask.nii.gz', 'reg.nii.gz']
    # a mask that is not on the moving grid is refused before anything is written
    write_nii(tmp_path / 'small_mask.nii.gz', mov_mask[:20], A)
    with pytest.raises(ValueError, match='small_mask.nii.gz: shape'):
        D.register_to_atlas(tmp_path / 'mov.nii.gz', tmp_path / 'atlas.nii.gz', tmp_path / 'x.nii.gz',
                            [(tmp_path / 'small_mask.nii.gz', tmp_path / 'y.nii.gz')])
    assert not (tmp_path / 'x.nii.gz').exists()


def test_register_without_dipy_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'dipy.align.imaffine', None)
    with pytest.raises(ImportError, match=r"condiff\[register\]"):
        D.register_to_atlas(tmp_path / 'a.nii', tmp_path / 'b.nii', tmp_path / 'c.nii')


def test_prepare_brats_then_load(tmp_path):
    pytest.importorskip('dipy')
    A = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas, _ = blob()
    write_nii(tmp_path / 'T1_brain.nii', atlas, A)
    case = tmp_path / BRATS / 'BraTS20_Training_001'
    mov, mask = blob(shift=(2, 1, -1))
    write_nii(case / 'BraTS20_Training_001_t1.nii', mov, A)
    write_nii(case / 'BraTS20_Training_001_t2.nii', mov * 2, A)
    write_nii(case / 'BraTS20_Training_001_seg.nii', (mask * 2).astype(np.int16), A)
    out = D.prepare_dataset('brats', tmp_path, tmp_path / 'T1_brain.nii', progress=False)
    assert sorted(p.name for p in out) == ['BraTS20_Training_001_t1_registered.nii',
                                           'BraTS20_Training_001_t2_registered.nii', 'anomaly_segmentation.nii']
    assert D.prepare_dataset('brats', tmp_path, tmp_path / 'T1_brain.nii', progress=False) == []   # already done
    ss = get_dataset('brats', 'test', 't2', root=tmp_path, cache_dir=False, size=16, slice_range=None,
                     test_split='all', progress=False)
    assert ss.meta['volumes'] == ['BraTS20_Training_001'] and ss.labels.sum() > 0
    (tmp_path / ATLAS).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='skull-strip'):
        D.prepare_dataset('atlas', tmp_path, tmp_path / 'T1_brain.nii')
