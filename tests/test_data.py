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
def test_read_volume_moves_axial_axis_first(tmp_path):
    d = np.zeros((4, 6, 3), np.float64); d[1, 5, 2] = 7.0; d[3, 0, 0] = 2.0
    v = read_volume(write_nii(tmp_path / 'm.nii.gz', d))
    assert v.shape == (3, 4, 6) and v.dtype == np.float32
    assert v[2, 1, 5] == 7.0 and v[0, 3, 0] == 2.0 and v.sum() == 9.0
    v4 = read_volume(write_nii(tmp_path / 'm4.nii', d[..., None]))  # a trailing 4th axis of 1 is squeezed
    assert np.array_equal(v4, v)


def test_crop_square_by_hand():
    v = np.arange(2 * 130 * 128, dtype=np.float32).reshape(2, 130, 128)
    assert np.array_equal(D.crop_square(v), v[:, 1:129, :])
    v = np.arange(2 * 128 * 131, dtype=np.float32).reshape(2, 128, 131)
    assert np.array_equal(D.crop_square(v), v[:, :, 1:129])  # (131-128)//2 = 1 .. (131+128)//2 = 129
    assert D.crop_square(v).shape == (2, 128, 128)


def test_native_size_pipeline_exact(tmp_path):
    "At size == in-plane size the resize is the identity: every value can be written down by hand."
    d = np.zeros((4, 4, 3), np.float32)
    d[:, :, 1] = [[0, 5e-5, 0.5, 2.0], [-3, 1e-4, 1.0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    d[0, 0, 2] = 4e-5                                  # only haze: the slice becomes empty and is dropped
    img, mask, z = preprocess_volume(write_nii(tmp_path / 'v.nii.gz', d), size=4)
    assert z.tolist() == [1] and mask is None and img.shape == (1, 1, 4, 4)
    want = np.zeros((4, 4), np.float32)
    want[0] = [0, 0, 0.25, 1.0]; want[1] = [0, np.float32(1e-4) / 2, 0.5, 0]
    np.testing.assert_allclose(img[0, 0], want, rtol=1e-6, atol=0)
    # ATLAS threshold 0.1 also zeroes 1e-4
    img, _, _ = preprocess_volume(tmp_path / 'v.nii.gz', size=4, zero_below=0.1)
    assert img[0, 0, 1, 1] == 0 and img[0, 0, 0, 3] == 1.0


def test_resize_matches_skimage_per_slice(tmp_path):
    "Oracle: skimage resize of each 2-D slice (order 1, anti-aliasing, reflect) / volume max equals the pipeline."
    rng = np.random.default_rng(0)
    vol = ellipsoid((240, 240, 3), 300.0) * (1 + 0.2 * rng.random((240, 240, 3), dtype=np.float32))
    img, _, z = preprocess_volume(write_nii(tmp_path / 'v.nii.gz', vol))
    slices = [sk_resize(vol[:, :, k], (128, 128), order=1, mode='reflect', anti_aliasing=True) for k in range(3)]
    ref = np.stack(slices); ref = ref / ref.max()
    assert img.shape == (3, 1, 128, 128) and z.tolist() == [0, 1, 2]
    np.testing.assert_allclose(img[:, 0], ref, rtol=0, atol=2e-6)


def test_resize_half_plane_by_hand(tmp_path):
    vol = np.zeros((240, 240, 1), np.float32); vol[:120] = 5.0     # top half of every axial slice
    img = preprocess_volume(write_nii(tmp_path / 'h.nii', vol))[0][0, 0]
    assert (img[:62] == 1).all() and (img[66:] == 0).all()          # far from the edge: exact
    assert 0 < img[63, 0] < 1 and np.all(np.diff(img[:, 5]) <= 0)   # a monotone ramp across it


def test_per_volume_max_and_orientation_after_crop(tmp_path):
    a = ellipsoid((20, 16, 3), 10.0); b = ellipsoid((20, 16, 3), 1000.0)
    a[3, 15, 1] = 50.0                    # row 3 of 20 -> row 1 after the centre crop (20-16)//2 = 2
    ia = preprocess_volume(write_nii(tmp_path / 'a.nii', a), size=16)[0]
    ib = preprocess_volume(write_nii(tmp_path / 'b.nii', b), size=16)[0]
    assert ia.max() == 1.0 and ib.max() == 1.0
    assert ia[1, 0, 1, 15] == 1.0 and np.count_nonzero(ia == 1.0) == 1
    np.testing.assert_allclose(ia[0, 0] * 50 / 15, b[2:18, :, 0] / 1000 * 10 / 15, rtol=1e-5)


def test_mask_threshold_and_label_merge(tmp_path):
    vol = ellipsoid((8, 8, 2), 10.0)
    seg = np.zeros((8, 8, 2), np.float32)
    seg[2, 2:8, 0] = [0.3, 0.4, 0.41, 1, 2, 4]         # > 0.4 strictly; BraTS labels 1, 2, 4 all become lesion
    _, m, _ = preprocess_volume(write_nii(tmp_path / 'v.nii', vol), write_nii(tmp_path / 's.nii', seg), size=8)
    assert m.dtype == bool and m.shape == (2, 1, 8, 8)
    assert m[0, 0, 2].tolist() == [False, False, False, False, True, True, True, True]
    assert m.sum() == 4


def test_labels_survive_linear_interpolation_unequally(tmp_path):
    "The official quirk: labels are interpolated as numbers, so a lone 4 survives a 2× reduction where a lone 1 does not."
    vol = ellipsoid((16, 16, 1), 10.0)
    seg = np.zeros((16, 16, 1), np.int16); seg[4, 4, 0] = 4; seg[10, 10, 0] = 1
    _, m, _ = preprocess_volume(write_nii(tmp_path / 'v.nii', vol), write_nii(tmp_path / 's.nii', seg), size=8)
    ref = sk_resize(seg[:, :, 0].astype(np.float32), (8, 8), order=1, mode='reflect', anti_aliasing=True) > 0.4
    assert np.array_equal(m[0, 0], ref)
    assert m[0, 0, :4, :4].any() and not m[0, 0, 4:, 4:].any()


def test_empty_slices_dropped_masks_aligned_and_slice_range(tmp_path):
    vol = ellipsoid((8, 8, 6), 10.0, z_empty=(0, 1, 5))
    seg = np.zeros((8, 8, 6), np.int16); seg[3, 3, 3] = 1; seg[3, 3, 0] = 1   # z=0 has no brain: dropped with its mask
    img, m, z = preprocess_volume(write_nii(tmp_path / 'v.nii', vol), write_nii(tmp_path / 's.nii', seg), size=8)
    assert z.tolist() == [2, 3, 4] and m.reshape(3, -1).any(1).tolist() == [False, True, False]
    img, m, z = preprocess_volume(tmp_path / 'v.nii', tmp_path / 's.nii', size=8, slice_range=(3, 5))
    assert z.tolist() == [3, 4] and img.max() == 1.0


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


def test_brats_big_small_all_and_fraction(tmp_path):
    write_brats(tmp_path, 10)
    kw = dict(root=tmp_path, size=16, progress=False, cache_dir=tmp_path / 'cache')
    big = get_dataset('brats', 'test', 't2', **kw)
    assert big.meta['volumes'] == [f'BraTS20_Training_{i:03d}' for i in range(1, 10)]   # int(0.9·10) = 9, sorted
    assert len(big) == 9 * 5 and big.labels.sum() == 9 and big.images.max() == 1.0
    assert big.ids[2] == 'BraTS20_Training_001/z002' and big.labels[2] == 1
    small = get_dataset('brats', 'test', 't2', test_split='small', **kw)
    assert small.meta['volumes'] == ['BraTS20_Training_010']
    assert len(get_dataset('brats', 'test', 't2', test_split='all', **kw)) == 50
    assert get_dataset('brats', 'test', 't2', test_split=0.5, **kw).meta['volumes'][-1] == 'BraTS20_Training_005'
    t1 = get_dataset('brats', 'test', 't1', **kw)
    assert t1.meta['files'][0].endswith('_t1_registered.nii') and big.meta['files'][0].endswith('_t2_registered.nii')
    s = big.meta['summary']
    assert s == dict(volumes=9, slices=45, anomalous_slices=9, anomalous_fraction=0.2,
                     lesion_pixel_fraction=float(big.masks.mean()))


def test_atlas_layout_threshold_and_ids(tmp_path):
    write_atlas(tmp_path, 3)
    at = get_dataset('atlas', 'test', root=tmp_path, cache_dir=False, size=16, test_split='all', progress=False)
    assert at.meta['volumes'][0] == 'R001/sub-r001s001/ses-1/anat' and at.ids[0] == 'R001/sub-r001s001/ses-1/anat/z000'
    assert at.images[:, 0, 0, 0].max() == 0         # 0.05 < 0.1: zeroed for ATLAS
    assert at.labels.tolist() == [0, 1, 0, 0] * 3
    cam_like = preprocess_volume(atlas_dir(tmp_path, 1) / 'sub-r001s001_ses-1_space-orig_T1w_stripped_registered.nii.gz', size=16)[0]
    assert cam_like[0, 0, 0, 0] > 0                   # with the default 1e-4 it would have stayed
    assert len(get_dataset('atlas', 'test', 't1', root=tmp_path, cache_dir=False, size=16, progress=False).meta['volumes']) == 2


def test_split_helpers_views_and_counts():
    ids = [f'v{v}/z{z:03d}' for v in range(4) for z in range(5)]
    ss = SliceSet(np.random.default_rng(0).random((20, 1, 4, 4), dtype=np.float32), ids, meta=dict(volumes=[f'v{v}' for v in range(4)]))
    tr, va = split_slices(ss, 0.95)
    assert (len(tr), len(va)) == (19, 1) and np.shares_memory(tr.images, ss.images)
    assert split_volumes(ss, 'big').meta['volumes'] == ['v0', 'v1', 'v2']      # int(0.9·4) = 3
    assert split_volumes(ss, 'small').ids == ids[15:]
    for bad in ('most', 0, 1.5):
        with pytest.raises(ValueError, match='test_split'): split_volumes(ss, bad)


def test_load_folder_generic(tmp_path):
    for i in (3, 1, 2):
        write_nii(tmp_path / 'data' / 'scans' / f'p{i}.nii.gz', ellipsoid((12, 12, 3), 5.0 * i))
        seg = np.zeros((12, 12, 3), np.int16); seg[5:7, 5:7, 1] = i
        write_nii(tmp_path / 'data' / 'masks' / f'p{i}_lesion.nii.gz', seg)
    ss = load_folder(tmp_path / 'data', 'scans/*.nii.gz', '../masks/{stem}_lesion.nii.gz', size=12, progress=False)
    assert ss.meta['volumes'] == ['scans/p1', 'scans/p2', 'scans/p3'] and len(ss) == 9
    assert ss.labels.tolist() == [0, 1, 0] * 3
    ss2 = load_folder(tmp_path / 'data', '**/*.nii.gz', '../masks/{stem}_les*', size=12, progress=False)
    assert ss2.meta['volumes'] == ss.meta['volumes']        # masks found by a glob are not loaded as volumes
    write_nii(tmp_path / 'data' / 'masks' / 'p1_lesion2.nii.gz', np.zeros((12, 12, 3), np.int16))
    with pytest.raises(ValueError, match=r'p1\.nii\.gz: 2 masks'):
        load_folder(tmp_path / 'data', 'scans/*.nii.gz', '../masks/{stem}_les*', size=12, progress=False)


def test_workers_do_not_change_the_result(tmp_path):
    write_brats(tmp_path, 3)
    files, masks, ids = D.find_volumes(tmp_path, 'brats', 't2')
    a = D.load_volumes(files, masks, volume_ids=ids, size=8, progress=False, num_workers=0)
    b = D.load_volumes(files, masks, volume_ids=ids, size=8, progress=False, num_workers=2)
    assert a.ids == b.ids and np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)


# ---------------------------------------------------------------- DDR
def test_fundus_resize_crop_by_hand(tmp_path):
    a = np.zeros((128, 160, 3), np.uint8); a[:, :16] = 255; a[:, 144:] = 255; a[:, 16:144, 1] = 100
    Image.fromarray(a).save(tmp_path / 'w.png')
    x = load_fundus(tmp_path / 'w.png')             # short side already 128: only the crop (16 px each side)
    assert x.shape == (3, 128, 128) and x.dtype == np.float32
    assert np.array_equal(np.round(x * 255), np.broadcast_to(np.array([0, 100, 0.0])[:, None, None], x.shape))
    t = np.zeros((320, 256, 3), np.uint8); t[:160] = 255      # W=256 is short: ->128×160, 16 rows cropped top/bottom
    Image.fromarray(t).save(tmp_path / 't.png')
    y = load_fundus(tmp_path / 't.png')
    assert y.shape == (3, 128, 128)
    assert (y[:, :60] == 1).all() and (y[:, 68:] == 0).all()     # boundary at row 80 - 16 = 64
    assert to_model_space(y, 'RF').min() == -1 and to_model_space(y, 'RF').max() == 1


def test_ddr_mask_nearest(tmp_path):
    m = np.zeros((256, 256), np.uint8); m[100, 100] = 255; m[150:152, 40:42] = 255
    Image.fromarray(m).save(tmp_path / 'm.png')
    out = load_fundus_mask(tmp_path / 'm.png')
    # nearest at a 2× reduction keeps source pixel 2i+1: the even single pixel vanishes, the 2×2 blob is one pixel
    assert out.shape == (1, 128, 128) and out.sum() == 1 and out[0, 75, 20]


def test_ddr_official_splits(tmp_path):
    write_ddr(tmp_path, n_healthy=12, n_anom=6)
    kw = dict(root=tmp_path, cache_dir=tmp_path / 'c', progress=False, test_normals=4, train_start=6)
    tr = get_dataset('ddr', 'train', **kw); va = get_dataset('ddr', 'val', **kw)
    assert tr.ids == [f'healthy/h{i:03d}' for i in range(6, 11)] and va.ids == ['healthy/h011']   # int(0.95·6) = 5
    assert tr.modality == 'RF' and tr.images.shape == (5, 3, 128, 128) and tr.masks is None
    te = get_dataset('ddr', 'test', **kw)                       # big: anomalous[:int(0.9·6)=5] then healthy[:int(0.9·4)=3]
    assert te.ids == [f'unhealthy/a{i:03d}' for i in range(5)] + [f'healthy/h{i:03d}' for i in range(3)]
    assert te.labels.tolist() == [1, 0, 1, 0, 1, 0, 0, 0]       # one-pixel masks vanish: those count as normal
    np.testing.assert_allclose(te.images[0, :, 64, 64], np.array([200, 30, 60]) / 255, atol=4 / 255)
    al = get_dataset('ddr', 'test', test_split='all', **kw)
    assert len(al) == 10 and al.meta['n_anomalous_images'] == 6
    sm = get_dataset('ddr', 'test', test_split='small', **kw)
    assert sm.ids == ['unhealthy/a005', 'healthy/h003']
    assert te.meta['summary']['volumes'] is None and te.meta['summary']['anomalous_slices'] == 3
    with pytest.raises(ValueError, match='test_normals'):
        get_dataset('ddr', 'test', root=tmp_path, cache_dir=False, progress=False, test_normals=8, train_start=6)


def test_ddr_official_counts_arithmetic():
    "The counts written in the notebook and cards follow from the official index rules."
    healthy, anomalous = 733 + 24 + 5510, 757
    assert healthy - 757 == 5510 and int(0.95 * 5510) == 5234 and 5510 - 5234 == 276
    assert int(0.9 * 733) + int(0.9 * anomalous) == 659 + 681 == 1340
    assert 733 + 5510 == 6243 and (733, 757 - 12) == (733, 745)


# ---------------------------------------------------------------- bad input: clear errors, nothing half-written
@pytest.mark.parametrize('case', ['nan', 'inf', 'flat', 'garbage', 'truncated_gz', 'truncated_nii', 'empty',
                                  'shape', 'missing_seg'])
def test_bad_volumes_name_the_file_and_leave_no_cache(tmp_path, case):
    write_brats(tmp_path, 3)
    d = tmp_path / BRATS / 'BraTS20_Training_002'
    t2 = d / 'BraTS20_Training_002_t2_registered.nii'
    seg = d / 'anomaly_segmentation.nii'
    bad, msg = t2, None
    if case in ('nan', 'inf'):
        v = ellipsoid((16, 16, 5), 10.0); v[3, 3, 3] = np.nan if case == 'nan' else np.inf
        write_nii(t2, v); msg = 'NaN/Inf'
    elif case == 'flat': write_nii(t2, np.ones((16, 16), np.float32)); msg = 'expected a 3-D volume'
    elif case == 'garbage': t2.write_bytes(b'this is not a NIfTI file at all' * 20); msg = 'cannot read'
    elif case == 'truncated_gz':
        (d / t2.name).unlink(); t2 = d / 'BraTS20_Training_002_t2_registered.nii.gz'; bad = t2
        raw = gzip.compress(nib.Nifti1Image(ellipsoid((16, 16, 5)), np.eye(4)).to_bytes())
        t2.write_bytes(raw[:len(raw) // 2]); msg = 'cannot read'
    elif case == 'truncated_nii':
        raw = t2.read_bytes(); t2.write_bytes(raw[:len(raw) - 400]); msg = 'cannot read'
    elif case == 'empty': write_nii(t2, np.zeros((16, 16, 5), np.float32)); msg = 'empty volume'
    elif case == 'shape': write_nii(seg, np.zeros((16, 16, 4), np.int16)); bad, msg = seg, 'does not match'
    elif case == 'missing_seg': seg.unlink(); bad, msg = seg, 'segmentation not found'
    cache = tmp_path / 'cache'
    err = FileNotFoundError if case == 'missing_seg' else ValueError
    with pytest.raises(err) as e:
        get_dataset('brats', 'test', 't2', root=tmp_path, cache_dir=cache, size=16, progress=False)
    assert str(bad) in str(e.value) and msg in str(e.value)
    assert cache_files(cache) == []


def test_missing_folders_and_no_matching_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='datasets root folder not found'):
        get_dataset('brats', 'test', 't2', root=tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='MICCAI_BraTS2020_TrainingData: brats folder not found'):
        get_dataset('brats', 'test', 't2', root=tmp_path)
    (tmp_path / BRATS / 'BraTS20_Training_001').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no files match '\*/\*t2\*registered\.\*'"):
        get_dataset('brats', 'test', 't2', root=tmp_path, cache_dir=False)
    with pytest.raises(FileNotFoundError, match='DDR-dataset: DDR folder not found'):
        get_dataset('ddr', 'train', root=tmp_path, cache_dir=False)
    with pytest.raises(FileNotFoundError, match='no files match'):
        load_folder(tmp_path, '*.nii.gz')
    with pytest.raises(FileNotFoundError, match='folder not found'):
        load_folder(tmp_path / 'absent')


def test_two_volumes_in_one_folder_is_an_error(tmp_path):
    write_brats(tmp_path, 2)
    d = tmp_path / BRATS / 'BraTS20_Training_001'
    write_nii(d / 'BraTS20_Training_001_t1ce_registered.nii', ellipsoid((16, 16, 5)))
    with pytest.raises(ValueError, match='BraTS20_Training_001: more than one volume'):
        get_dataset('brats', 'test', 't1', root=tmp_path, cache_dir=False)


@pytest.mark.parametrize('case', ['corrupt', 'truncated', 'mask_size', 'unpaired'])
def test_bad_fundus_files(tmp_path, case):
    write_ddr(tmp_path, 8, 4)
    ui = tmp_path / DDR / 'unhealthy' / 'images'; us = tmp_path / DDR / 'unhealthy' / 'segmentations'
    if case == 'corrupt': bad = ui / 'a001.png'; bad.write_bytes(b'\x89PNG but not really'); msg = 'cannot read'
    elif case == 'truncated':
        bad = ui / 'a002.png'; raw = bad.read_bytes(); bad.write_bytes(raw[:len(raw) // 2]); msg = 'cannot read'
    elif case == 'mask_size':
        bad = us / 'a003.png'; Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad); msg = 'does not match'
    else: bad = us / 'a003.png'; bad.rename(us / 'zzz.png'); bad = tmp_path / DDR / 'unhealthy'; msg = 'do not pair up'
    cache = tmp_path / 'cache'
    with pytest.raises(ValueError) as e:
        get_dataset('ddr', 'test', root=tmp_path, cache_dir=cache, progress=False, test_normals=2, train_start=4)
    assert str(bad) in str(e.value) and msg in str(e.value)
    assert cache_files(cache) == []


def test_argument_errors(tmp_path):
    write_brats(tmp_path, 2)
    for kw, msg in [(dict(name='mnist', split='test'), 'unknown dataset'),
                    (dict(name='brats', split='testing', sequence='t2'), 'split must be'),
                    (dict(name='brats', split='test'), "needs sequence 't1' or 't2'"),
                    (dict(name='camcan', split='test', sequence='t1'), "no 'test' split"),
                    (dict(name='atlas', split='test', sequence='t2'), 'T1 only'),
                    (dict(name='ddr', split='test', sequence='t1'), 'no sequence'),
                    (dict(name='brats', split='test', sequence='t2', colour=1), 'unknown option')]:
        kw.setdefault('root', tmp_path)
        with pytest.raises(ValueError, match=msg): get_dataset(**kw)
    with pytest.raises(ValueError, match='needs root='): get_dataset('camcan', 'train', 't1')
    with pytest.raises(ValueError, match='slice_range'):
        get_dataset('brats', 'test', 't2', root=tmp_path, cache_dir=False, slice_range=(4, 2), progress=False)


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
