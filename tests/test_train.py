"""Training, what a notebook cannot run well (the oracles, exact in-process resume, data determinism, atomic checkpoints
and errors are test cells in nbs/08_train.ipynb): DDP over two gloo processes, Ctrl-C (a signal handler needs the main
thread, which the notebook runner does not give a cell) and the slow torch.compile check. The `tiny` UNet at 16x16."""
import hashlib, json, os, signal, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import condiff.train as T
from condiff.data import SliceSet, save_sliceset
from condiff.train import TrainConfig, Trainer, resolve_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def blobs(n, seed, channels=1, size=SIZE):
    "Disc phantoms in [0,1] with zero background (MRI-like)."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    imgs = np.stack([((yy / rng.uniform(.4, .5) / size * 2) ** 2 + (xx / rng.uniform(.4, .5) / size * 2) ** 2 < 1)
                     * rng.uniform(.3, 1) * (1 - .3 * rng.random((size, size))) for _ in range(n)])
    imgs = np.repeat(imgs[:, None], channels, 1).astype(np.float32)
    return SliceSet(imgs, [f's{seed}-{i}' for i in range(n)], 'MRI' if channels == 1 else 'RF', name=f'blobs{seed}')


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    save_sliceset(blobs(40, 1), d / 'train.npz'); save_sliceset(blobs(6, 2), d / 'val.npz')
    return d


def cfg(data, **kw):
    base = dict(dataset='blobs', sequence=None, train_data=str(data / 'train.npz'), val_data=str(data / 'val.npz'),
                batch_size=4, val_batch_size=4, max_steps=6, val_start=2, val_every=2, checkpoint_every=2, log_every=1,
                patience=100, num_workers=0, device='cpu')
    return TrainConfig.from_preset('tiny', **{**base, **kw})


def tensors(path): return load_file(str(path))


def test_sigint_saves_latest_and_resumes_bit_exact(data, tmp_path, monkeypatch):
    "SIGINT (Ctrl-C) during step 3: the step finishes, `latest` is saved, KeyboardInterrupt; the resumed run equals the uninterrupted one."
    c = cfg(data, max_steps=6)
    full = train(c, tmp_path / 'full', progress=False)
    orig = Trainer.train_step
    def interrupt(self, batch):
        if self.step == 2: os.kill(os.getpid(), signal.SIGINT)
        return orig(self, batch)
    monkeypatch.setattr(Trainer, 'train_step', interrupt)
    before = signal.getsignal(signal.SIGINT)  # whatever was installed (another test may have left its own)
    with pytest.raises(KeyboardInterrupt, match='interrupted at step 3'): train(c, tmp_path / 'sigint', progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    run = T.run_dir_for(c, tmp_path / 'sigint')
    assert json.loads((run / 'run.json').read_text())['status'] == 'interrupted'
    assert json.loads((resolve_checkpoint(run) / 'meta.json').read_text())['step'] == 3
    monkeypatch.setattr(Trainer, 'train_step', orig)
    run = train(c, tmp_path / 'sigint', progress=False)
    ref, ck = resolve_checkpoint(full), resolve_checkpoint(run)
    for f in ('model.safetensors', 'ema.safetensors'):
        a, b = tensors(ref / f), tensors(ck / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


# ---------------------------------------------------------------------------------------------------- DDP
def digest(sd):
    "SHA-256 of a state dict, written independently of condiff.train.weights_digest (same definition)."
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].contiguous()
        h.update(k.encode()); h.update(str(v.dtype).encode()); h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_torchrun_two_ranks_gloo(data, tmp_path):
    c = cfg(data, max_steps=4, val_start=2, val_every=2, checkpoint_every=4)
    c.to_json(tmp_path / 'cfg.json')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'condiff.train', '--config', str(tmp_path / 'cfg.json'), '--out', str(tmp_path / 'ddp'), '--no-progress']
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try: out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9); p.communicate(); raise
    assert p.returncode == 0, out[-5000:]
    run = T.run_dir_for(c, tmp_path / 'ddp')
    info = json.loads((run / 'run.json').read_text())
    assert info['world_size'] == 2 and info['step'] == 4 and info['stop_reason'] == 'max_steps'
    ck = resolve_checkpoint(run)
    ddp = tensors(ck / 'model.safetensors')
    assert info['weights_sha256'] == [digest(ddp)] * 2  # both ranks ended with exactly the saved weights
    # DDP averages the two half-batch gradients, so it takes the steps of one process with the whole global batch:
    # the same training losses (each the mean over both ranks) and validation losses, up to float rounding. (The
    # weights themselves are not compared: Adam turns the rounding noise of near-zero gradients into ±lr steps.)
    one = train(c, tmp_path / 'single', progress=False)
    for key in ('loss', 'val_loss'):
        a, b = ([l[key] for l in T.read_log(r) if key in l] for r in (run, one))
        assert len(a) == len(b) > 1
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.slow
def test_compiled_unet_equals_eager():
    """TrainConfig.compile / restore_dataset(compile=True): torch.compile (inductor) of the tiny UNet equals eager to float tolerance.
    Slow (~7 min for forward and backward on the loaded 2-core VM; deselected by default, run with `pytest -m slow`)."""
    import warnings
    from condiff.unet import build_unet
    torch.manual_seed(0)
    m = build_unet('tiny')
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        c = T.MaybeCompiled(m, 'compile')
        got = c(x, t, x); got.square().mean().backward()
        g_c = [p.grad.clone() for p in m.parameters()]; m.zero_grad()
    assert not [x for x in w if 'compile=True' in str(x.message)], [str(x.message) for x in w]  # it really compiled
    ref = m(x, t, x); ref.square().mean().backward()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_c, (p.grad for p in m.parameters())): torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
