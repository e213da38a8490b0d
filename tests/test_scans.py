"""condiff.scans (`condiff detect -i IN -o OUT --model M`): a folder of scans in, per-case outputs on each input's grid
out; a 4-D and a corrupt volume are refused with a clear summary line and leave no file; a rerun skips the finished
case; BIDS naming; the calibrated mask and yes/no. Models are trained for two steps: the bookkeeping is under test."""
import csv, json
from pathlib import Path
import numpy as np
import pytest
import nibabel as nib
from condiff.cli import main
from condiff.pipeline import fold_config, train_fold
from condiff.detect import volume_to_slices
from condiff.data import SliceSet, save_sliceset
from condiff.scans import detect_scans
from conftest import ellipsoid, tiny_mri_folds

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

OBLIQUE = np.array([[0.9, 0.1, 0.0, -20.0], [0.0, 1.1, 0.05, 12.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])  # anisotropic voxels


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "Two tiny MRI folds (two steps) trained at 32² on slices of an ellipsoid."
    return tiny_mri_folds(tmp_path_factory.mktemp('scans'), (0, 1))


def cli(*argv):
    try: return main([str(a) for a in argv])
    except SystemExit as e: return e.code


def three_volumes(folder: Path):
    (folder / 'sub-01' / 'anat').mkdir(parents=True)
    good = folder / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
    nib.save(nib.Nifti1Image(ellipsoid((40, 36, 6)), OBLIQUE), str(good))
    nib.save(nib.Nifti1Image(np.stack([ellipsoid((40, 36, 6))] * 3, -1), OBLIQUE), str(folder / 'sub-02_T1w.nii.gz'))  # 4-D
    ok = nib.Nifti1Image(ellipsoid((40, 36, 6)), OBLIQUE)
    nib.save(ok, str(folder / 'sub-03_T1w.nii.gz'))
    raw = (folder / 'sub-03_T1w.nii.gz').read_bytes()
    (folder / 'sub-03_T1w.nii.gz').write_bytes(raw[:len(raw) // 2])  # truncated: corrupt
    return good


def files_of(out: Path):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file() and not p.name.startswith('.'))


def test_detect_folder_good_4d_corrupt_and_resume(run, tmp_path, capsys):
    good = three_volumes(tmp_path / 'in')
    out = tmp_path / 'out'
    assert cli('detect', '-i', tmp_path / 'in', '-o', out, '--model', run, '--num-steps', 2, '--no-progress') == 3  # 2 refused
    rows = list(csv.DictReader(open(out / 'summary.csv')))
    st = {r['case']: r for r in rows}
    assert st['sub-01/anat/sub-01_T1w.nii.gz']['status'] == 'ok'
    assert st['sub-02_T1w.nii.gz']['status'] == 'error' and 'expected a 3-D volume, got 4-D data of shape (40, 36, 6, 3)' in st['sub-02_T1w.nii.gz']['error']
    assert st['sub-03_T1w.nii.gz']['status'] == 'error' and 'sub-03_T1w.nii.gz: cannot read this volume as NIfTI' in st['sub-03_T1w.nii.gz']['error']
    # the good case: every output on the input's grid with its affine; the bad cases: nothing
    assert files_of(out) == ['sub-01/anat/sub-01_T1w.json', 'sub-01/anat/sub-01_T1w_anomaly_map.nii.gz',
                             'sub-01/anat/sub-01_T1w_fold_std.nii.gz', 'sub-01/anat/sub-01_T1w_restoration.nii.gz', 'summary.csv']
    src = nib.load(str(good))
    for name in ('anomaly_map', 'fold_std', 'restoration'):
        o = nib.load(str(out / 'sub-01' / 'anat' / f'sub-01_T1w_{name}.nii.gz'))
        assert o.shape == src.shape == (40, 36, 6) and np.allclose(o.affine, OBLIQUE) and np.allclose(o.header.get_zooms(), src.header.get_zooms())
    rec = json.loads((out / 'sub-01' / 'anat' / 'sub-01_T1w.json').read_text())
    m = np.asarray(nib.load(str(out / 'sub-01' / 'anat' / 'sub-01_T1w_anomaly_map.nii.gz')).dataobj)
    sd = np.asarray(nib.load(str(out / 'sub-01' / 'anat' / 'sub-01_T1w_fold_std.nii.gz')).dataobj)
    assert (sd >= 0).all() and sd.max() > 0 and (sd[m == 0] == 0).all()  # two folds disagree inside, not in the background
    assert rec['score'] == pytest.approx(np.mean(list(rec['fold_scores'].values())), rel=1e-5)  # mean of the folds' scores
    assert rec['model']['kind'] == 'run folder' and rec['model']['folds'] == ['fold0', 'fold1'] and len(rec['model']['weights_sha256']) == 64
    assert rec['top'][0]['slice'] in range(6) and rec['anomalous'] is None and rec['input_sha256']
    # a rerun skips the finished case and tries the refused ones again
    before = (out / 'sub-01' / 'anat' / 'sub-01_T1w_anomaly_map.nii.gz').stat().st_mtime_ns
    r = detect_scans(tmp_path / 'in', out, run, num_steps=2, progress=False)
    assert (r['ok'], r['skipped'], r['errors']) == (0, 1, 2)
    assert (out / 'sub-01' / 'anat' / 'sub-01_T1w_anomaly_map.nii.gz').stat().st_mtime_ns == before
    # other settings are another result: recomputed, not skipped
    assert detect_scans(tmp_path / 'in', out, run, num_steps=3, progress=False)['ok'] == 1


def test_half_written_case_is_redone_and_failed_case_cleaned(run, tmp_path):
    three_volumes(tmp_path / 'in')
    out = tmp_path / 'out'
    detect_scans(tmp_path / 'in', out, run, num_steps=2, progress=False)
    (out / 'sub-01' / 'anat' / 'sub-01_T1w_fold_std.nii.gz').unlink()  # as if killed before the last file
    assert detect_scans(tmp_path / 'in', out, run, num_steps=2, progress=False)['ok'] == 1
    # a stale output of a case that now fails is removed with it
    (out / 'sub-02_T1w_anomaly_map.nii.gz').write_bytes(b'stale')
    detect_scans(tmp_path / 'in', out, run, num_steps=2, progress=False)
    assert not (out / 'sub-02_T1w_anomaly_map.nii.gz').exists()


def test_bids_names_and_calibrated_mask(run, tmp_path):
    from condiff.calibrate import calibrate
    from condiff.hub import export
    model = export(run, tmp_path / 'model')
    sl, _ = volume_to_slices(ellipsoid(seed=5), 32)
    keep = sl.reshape(len(sl), -1).max(1) > 0
    cal = calibrate(model, SliceSet(np.concatenate([sl[keep]] * 8), [f"h/z{i}" for i in range(8 * int(keep.sum()))], 'MRI'),
                    pixel_fpr=0.1, image_fpr=0.25, num_steps=2, progress=False)
    three_volumes(tmp_path / 'in')
    out = tmp_path / 'out'
    r = detect_scans(tmp_path / 'in', out, model, bids=True, progress=False)  # sampler and steps: the calibration's
    assert r['ok'] == 1 and r['errors'] == 2
    assert json.loads((out / 'dataset_description.json').read_text())['DatasetType'] == 'derivative'
    d = out / 'sub-01' / 'anat'
    assert sorted(p.name for p in d.iterdir()) == ['sub-01_desc-anomaly_T1w.json', 'sub-01_desc-anomaly_T1w.nii.gz',
                                                    'sub-01_desc-anomaly_mask.nii.gz', 'sub-01_desc-foldstd_T1w.nii.gz',
                                                    'sub-01_desc-restored_T1w.nii.gz']
    mask = nib.load(str(d / 'sub-01_desc-anomaly_mask.nii.gz'))
    amap = np.asarray(nib.load(str(d / 'sub-01_desc-anomaly_T1w.nii.gz')).dataobj)
    assert mask.get_data_dtype() == np.uint8 and np.allclose(mask.affine, OBLIQUE)
    assert np.array_equal(np.asarray(mask.dataobj) == 1, amap > cal['map_threshold'])
    rec = json.loads((d / 'sub-01_desc-anomaly_T1w.json').read_text())
    assert rec['decision_score'] == rec['top'][0]['score']  # calibrated on 2-D slices: the volume's highest slice score decides
    assert rec['anomalous'] == (rec['decision_score'] > cal['score_threshold'])
    assert rec['score_threshold'] == cal['score_threshold'] and rec['score_level'] == 'image' and rec['sampler'] == f"{cal['sampler']}/{cal['num_steps']}"
    row = next(csv.DictReader(open(out / 'summary.csv')))
    assert row['anomalous'] in ('True', 'False')


def test_batch_mode_errors(run, tmp_path, capsys):
    assert cli('detect', '-i', tmp_path, '--model', run) == 2
    assert 'an output folder (-o OUTPUT) in batch mode' in capsys.readouterr().err
    (tmp_path / 'notes.txt').write_text('x')
    assert cli('detect', '-i', tmp_path, '-o', tmp_path / 'o', '--model', run) == 2
    assert 'no NIfTI or image file found' in capsys.readouterr().err
    assert cli('detect', '--model', run) == 2
    assert 'a scan (INPUT), or -i INPUT -o OUTPUT' in capsys.readouterr().err


def test_fundus_folder(tmp_path):
    "A fundus photograph: PNG outputs at the photograph's size, the highest-scoring grid cells in its JSON."
    from PIL import Image
    rng = np.random.default_rng(1)
    save_sliceset(SliceSet(rng.random((4, 3, 32, 32), dtype=np.float32), [f"f/{i}" for i in range(4)], 'RF'), tmp_path / 'rf.npz')
    train_fold(fold_config('phantom-fundus', None, 0, preset='tiny', train_data=str(tmp_path / 'rf.npz'), val_data=str(tmp_path / 'rf.npz'),
                           max_steps=2, batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1),
               tmp_path / 'runs', progress=False)
    (tmp_path / 'in').mkdir()
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(tmp_path / 'in' / 'eye.png')
    r = detect_scans(tmp_path / 'in', tmp_path / 'out', tmp_path / 'runs' / 'phantom-fundus' / 'tiny', num_steps=2, progress=False)
    assert r['ok'] == 1
    for name in ('eye_anomaly_map.png', 'eye_fold_std.png', 'eye_restoration.png'):
        with Image.open(tmp_path / 'out' / name) as im: assert im.size == (56, 40)
    rec = json.loads((tmp_path / 'out' / 'eye.json').read_text())
    assert rec['modality'] == 'RF' and len(rec['top']) == 5 and rec['top'][0]['score'] >= rec['top'][-1]['score']
    x0, y0, x1, y1 = rec['top'][0]['box']
    assert 0 <= x0 < x1 <= 56 and 0 <= y0 < y1 <= 40
