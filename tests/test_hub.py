"""condiff.hub: `export` → `from_pretrained` / `load_pretrained` → `detect` gives the run folder's maps bit for bit; the
diffusers round trip (official `unet_ema/` layout) gives the same UNet outputs as diffusers' own UNet2DModel (oracle);
checksums refuse altered files; the CLI."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
import nibabel as nib
from condiff.cli import main
from condiff.pipeline import fold_config, train_fold
from condiff.detect import detect, load_ensemble, volume_to_slices
from condiff.data import SliceSet, save_sliceset
from condiff.hub import export, load_pretrained, verify_model_folder, CorruptModel, read_model_config
from condiff.train import load_model
from condiff.unet import ConditionalUNet, build_unet
from conftest import ellipsoid, tiny_mri_folds

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    return tiny_mri_folds(tmp_path_factory.mktemp('hub'), (0, 3))


def cli(*argv):
    try: return main([str(a) for a in argv])
    except SystemExit as e: return e.code


def test_export_from_pretrained_detect_same_maps(run, tmp_path, capsys):
    assert cli('export', run, '--to', tmp_path / 'model') == 0
    model = Path(capsys.readouterr().out.strip())
    c = read_model_config(model)
    assert c['folds'] == ['fold0', 'fold3'] and c['modality'] == 'MRI' and c['image_size'] == [32, 32] and c['preset'] == 'tiny'
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob('*') if p.is_file()) == [
        'README.md', 'checksums.sha256', 'config.json', 'fold0/README.md', 'fold0/config.json', 'fold0/model.safetensors',
        'fold3/README.md', 'fold3/config.json', 'fold3/model.safetensors']
    card = (model / 'README.md').read_text()
    for s in ('library_name: condiff', 'phantom-brain', 'Preset: `tiny`', 'Training seed: 42', 'Intended use and limits', 'Not for clinical decisions'):
        assert s in card, s
    # the weights: the run folder's EMA weights, bit for bit
    for f in (0, 3):
        ref, _ = load_model(run / f'fold{f}', 'best')
        got = ConditionalUNet.from_pretrained(model, fold=f)
        assert got.config == ref.config and all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    assert [n for n, _, _ in load_pretrained(model)] == ['fold0', 'fold3']
    # detect with the model folder = detect with the run folder
    src = tmp_path / 'scan.nii.gz'
    nib.save(nib.Nifti1Image(ellipsoid((40, 36, 6)), np.diag([0.9, 1.1, 2.5, 1.0])), str(src))
    a = detect(src, run, tmp_path / 'a', num_steps=2, progress=False)
    b = detect(src, model, tmp_path / 'b', num_steps=2, progress=False)
    for k in ('map', 'restoration'):
        assert np.array_equal(np.asarray(nib.load(str(a[k])).dataobj), np.asarray(nib.load(str(b[k])).dataobj)), k
    assert a['fold_scores'] == b['fold_scores']
    assert cli('detect', src, '--model', model, '--out', tmp_path / 'c', '--num-steps', 2, '--no-progress') == 0
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / 'c' / 'scan_anomaly_map.nii.gz')).dataobj), np.asarray(nib.load(str(a['map'])).dataobj))


def test_checksums_refuse_altered_files(run, tmp_path):
    model = export(run, tmp_path / 'model', folds=[3])
    assert read_model_config(model)['folds'] == ['fold3'] and ConditionalUNet.from_pretrained(model).meta['modality'] == 'MRI'
    w = model / 'fold3' / 'model.safetensors'
    b = bytearray(w.read_bytes()); b[len(b) // 2] ^= 1; w.write_bytes(bytes(b))
    with pytest.raises(CorruptModel, match='fold3/model.safetensors: SHA-256 differs'): load_ensemble(model)
    (model / 'fold3' / 'config.json').unlink()
    with pytest.raises(CorruptModel, match='listed in checksums.sha256 but missing'): verify_model_folder(model)
    with pytest.raises(FileExistsError, match='pass overwrite=True'): export(run, model)
    with pytest.raises(FileNotFoundError, match='model folder not found'): ConditionalUNet.from_pretrained(tmp_path / 'nope')


def test_diffusers_round_trip_same_unet_outputs(run, tmp_path):
    from diffusers import UNet2DModel  # the oracle
    model = export(run, tmp_path / 'model')
    off = export(model, tmp_path / 'official', format='diffusers')
    x, t = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 250, 999])
    for f in ('fold0', 'fold3'):
        ours = ConditionalUNet.from_pretrained(model, fold=f)
        ref = UNet2DModel.from_pretrained(str(off / f / 'unet_ema')).eval()
        with torch.no_grad():
            assert torch.allclose(ref(x, t).sample, ours.forward_concat(x, t), atol=1e-5, rtol=1e-5)
    back = export(off, tmp_path / 'back')  # the official layout imported again
    for f in ('fold0', 'fold3'):
        a, b = ConditionalUNet.from_pretrained(model, fold=f), ConditionalUNet.from_pretrained(back, fold=f)
        with torch.no_grad(): assert torch.equal(a.forward_concat(x, t), b.forward_concat(x, t))
        assert b.meta['image_size'] == [32, 32] and b.meta['modality'] == 'MRI'
    # weights diffusers itself saved (as the official code stores unet_ema/) import too, with what its config cannot say
    ref = UNet2DModel.from_pretrained(str(off / 'fold0' / 'unet_ema'))
    ref.save_pretrained(str(tmp_path / 'MRI_t1_fold7' / 'checkpoint-1000' / 'unet_ema'))
    imp = export(tmp_path / 'MRI_t1_fold7' / 'checkpoint-1000', tmp_path / 'imp', image_size=32)
    c = read_model_config(imp)
    assert c['modality'] == 'MRI' and c['image_size'] == [32, 32] and c['preset'] == 'paper'
    with torch.no_grad(): assert torch.allclose(ref(x, t).sample, ConditionalUNet.from_pretrained(imp).forward_concat(x, t), atol=1e-5, rtol=1e-5)


def test_cpu_default_unet_has_no_diffusers_layout(tmp_path):
    from condiff.hub import _diffusers_folder
    with pytest.raises(ValueError, match='no conditioning skip'): _diffusers_folder(build_unet('cpu', 1), tmp_path / 'u')
    assert not (tmp_path / 'u').exists()
