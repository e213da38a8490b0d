"""Training: oracles (diffusers' EMAModel, the official early stopper), exact resume, DDP on gloo, data determinism,
atomic checkpoints and clear errors. Everything runs the `tiny` UNet at 16x16 on small synthetic slice sets."""
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import condiff.train as T
from condiff.data import SliceSet, save_sliceset
from condiff.train import EMA, MovingAverageEarlyStopper, TaskDataset, StreamSampler, TrainConfig, Trainer, ema_decay, load_model, make_loader, resolve_checkpoint, train

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
    save_sliceset(blobs(40, 1, channels=3), d / 'train3.npz'); save_sliceset(blobs(6, 2, channels=3), d / 'val3.npz')
    return d


def cfg(data, **kw):
    base = dict(dataset='blobs', sequence=None, train_data=str(data / 'train.npz'), val_data=str(data / 'val.npz'),
                batch_size=4, val_batch_size=4, max_steps=6, val_start=2, val_every=2, checkpoint_every=2, log_every=1,
                patience=100, num_workers=0, device='cpu')
    return TrainConfig.from_preset('tiny', **{**base, **kw})


def tensors(path): return load_file(str(path))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------- oracles
def test_ema_matches_diffusers_bit_for_bit():
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GroupNorm(1, 7), torch.nn.Linear(7, 3))
    net[1].weight.requires_grad_(False)  # a frozen parameter is copied, not averaged
    ours, ref = EMA(net), EMAModel(net.parameters(), foreach=False)  # diffusers defaults: decay 0.9999, no warmup
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    for step in range(1, 40):
        opt.zero_grad(); net(torch.randn(8, 5)).pow(2).mean().backward(); opt.step()
        with torch.no_grad(): net[1].weight.add_(0.01)
        ours.update(net); ref.step(net.parameters())
        assert ema_decay(step) == ref.get_decay(step)
        for a, b in zip(ours.shadow, ref.shadow_params): assert torch.equal(a, b), step
    assert ema_decay(1) == 0.0 and ema_decay(2) == 2 / 11 and ema_decay(10**6) == 0.9999


def official_stopper(losses, steps, alpha=0.9, patience=50_000):
    "The official MovingAverageEarlyStopper, transcribed from method spec §1.4 (torch tensors as in the original)."
    ma, best, best_step, out = None, torch.tensor(float('inf')), 0, []
    for loss, step in zip(losses, steps):
        loss = torch.tensor(loss, dtype=torch.float64)
        ma = loss if ma is None else alpha * ma + (1 - alpha) * loss
        new = bool(ma < best)
        if new: best, best_step = ma, step
        out.append((new, step - best_step > patience))
    return out


def test_early_stopper_matches_official():
    rng = np.random.default_rng(0)
    losses = (1 / np.arange(1, 200) + 0.05 * rng.random(199)).tolist() + [5.0] * 40
    steps = list(range(5000, 5000 + 500 * len(losses), 500))
    for patience in (5_000, 50_000):
        st = MovingAverageEarlyStopper(0.9, patience)
        assert [st.update(l, s) for l, s in zip(losses, steps)] == official_stopper(losses, steps, patience=patience)
    assert any(stop for _, stop in official_stopper(losses, steps, patience=5_000))


# ---------------------------------------------------------------------------------------------------- config
def test_config_json_roundtrip_and_bad_keys(tmp_path):
    c = TrainConfig.from_preset('tiny', fold=4, snr_gamma=None, adam_betas=(0.8, 0.9))
    c.to_json(tmp_path / 'c.json')
    assert TrainConfig.from_json(tmp_path / 'c.json') == c
    (tmp_path / 'bad.json').write_text(json.dumps({'preset': 'tiny', 'fold': 1, 'learnig_rate': 3}))
    with pytest.raises(ValueError, match=r"bad\.json: unknown TrainConfig key\(s\) \['learnig_rate'\]"):
        TrainConfig.from_json(tmp_path / 'bad.json')
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['bogus'\]"): TrainConfig.from_preset('paper', bogus=1)
    with pytest.raises(FileNotFoundError, match='no config file'): TrainConfig.from_json(tmp_path / 'none.json')
    with pytest.raises(ValueError) as e: TrainConfig.from_preset('tiny', fold=-1, batch_size=2.5, lr=0, mixed_precision='fp8', device='gpu')
    for word in ('fold must be in 0..9', 'batch_size must be an int', 'lr must be > 0', 'mixed_precision', 'device'): assert word in str(e.value)
    p = TrainConfig.from_preset('paper')
    assert (p.lr, p.adam_betas, p.weight_decay, p.adam_eps, p.grad_clip, p.batch_size, p.ema_max_decay, p.snr_gamma,
            p.noise_offset, p.val_every, p.val_start, p.ma_alpha, p.patience, p.max_steps, p.checkpoint_every, p.p_no_aug) == \
           (1e-4, (0.9, 0.999), 1e-2, 1e-8, 1.0, 32, 0.9999, 1.0, 0.1, 500, 5000, 0.9, 50_000, 500_000, 1000, 0.2)


# ---------------------------------------------------------------------------------------------------- data
def task_dataset(ss, worker_seeding='per-sample', p_no_aug=0.2):
    from condiff.tasks import RestorationTask, fold_tasks, texture_source
    task = RestorationTask(fold_tasks(0)[0], ss.images, texture_source(1, size=SIZE), p_no_aug=p_no_aug, has_bg=True)
    return TaskDataset(ss.images, task, 'MRI', seed=7, worker_seeding=worker_seeding)


def test_same_batches_whatever_num_workers():
    ds = task_dataset(blobs(24, 3))
    def batches(nw):
        it = iter(make_loader(ds, StreamSampler(len(ds), 8, seed=7), 8, num_workers=nw, seed=7))
        return [next(it) for _ in range(4)]  # crosses the first epoch boundary
    a, b = batches(0), batches(2)
    for x, y in zip(a, b):
        for k in ('x0', 'cond', 'noise', 't', 'index', 'epoch'): assert torch.equal(x[k], y[k]), k
    assert any(not torch.equal(x['cond'], x['x0']) for x in a)  # the tasks did corrupt something
    # per-rank sharding: two ranks' halves are the single-process batch
    h = [next(iter(make_loader(ds, StreamSampler(len(ds), 8, seed=7, rank=r, world_size=2), 4))) for r in (0, 1)]
    for k in ('x0', 'cond', 'noise', 't'): assert torch.equal(torch.cat([h[0][k], h[1][k]]), a[0][k])


def test_official_worker_seeding_replays_the_stream():
    "worker_seeding='none' reproduces the official quirk: forked workers copy one generator and replay it."
    ss = blobs(1, 4); ss = SliceSet(np.repeat(ss.images, 16, 0), [f'i{i}' for i in range(16)], 'MRI')  # 16 equal slices
    keys = [(0, i) for i in range(16)]
    def conds(mode, nw):
        return torch.cat([b['cond'] for b in make_loader(task_dataset(ss, mode, p_no_aug=0.0), keys, 4, num_workers=nw, seed=7)])
    off = conds('none', 2)
    assert torch.equal(off[0:4], off[4:8])  # worker 1's first batch replays worker 0's
    assert not torch.equal(conds('per-sample', 2)[0:4], conds('per-sample', 2)[4:8])


# ---------------------------------------------------------------------------------------------------- training
def test_loss_goes_down_on_a_fixed_batch(data, tmp_path):
    tr = Trainer(cfg(data, lr=2e-3), tmp_path, progress=False)
    batch = next(iter(tr.train_loader()))
    losses = [tr.train_step(batch).item() for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert tr.ema.step == 40
    # seeded validation: the same corruptions, noise and timesteps every time, so equal weights give an equal loss
    v = tr.validate(); tr.step += 500
    assert tr.validate() == v
    tr.config = tr.config.replace(seeded_validation=False); tr._val_cache = None  # the official, unseeded validation
    a = tr.validate(); tr.step += 1
    assert tr.validate() != a


def test_mixed_precision_code_path_on_cpu(data, tmp_path):
    "The CUDA branches (autocast, channels_last, grad scaler) exercised on the CPU: bf16 autocast exists there too."
    import warnings
    tr = Trainer(cfg(data), tmp_path, progress=False)
    tr.amp_dtype, tr.channels_last = torch.bfloat16, True
    tr.model.to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "CUDA not available, disabling" from the fp16 scaler
        tr.scaler = torch.amp.GradScaler('cuda')
    seen = []
    h = tr.model.register_forward_hook(lambda m, i, o: seen.append((i[0].is_contiguous(memory_format=torch.channels_last), o.dtype)))
    batch = next(iter(tr.train_loader()))
    loss = tr.train_step(batch)
    h.remove()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and seen == [(True, torch.bfloat16)]
    assert np.isfinite(tr.validate())
    tr.step = 1; tr.save()
    for k, v in tensors(resolve_checkpoint(tr.run_dir) / 'model.safetensors').items():
        assert torch.equal(v, tr.model.state_dict()[k].contiguous())
    with pytest.raises(ValueError, match='CUDA is not available'):
        if not torch.cuda.is_available(): Trainer(cfg(data, device='cuda'), tmp_path / 'x', progress=False)
        else: raise ValueError('CUDA is not available (skipped: this machine has CUDA)')


def test_resume_is_bit_exact(data, tmp_path, monkeypatch):
    c = cfg(data, max_steps=6)
    full = train(c, tmp_path / 'full', progress=False)
    # (1) stop at max_steps=3, then continue to 6
    train(c.replace(max_steps=3), tmp_path / 'cut', progress=False)
    cut = train(c, tmp_path / 'cut', progress=False)
    # (2) a crash at step 5: resume from the step-4 checkpoint
    orig = Trainer.train_step
    def crash(self, batch):
        if self.step == 4: raise RuntimeError('simulated crash')
        return orig(self, batch)
    monkeypatch.setattr(Trainer, 'train_step', crash)
    with pytest.raises(RuntimeError, match='simulated crash'): train(c, tmp_path / 'crash', progress=False)
    assert json.loads((resolve_checkpoint(tmp_path / 'crash' / 'blobs' / 'tiny' / 'fold0') / 'meta.json').read_text())['step'] == 4
    # (3) SIGINT (Ctrl-C) during step 3: the step finishes, `latest` is saved, KeyboardInterrupt is raised
    import signal
    def interrupt(self, batch):
        if self.step == 2: os.kill(os.getpid(), signal.SIGINT)
        return orig(self, batch)
    monkeypatch.setattr(Trainer, 'train_step', interrupt)
    before = signal.getsignal(signal.SIGINT)  # whatever was installed (another test may have left its own)
    with pytest.raises(KeyboardInterrupt, match='interrupted at step 3'): train(c, tmp_path / 'sigint', progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    monkeypatch.setattr(Trainer, 'train_step', orig)
    crash_run = train(c, tmp_path / 'crash', progress=False)
    sigint_run = train(c, tmp_path / 'sigint', progress=False)
    ref = resolve_checkpoint(full)
    for run in (cut, crash_run, sigint_run):
        ck = resolve_checkpoint(run)
        for f in ('model.safetensors', 'ema.safetensors'): assert_same_tensors(tensors(ref / f), tensors(ck / f))
        a, b = (torch.load(p / 'state.pt', weights_only=True) for p in (ref, ck))
        assert a['step'] == b['step'] == 6 and a['ema_step'] == b['ema_step'] == 6 and a['data_pos'] == b['data_pos'] == 24
        for s, t in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
            for k in s: assert torch.equal(s[k], t[k])
        assert a['stopper'] == b['stopper']
        strip = lambda r: [{k: v for k, v in l.items() if k not in ('images_per_s', 'wall_s')} for l in T.read_log(r)]
        assert strip(run) == strip(full)  # the log too: no duplicated or missing lines after the resume
    # the best checkpoint holds EMA weights, and load_model returns them
    m, _ = load_model(full, 'best')
    best = resolve_checkpoint(full, 'best')
    for k, v in tensors(best / 'ema.safetensors').items(): assert torch.equal(m.state_dict()[k], v)
    assert m.meta['image_size'] == [SIZE, SIZE] and (full / 'loss.png').stat().st_size > 0


def test_early_stopping_stops_or_not(data, tmp_path, monkeypatch):
    # a validation loss that only gets worse: the smoothed loss never improves after step 2
    vals = iter(np.linspace(1, 2, 50))
    monkeypatch.setattr(Trainer, 'validate', lambda self: float(next(vals)))
    fix = train(cfg(data, max_steps=20, patience=3), tmp_path / 'fix', progress=False)
    run = json.loads((fix / 'run.json').read_text())
    assert (run['stop_reason'], run['step'], run['best_step']) == ('early_stop', 6, 2)  # 6 - 2 > 3
    assert train(cfg(data, max_steps=20, patience=3), tmp_path / 'fix', progress=False) == fix  # a stopped run stays stopped
    # official: no stop; at each stop signal the EMA weights are copied into the model and a new epoch starts
    seen = []
    orig_copy = EMA.copy_to
    monkeypatch.setattr(EMA, 'copy_to', lambda self, model: (seen.append(self.step), orig_copy(self, model))[1])
    off = train(cfg(data, max_steps=10, patience=3, early_stopping_stops=False), tmp_path / 'off', progress=False)
    run = json.loads((off / 'run.json').read_text())
    assert (run['stop_reason'], run['step']) == ('max_steps', 10)
    assert seen == [6, 8, 10]
    st = torch.load(resolve_checkpoint(off) / 'state.pt', weights_only=True)
    assert st['data_pos'] == 120  # 40 slices, batch 4: jumps 24 -> 40 (step 6), 48 -> 80 (step 8), 88 -> 120 (step 10)


# ---------------------------------------------------------------------------------------------------- DDP and the CLI
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


def test_cli_errors(data, tmp_path):
    cli = lambda *a: T.run_command(T.train_command, list(a), 'python -m condiff.train', flags={'overrides': '--set'})  # noqa: E731
    with pytest.raises(SystemExit) as e: cli('--preset', 'tiny', '--set', 'bogus=1', '--out', str(tmp_path))
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e: cli('--config', str(tmp_path / 'missing.json'))
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e: cli('--out', str(tmp_path))  # neither --config nor --preset
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------- errors, atomicity
@pytest.fixture(scope='module')
def done(data, tmp_path_factory):
    "A finished 4-step run (with a best checkpoint)."
    return train(cfg(data, max_steps=4), tmp_path_factory.mktemp('done'), progress=False)


def test_incompatible_and_missing_checkpoints(data, done, tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'): load_model(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='no config.json'): load_model(tmp_path)
    other = tmp_path / 'other'; shutil.copytree(done, other, symlinks=True)
    c = TrainConfig.from_json(other / 'config.json')
    c.replace(unet='fast').to_json(other / 'config.json')  # another architecture
    with pytest.raises(ValueError, match='incompatible checkpoint'): load_model(other)
    # resuming the run with 3-channel data: the checkpoint's UNet has the wrong channel count
    c3 = cfg(data, max_steps=6, train_data=str(data / 'train3.npz'), val_data=str(data / 'val3.npz'))
    with pytest.raises(ValueError, match="incompatible checkpoint .*img_channels=1"): Trainer(c3, done.parents[2], progress=False)
    with pytest.raises(ValueError, match="different config.*'seed'"): Trainer(cfg(data, seed=3), done.parents[2], progress=False)
    with pytest.raises(FileExistsError, match='already holds a run'): Trainer(cfg(data), done.parents[2], resume=False, progress=False)
    shutil.rmtree(other / 'checkpoints')
    with pytest.raises(FileNotFoundError, match="no 'latest' checkpoint"): load_model(other.parent / 'other', 'latest')
    early = train(cfg(data, max_steps=1, val_start=5), tmp_path / 'early', progress=False)
    with pytest.raises(FileNotFoundError, match="no 'best' checkpoint.*val_start"): load_model(early, 'best')
    m, c = load_model(early, 'latest', ema=False)
    assert_same_tensors(m.state_dict(), tensors(resolve_checkpoint(early) / 'model.safetensors'))


def test_atomic_checkpoint_write(data, done, tmp_path, monkeypatch):
    run = tmp_path / 'run'; shutil.copytree(done.parents[2], run, symlinks=True)
    rd = T.run_dir_for(cfg(data), run)
    before = {f: (resolve_checkpoint(rd) / f).read_bytes() for f in T._CKPT_FILES}
    # debris of a hard kill during an earlier write: a half-written folder and a stray link
    (rd / 'checkpoints' / '.tmp-step-00000005-dead').mkdir(); (rd / 'checkpoints' / '.tmp-step-00000005-dead' / 'model.safetensors').write_bytes(b'x')
    calls = {'n': 0}
    real_fsync = os.fsync
    def dying_fsync(fd):
        calls['n'] += 1
        if calls['n'] == 3: raise OSError('simulated power loss')  # during the third file of the next checkpoint
        return real_fsync(fd)
    monkeypatch.setattr(T.os, 'fsync', dying_fsync)
    with pytest.raises(OSError, match='simulated power loss'): train(cfg(data, max_steps=6), run, progress=False)
    monkeypatch.setattr(T.os, 'fsync', real_fsync)
    ck = resolve_checkpoint(rd)
    assert ck.name == 'step-00000004' and {f: (ck / f).read_bytes() for f in T._CKPT_FILES} == before
    m, _ = load_model(rd, 'latest')  # still loads
    train(cfg(data, max_steps=6), run, progress=False)  # and the run resumes past the failure
    names = sorted(p.name for p in (rd / 'checkpoints').iterdir())
    prev = os.readlink(rd / 'checkpoints' / 'previous')  # the old `latest`, kept as a fallback for a corrupt one
    assert [n for n in names if n not in ('previous', prev)] == ['best', 'latest', 'step-00000006'], names  # debris cleaned up


# ---------------------------------------------------------------------------------------------------- GPU-path fixes (issue 15)
def _adam_pair(fmt_a, fmt_b, flags_a, flags_b):
    "Two copies of the tiny UNet in memory formats a / b and an AdamW for each; two steps on a, its state loaded into b."
    import io
    from condiff.unet import build_unet
    torch.manual_seed(0)
    a = build_unet('tiny').to(memory_format=fmt_a)
    b = build_unet('tiny'); b.load_state_dict(a.state_dict()); b = b.to(memory_format=fmt_b)
    oa = torch.optim.AdamW(a.parameters(), lr=1e-3, **flags_a)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 500])
    def grads(m):
        m.zero_grad(); m(x, t, x).square().mean().backward()
    for _ in range(2): grads(a); oa.step()
    b.load_state_dict(a.state_dict())
    buf = io.BytesIO(); torch.save(oa.state_dict(), buf); buf.seek(0)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-3, **flags_b)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    return a, oa, b, ob, grads


@pytest.mark.parametrize('fmts', [(torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)])
def test_optimizer_resume_sets_flags_and_strides(fmts):
    a, oa, b, ob, grads = _adam_pair(*fmts, dict(fused=True), dict(foreach=True))
    assert ob.param_groups[0]['fused'] is True  # what load_state_dict brings back: the saver's kernel
    conv = [p for p in b.parameters() if p.ndim == 4]
    assert any(ob.state[p]['exp_avg'].stride() != p.stride() for p in conv)  # and the saver's strides
    flags = {k: torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], foreach=True).defaults.get(k) for k in T.OPTIMIZER_RUNTIME_FLAGS}
    T.fit_optimizer_state(ob, flags)
    assert all(g['foreach'] is True and not g['fused'] for g in ob.param_groups)
    for p in b.parameters():
        for k in ('exp_avg', 'exp_avg_sq'): assert ob.state[p][k].stride() == p.stride() and ob.state[p][k].dtype == p.dtype
        assert ob.state[p]['step'].device.type == 'cpu'
    grads(a); oa.step()
    for pa, pb in zip(a.parameters(), b.parameters()): pb.grad = torch.empty_like(pb).copy_(pa.grad)  # the same gradients
    ob.step()  # the resumed step runs (foreach kernels) and continues the same trajectory
    for pa, pb in zip(a.parameters(), b.parameters()): torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_trainer_resume_fits_optimizer_to_this_process(data, tmp_path):
    run = train(cfg(data, max_steps=2), tmp_path, progress=False)
    tr = Trainer(cfg(data, max_steps=4), tmp_path, progress=False)  # resumed from step 2
    assert tr.step == 2 and tr.opt.param_groups[0]['fused'] is None and tr._opt_flags == {'fused': None, 'foreach': None, 'capturable': False}
    tr.model.to(memory_format=torch.channels_last)  # as a CUDA process with channels_last would build it
    tr.load_state(resolve_checkpoint(run, 'latest'))
    for p in tr.model.parameters():
        assert tr.opt.state[p]['exp_avg'].stride() == p.stride()
    tr.train_step(next(iter(tr.train_loader())))


def test_train_step_validates_the_first_batch_only(data, tmp_path, monkeypatch):
    seen, real = [], T.diffusion_loss
    monkeypatch.setattr(T, 'diffusion_loss', lambda *a, **k: (seen.append(k.get('check', True)), real(*a, **k))[1])
    tr = Trainer(cfg(data), tmp_path, progress=False)
    it = iter(tr.train_loader())
    for _ in range(3): tr.train_step(next(it))
    tr.validate()
    assert seen[:3] == [True, False, False] and not any(seen[3:])


def test_deterministic_option_and_device_ordinal(data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match='deterministic must be True or False'): cfg(data, deterministic='yes')
    assert 'deterministic' in T._RUNTIME_KEYS  # a resume may switch it
    old = T.set_deterministic(True)
    try:
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and os.environ.get('CUBLAS_WORKSPACE_CONFIG')
        T.set_deterministic(False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old['benchmark'], old['deterministic']
        torch.use_deterministic_algorithms(old['algorithms'], warn_only=old['warn_only'])
    # a process that sees one GPU (SLURM-style CUDA_VISIBLE_DEVICES) with LOCAL_RANK 3 uses cuda:0
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert T.resolve_device('cuda', 3) == torch.device('cuda', 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    assert T.resolve_device('cuda', 6) == torch.device('cuda', 2) and T.resolve_device('cuda:1', 6) == torch.device('cuda', 1)


def test_one_tf32_api():
    "torch 2.13: reading the legacy allow_tf32 flags after the fp32_precision API was used raises; condiff uses the new API only."
    import re
    src = ''.join(p.read_text() for p in (REPO / 'condiff').glob('*.py'))
    assert not re.search(r'backends\.(cuda\.matmul|cudnn)\.allow_tf32', src)


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


def test_compile_falls_back_with_a_warning():
    from condiff.unet import build_unet
    torch.manual_seed(0)
    m = build_unet('tiny').eval()
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([5])
    with pytest.warns(RuntimeWarning, match='compile=True: torch.compile failed'):
        c = T.MaybeCompiled(m, 'compile', backend='no-such-backend')
        got = c(x, t, x)
    assert torch.equal(got, m(x, t, x)) and c.compiled is None
    with pytest.raises(ValueError, match='compile must be True or False'): TrainConfig.from_preset('tiny', compile='yes')
