"""condiff.calibrate: on healthy phantom brains it has not seen, the calibrated thresholds flag the target fraction of
healthy pixels and images, within sampling error; a folder of healthy scans calibrates the case score as detect makes
it; the CLI stores calibration.json in the model folder and the card and checksums follow."""
import json
from pathlib import Path
import numpy as np
import pytest
import nibabel as nib
from condiff.calibrate import calibrate, conformal_threshold, false_positive_rates, foreground, healthy_maps
from condiff.cli import main
from condiff.pipeline import fold_config, train_fold
from condiff.detect import detect, load_ensemble
from condiff.data import save_sliceset, volume_of
from condiff.hub import export, read_calibration, verify_model_folder
from condiff.phantom import phantom_brain
from conftest import ellipsoid

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def sets():
    "Healthy phantom brains at 32²: one set to calibrate on, another (other subjects: another seed) to check on."
    return [phantom_brain('train', 't1', seed=s, cache_dir=False, n_subjects=8, slice_step=10, size=32, progress=False) for s in (1, 2)]


@pytest.fixture(scope='module')
def run(tmp_path_factory, sets):
    root = tmp_path_factory.mktemp('cal')
    save_sliceset(sets[0], root / 'tr.npz')
    for f in (0, 1):
        train_fold(fold_config('phantom-brain', 't1', f, preset='tiny', train_data=str(root / 'tr.npz'), val_data=str(root / 'tr.npz'),
                               max_steps=2, batch_size=2, val_batch_size=2, val_start=1, val_every=1, checkpoint_every=1),
                   root / 'runs', progress=False)
    return root / 'runs' / 'phantom-brain-t1' / 'tiny'


@pytest.mark.parametrize('pixel_fpr,image_fpr', [(0.05, 0.1), (0.2, 0.3)])
def test_healthy_fpr_within_sampling_error(run, sets, pixel_fpr, image_fpr):
    cal_set, test_set = sets
    cal = calibrate(run, cal_set, pixel_fpr=pixel_fpr, image_fpr=image_fpr, num_steps=2, progress=False, write=False)
    m = healthy_maps(load_ensemble(run), test_set.images, 'MRI', list(test_set.ids), sampler=cal['sampler'], num_steps=2, progress=False)
    fg = foreground(test_set.images, 'MRI')
    scores = m.reshape(len(m), -1).mean(1)
    r = false_positive_rates(m, fg, scores, cal['map_threshold'], cal['score_threshold'])
    # independent oracle of the pooled rate: count directly
    assert r['pixel_fpr'] == pytest.approx(np.count_nonzero(m[fg] > cal['map_threshold']) / np.count_nonzero(fg))
    subj = np.array([volume_of(i) for i in test_set.ids])
    per_subj = np.array([np.mean(m[subj == s][fg[subj == s]] > cal['map_threshold']) for s in np.unique(subj)])
    se_px = per_subj.std(ddof=1) / np.sqrt(len(per_subj))  # pixels of one brain are correlated: subjects are the units
    se_img = np.sqrt(image_fpr * (1 - image_fpr) / len(test_set))
    assert abs(r['pixel_fpr'] - pixel_fpr) <= 3 * se_px + 1 / cal['n_pixels'], (r['pixel_fpr'], se_px)
    assert abs(r['image_fpr'] - image_fpr) <= 3 * se_img + 1 / cal['n_images'], (r['image_fpr'], se_img)
    # on the calibration data itself, conformal: at most the target, and within 1/(n+1) of it
    assert pixel_fpr - 1 / (cal['n_pixels'] + 1) - 1e-3 <= cal['on_calibration_data']['pixel_fpr'] <= pixel_fpr


def test_conformal_threshold_refuses_too_few_values():
    with pytest.raises(ValueError, match='need at least 19'): conformal_threshold(np.arange(10.0), 0.05)
    assert conformal_threshold(np.arange(19.0), 0.05) == 18.0


def test_cli_calibrate_model_folder_and_healthy_scans(run, tmp_path, capsys):
    model = export(run, tmp_path / 'model')
    healthy = tmp_path / 'healthy'; healthy.mkdir()
    for s in range(20):
        nib.save(nib.Nifti1Image(ellipsoid((36, 36, 3), seed=s), np.eye(4)), str(healthy / f'h{s:02d}.nii.gz'))
    code = main(['calibrate', '--model', str(model), '--healthy', str(healthy), '--pixel-fpr', '0.05', '--image-fpr', '0.1',
                 '--num-steps', '2', '--no-progress'])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    cal = read_calibration(model)
    assert cal['score_level'] == 'case' and cal['n_images'] == 20 and out['map_threshold'] == cal['map_threshold']
    verify_model_folder(model)  # checksums rewritten with calibration.json
    assert 'Map threshold' in (model / 'README.md').read_text()
    # the case score calibrated on is detect's score of the same scan
    r = detect(healthy / 'h00.nii.gz', model, tmp_path / 'd', num_steps=2, sampler=cal['sampler'], progress=False)
    scores = [detect(healthy / f'h{s:02d}.nii.gz', model, tmp_path / f'd{s}', num_steps=2, sampler=cal['sampler'], progress=False)['score']
              for s in range(20)]
    assert cal['score_threshold'] == conformal_threshold(scores, 0.1)
    assert r['score'] == scores[0]


def test_calibrate_bad_inputs(run, tmp_path, sets, capsys):
    with pytest.raises(SystemExit) as e: main(['calibrate', '--model', str(run), '--pixel-fpr', '1.5'])
    assert e.value.code == 2 and '--pixel-fpr: got 1.5' in capsys.readouterr().err
    with pytest.raises(ValueError, match='strictly between 0 and 1'): calibrate(run, sets[0], pixel_fpr=0.0, progress=False)
    with pytest.raises(ValueError, match='either data or healthy_dir'): calibrate(run, sets[0], healthy_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match='the model was trained on 32×32'):
        calibrate(run, phantom_brain('val', 't1', cache_dir=False, n_subjects=2, slice_step=40, size=64, progress=False), progress=False)


def test_default_data_is_the_models_validation_data(run, sets):
    cal = calibrate(run, pixel_fpr=0.05, image_fpr=0.1, num_steps=2, progress=False, write=False)
    assert cal['data'].startswith('validation data') and cal['data'].endswith('tr.npz') and cal['n_images'] == len(sets[0])
    assert cal['score_level'] == 'image' and cal['folds'] == ['fold0', 'fold1']
