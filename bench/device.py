"""One prepared GPU measurement: condiff against the official stack, in the order of issue 15 (most important first).

Run through `bench/device.sh` (which installs carried wheels first). Writes one JSON line per measurement to stdout and
to OUT/device.jsonl, plus PNGs under OUT. `--dry` runs the same code on the CPU at toy sizes (the pytest does), so the
script cannot rot. Every section is guarded by the time budget (`--budget`, seconds): a section that would not fit is
skipped with a line saying so, and an exception in one section is recorded and the next section runs.

Sections (the `section` field of each line):
  1 parity     device = CPU: UNet forward and backward (tiny and paper preset at 32²), one sampler chain, SSIM maps, metrics
  2 train      paper-preset training images/s and peak memory (batch 16 and 32, 128², bf16 and fp16): condiff eager and
               compiled, and the official stack (diffusers UNet2DModel, DDPMScheduler, fp16 autocast, AdamW), same weights
  3 sample     paper-preset sampling image-steps/s (batch 32 and 128): condiff with CUDA graphs off and on, official stack
  4 fast       sections 2 and 3 for the `fast` preset
  5 attention  the attention share of a forward pass (profiler) against the exp-bound estimate
  7 folds      the batched fold ensemble (10 `fast` models in one pass) against fold after fold
  6 phantom    a 3-minute phantom training run of the paper preset: loss curve and restorations as PNG (last: it takes
               whatever time is left, up to 180 s)

    bash bench/device.sh            # on the device: OUT=$OUT
    bash bench/device.sh --dry      # here, CPU, toy sizes, < 60 s
"""
import argparse, json, math, os, platform, sys, time, traceback, warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
import torch.nn.functional as F


class Bench:
    "JSON lines with a time budget."
    def __init__(self, out: Path, budget: float, dry: bool, device: torch.device):
        self.out, self.budget, self.dry, self.device, self.t0 = out, budget, dry, device, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.f = open(out / 'device.jsonl', 'a')
        self.reserve, self.compile_kw = 0.0, {}

    def elapsed(self): return time.perf_counter() - self.t0
    def left(self): return self.budget - self.elapsed()

    def emit(self, section, name, **rec):
        line = {'section': section, 'name': name, 't': round(self.elapsed(), 2), **rec}
        s = json.dumps(line, default=_jsonable)
        print(s, flush=True); self.f.write(s + '\n'); self.f.flush()
        return line

    def run(self, section, fn, need_s):
        "Run one section if `need_s` seconds are left; record a skip or an error instead of stopping."
        if self.left() < need_s:
            return self.emit(section, 'skipped', reason=f'budget: {self.left():.0f} s left, needs ~{need_s:.0f} s')
        try: fn()
        except Exception as e:
            self.emit(section, 'error', error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        finally: self.sync(); _free()

    def sync(self):
        if self.device.type == 'cuda': torch.cuda.synchronize(self.device)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)): return x.item()
    if isinstance(x, torch.Tensor): return x.tolist()
    return str(x)


def _free():
    import gc
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def _peak_reset(dev):
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev):
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == 'cuda' else None


def _amp(dev, prec):
    "(autocast context factory, dtype) for a precision name."
    dt = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[prec]
    from contextlib import nullcontext
    return (lambda: torch.autocast(dev.type, dtype=dt)) if dt is not None else nullcontext, dt


def _timed(b: Bench, step, warmup: int, iters: int) -> float:
    "Seconds per call of `step` after `warmup` calls (device-synchronised)."
    for _ in range(warmup): step()
    b.sync(); t0 = time.perf_counter()
    for _ in range(iters): step()
    b.sync()
    return (time.perf_counter() - t0) / iters


# ------------------------------------------------------------------------------------------------------------ 1 parity
def parity(b: Bench, cfg):
    from condiff.unet import build_unet
    from condiff.ddpm import DDPMSampler, restore
    from condiff.ssim import anomaly_map, anomaly_score, fp32_precision
    from condiff.metrics import pixel_metrics, image_metrics
    dev, cpu = b.device, torch.device('cpu')
    with fp32_precision('ieee'):
        for preset in cfg['parity_presets']:
            torch.manual_seed(0)
            m = build_unet(preset, 1).float()
            x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)); c = torch.rand(2, 1, 32, 32)
            t = torch.tensor([10, 900])
            outs, grads = {}, {}
            for key, d in (('ref', cpu), ('dev', dev)):
                md = m.to(d); md.zero_grad()
                o = md(x.to(d), t.to(d), c.to(d)); o.square().mean().backward()
                outs[key] = o.detach().cpu()
                grads[key] = torch.cat([p.grad.detach().flatten().cpu() for p in md.parameters()])
            (oa, ob), (ga, gb) = outs.values(), grads.values()
            rel = float((ga - gb).norm() / ga.norm().clamp_min(1e-30))
            b.emit('parity', f'unet-{preset}', size=32, forward_max_abs=float((oa - ob).abs().max()),
                   forward_scale=float(oa.abs().max()), grad_rel_l2=rel, ok=bool((oa - ob).abs().max() < 1e-3 and rel < 1e-3))
            m.to(cpu)
        torch.manual_seed(0)
        m = build_unet('tiny', 1).eval()
        y = torch.rand(3, 1, 32, 32)
        r = {}
        for key, d in (('ref', cpu), ('dev', dev)):
            md = m.to(d)
            r[key] = restore(lambda xt, tt, cc: md(xt, tt, cc), y.to(d), DDPMSampler(), 5, seeds=[1, 2, 3]).cpu()
        ra, rb = r.values()
        b.emit('parity', 'sampler-chain', steps=5, max_abs=float((ra - rb).abs().max()), ok=bool((ra - rb).abs().max() < 1e-3))
        g = torch.Generator().manual_seed(2)
        y1, y2 = torch.rand(4, 3, 48, 48, generator=g), torch.rand(4, 3, 48, 48, generator=g)
        ma = anomaly_map(restoration=y1, image=y2, modality='MRI'); mb = anomaly_map(restoration=y1.to(dev), image=y2.to(dev), modality='MRI').cpu()
        b.emit('parity', 'ssim-maps', max_abs=float((ma - mb).abs().max()), ok=bool((ma - mb).abs().max() < 1e-5))
        masks = torch.rand(4, 1, 48, 48, generator=g) > 0.9
        pa, pb = pixel_metrics(masks, ma), pixel_metrics(masks.to(dev), mb.to(dev))
        ia = image_metrics(torch.tensor([0, 1, 0, 1]), anomaly_score(ma))
        ib = image_metrics(torch.tensor([0, 1, 0, 1]).to(dev), anomaly_score(mb.to(dev)))
        diff = max(abs(pa[k] - pb[k]) for k in pa) + max(abs(ia[k] - ib[k]) for k in ia)
        b.emit('parity', 'metrics', cpu={**pa, **ia}, device={**pb, **ib}, max_abs=diff, ok=bool(diff < 1e-6))


# ------------------------------------------------------------------------------------------------------------ 2 train
def _batch(dev, B, S, C=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(B, C, S, S, generator=g) * 2 - 1).to(dev)
    cond = (torch.rand(B, C, S, S, generator=g) * 2 - 1).to(dev)
    noise = torch.randn(B, C, S, S, generator=g).to(dev)
    t = torch.randint(0, 1000, (B,), generator=g).to(dev)
    return x0, cond, noise, t


def _condiff_trainer(b, preset, prec, compiled, B, S):
    "A condiff training step as the Trainer runs it (fused AdamW on CUDA, EMA, grad clip, scaler for fp16)."
    from condiff.unet import build_unet
    from condiff.ddpm import NoiseSchedule, diffusion_loss
    from condiff.train import EMA
    dev = b.device
    torch.manual_seed(0)
    model = build_unet(preset, 1).to(dev)
    net = torch.compile(model, **b.compile_kw) if compiled else model
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2, **({'fused': True} if dev.type == 'cuda' else {}))
    ac, dt = _amp(dev, prec)
    scaler = torch.amp.GradScaler(dev.type) if dt == torch.float16 and dev.type == 'cuda' else None
    sched = NoiseSchedule()
    x0, cond, noise, t = _batch(dev, B, S)
    def fn(xt, tt, cc):
        with ac(): return net(xt, tt, cc).float()
    def step():
        loss = diffusion_loss(fn, x0, cond, sched, t, noise, snr_gamma=1.0, check=False)
        opt.zero_grad(set_to_none=True)
        if scaler is not None: scaler.scale(loss).backward(); scaler.unscale_(opt)
        else: loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None: scaler.step(opt); scaler.update()
        else: opt.step()
        ema.update(model)
    return model, step


def _official_trainer(b, preset, B, S, weights=None):
    "The official stack: diffusers UNet2DModel (official config), DDPMScheduler.add_noise, Min-SNR, fp16 autocast, AdamW."
    from diffusers import UNet2DModel, DDPMScheduler
    from diffusers.training_utils import compute_snr, EMAModel
    from condiff.unet import build_unet, diffusers_config, condiff_to_diffusers
    dev = b.device
    torch.manual_seed(0)
    ref = build_unet(preset, 1)
    unet = UNet2DModel(**diffusers_config(ref.config))
    unet.load_state_dict(condiff_to_diffusers(ref.state_dict()))  # the same weights as condiff's
    unet.to(dev).train()
    ema = EMAModel(unet.parameters())
    sched = DDPMScheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    amp = dev.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda') if amp else None
    x0, cond, noise, t = _batch(dev, B, S)
    def step():
        noisy = sched.add_noise(x0, noise, t)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):  # CPU (dry): fp32
            pred = unet(torch.cat([noisy, cond], 1), t).sample
        snr = compute_snr(sched, t)
        w = torch.stack([snr, torch.ones_like(snr)], 1).min(1)[0] / snr
        loss = (F.mse_loss(pred.float(), noise.float(), reduction='none').mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        if scaler is not None: scaler.scale(loss).backward(); scaler.unscale_(opt)
        else: loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        if scaler is not None: scaler.step(opt); scaler.update()
        else: opt.step()
        ema.step(unet.parameters())
    return unet, step


def train_section(b: Bench, cfg, preset, section):
    S, dev = cfg['size'], b.device
    runs = []
    for B in cfg['train_batches']:
        for prec in cfg['precisions']: runs.append(('condiff', prec, False, B))
        runs.append(('official', 'fp16' if dev.type == 'cuda' else 'fp32', False, B))
    for B, prec in cfg['compiled']: runs.append(('condiff', prec, True, B))
    base = {}
    for stack, prec, compiled, B in runs:
        need = cfg['compile_s'] if compiled else cfg['config_s']
        if b.left() - b.reserve < need:
            b.emit(section, 'skipped', stack=stack, precision=prec, compiled=compiled, batch=B, reason='budget'); continue
        try:
            _peak_reset(dev)
            t0 = time.perf_counter()
            model, step = (_official_trainer(b, preset, B, S) if stack == 'official' else
                           _condiff_trainer(b, preset, prec, compiled, B, S))
            step(); b.sync(); first = time.perf_counter() - t0  # includes compilation
            sec = _timed(b, step, cfg['warmup'], cfg['iters'])
            ips = B / sec
            key = (B,)
            if stack == 'official': base[key] = ips
            rec = b.emit(section, 'train', preset=preset, stack=stack, precision=prec, compiled=compiled, batch=B, size=S,
                         images_per_s=round(ips, 2), step_ms=round(sec * 1e3, 2), first_step_s=round(first, 2),
                         peak_mem_gib=_peak_gib(dev))
            del model, step
        except Exception as e:
            b.emit(section, 'error', stack=stack, precision=prec, compiled=compiled, batch=B, error=f"{type(e).__name__}: {e}",
                   trace=traceback.format_exc()[-1500:])
        _free()
    b.emit(section, 'train-baseline', preset=preset, official_images_per_s={str(k[0]): round(v, 2) for k, v in base.items()},
           target='condiff >= 1.5x official images/s')


# ------------------------------------------------------------------------------------------------------------ 3 sample
def sample_section(b: Bench, cfg, preset, section):
    from condiff.unet import build_unet, diffusers_config, condiff_to_diffusers
    from condiff.inference import restore_dataset, slice_seeds
    S, dev, K = cfg['size'], b.device, cfg['sample_steps']
    torch.manual_seed(0)
    model = build_unet(preset, 1).to(dev).eval()
    results = {}
    for B in cfg['sample_batches']:
        y = torch.rand(B, 1, S, S) * 2 - 1
        seeds = slice_seeds(0, [f"s/z{i:03d}" for i in range(B)])
        for graphs in (False, True):
            if b.left() - b.reserve < cfg['config_s']: b.emit(section, 'skipped', stack='condiff', batch=B, cuda_graphs=graphs, reason='budget'); continue
            _peak_reset(dev)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter('always')
                run = lambda: restore_dataset(model, y, seeds, 'ddpm', K, batch_size=B, device=dev, progress=False, cuda_graphs=graphs)  # noqa: E731
                run()  # warm-up (and capture)
                sec = _timed(b, run, 0, cfg['sample_iters'])
            isps = B * K / sec
            results[('condiff', graphs, B)] = isps
            b.emit(section, 'sample', preset=preset, stack='condiff', precision='bf16' if dev.type == 'cuda' else 'fp32',
                   cuda_graphs=graphs, batch=B, size=S, steps=K, image_steps_per_s=round(isps, 2),
                   ms_per_step=round(sec / K * 1e3, 2), peak_mem_gib=_peak_gib(dev),
                   warnings=[str(x.message)[:200] for x in w if 'cuda_graphs' in str(x.message)])
        if b.left() - b.reserve < cfg['config_s']: b.emit(section, 'skipped', stack='official', batch=B, reason='budget'); continue
        try:
            from diffusers import UNet2DModel, DDPMScheduler
            unet = UNet2DModel(**diffusers_config(model.config))
            unet.load_state_dict(condiff_to_diffusers({k: v.cpu() for k, v in model.state_dict().items()}))
            unet.to(dev).eval()
            sch = DDPMScheduler()
            cond = y.to(dev)
            @torch.no_grad()
            def official():
                sch.set_timesteps(K)
                x = torch.randn(cond.shape, device=dev)
                for t in sch.timesteps:
                    with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == 'cuda'):
                        eps = unet(torch.cat([x, cond], 1), t).sample
                    x = sch.step(eps.float(), t, x).prev_sample
                return x
            _peak_reset(dev)
            official()
            sec = _timed(b, official, 0, cfg['sample_iters'])
            isps = B * K / sec
            results[('official', False, B)] = isps
            b.emit(section, 'sample', preset=preset, stack='official', precision='fp16' if dev.type == 'cuda' else 'fp32',
                   cuda_graphs=False, batch=B, size=S, steps=K, image_steps_per_s=round(isps, 2),
                   ms_per_step=round(sec / K * 1e3, 2), peak_mem_gib=_peak_gib(dev))
            del unet
        except Exception as e:
            b.emit(section, 'error', stack='official', batch=B, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        _free()
    sp = {str(B): round(max(results.get(('condiff', g, B), 0) for g in (False, True)) / results[('official', False, B)], 3)
          for B in cfg['sample_batches'] if results.get(('official', False, B))}
    b.emit(section, 'sample-speedup', preset=preset, condiff_best_over_official=sp, target='>= 2x official image-steps/s')


# ------------------------------------------------------------------------------------------------------------ 5 attention
EXP_PER_CLK_PER_SM = 16  # MUFU ex2 throughput per SM per clock (Hopper); an assumption, reported with the estimate


def attention_section(b: Bench, cfg):
    from torch.profiler import profile, ProfilerActivity
    from condiff.unet import build_unet, Attention
    dev, S, B = b.device, cfg['size'], cfg['attn_batch']
    torch.manual_seed(0)
    model = build_unet(cfg['preset'], 1).to(dev).eval()
    exps = []
    hooks = [m.register_forward_hook(lambda mod, i, o: exps.append(mod.heads * (i[0].shape[-1] * i[0].shape[-2]) ** 2))
             for m in model.modules() if isinstance(m, Attention)]
    x = torch.randn(B, 1, S, S, device=dev); t = torch.full((B,), 500, device=dev)
    ac, _ = _amp(dev, 'bf16' if dev.type == 'cuda' else 'fp32')
    with torch.no_grad(), ac(): model(x, t, x)
    for h in hooks: h.remove()
    exp_per_image = sum(exps)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
    with torch.no_grad(), ac():
        for _ in range(2): model(x, t, x)
        b.sync()
        with profile(activities=acts) as prof:
            model(x, t, x); b.sync()
    evs = prof.key_averages()
    names = ('flash', 'fmha', 'attention', 'sdpa', 'scaled_dot_product')
    if dev.type == 'cuda':  # kernel events only (the aten ops that launch them would count the time twice)
        kern = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
        tot = sum(e.self_device_time_total for e in kern)
        att = sum(e.self_device_time_total for e in kern if any(s in e.key.lower() for s in names))
        top = sorted(kern, key=lambda e: -e.self_device_time_total)[:6]
        top = [(e.key[:80], round(e.self_device_time_total / 1e3, 3)) for e in top]
    else:
        tot = sum(e.self_cpu_time_total for e in evs)
        att = sum(e.self_cpu_time_total for e in evs if any(s in e.key.lower() for s in names))
        top = [(e.key[:80], round(e.self_cpu_time_total / 1e3, 3)) for e in sorted(evs, key=lambda e: -e.self_cpu_time_total)[:6]]
    rec = dict(top_ms=top, preset=cfg['preset'], batch=B, size=S, total_ms=round(tot / 1e3, 3), attention_ms=round(att / 1e3, 3),
               attention_share=round(att / tot, 4) if tot else None, exp_per_image_forward=exp_per_image)
    if dev.type == 'cuda':
        p = torch.cuda.get_device_properties(dev)
        clk = getattr(p, 'clock_rate', None)
        hz = clk * 1e3 if clk else 1.98e9
        rate = p.multi_processor_count * EXP_PER_CLK_PER_SM * hz
        rec.update(exp_bound_ms=round(B * exp_per_image / rate * 1e3, 3), sms=p.multi_processor_count, clock_hz=hz,
                   exp_rate_per_s=rate, note=f'exp bound = exps / (SMs x {EXP_PER_CLK_PER_SM} per clock x clock)')
    b.emit('attention', 'attention-share', **rec)


# ------------------------------------------------------------------------------------------------------------ 7 folds
def folds_section(b: Bench, cfg):
    "Batched fold ensemble (FoldStack) against fold after fold on the device: fold-images/s, peak memory, max difference."
    from condiff.unet import build_unet
    from condiff.inference import restore_folds, slice_seeds
    dev, S, F_, B, K = b.device, cfg['size'], cfg['ens_folds'], cfg['ens_batch'], cfg['sample_steps']
    models = []
    for f in range(F_):
        torch.manual_seed(100 + f); models.append(build_unet(cfg['preset'], 1).to(dev).eval())
    y = torch.rand(B, 1, S, S) * 2 - 1
    seeds = slice_seeds(0, [f"e/z{i:03d}" for i in range(B)])
    out, rate = {}, {}
    for batched in (False, True):
        _peak_reset(dev)
        run = lambda: restore_folds(models, y, seeds, 'ddpm', K, batch_size=B, device=dev, batched=batched, progress=False)  # noqa: E731
        out[batched] = run()
        sec = _timed(b, run, 0, 1)
        rate[batched] = F_ * B / sec
        b.emit('folds', 'ensemble', preset=cfg['preset'], folds=F_, batch=B, size=S, steps=K, batched=batched,
               images_per_s=round(rate[batched], 2), image_steps_per_s=round(rate[batched] * K, 2), peak_mem_gib=_peak_gib(dev))
    b.emit('folds', 'ensemble-summary', preset=cfg['preset'], speedup=round(rate[True] / rate[False], 3),
           max_restoration_diff=float((out[True] - out[False]).abs().max()))


# ------------------------------------------------------------------------------------------------------------ 6 phantom
def phantom_section(b: Bench, cfg):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from condiff.experiment import get_dataset
    from condiff.data import save_sliceset, to_model_space
    from condiff.train import TrainConfig, Trainer
    from condiff.inference import restore_dataset, slice_seeds
    from condiff.ssim import anomaly_map
    work = Path(cfg['work']); work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kw = dict(seed=0, cache_dir=False, progress=False)
    sz = dict(n_subjects=cfg['phantom_subjects'], slice_step=cfg['phantom_slice_step'])
    tr = get_dataset('phantom-brain', 'train', sequence='t2', **sz, **kw)
    va = get_dataset('phantom-brain', 'val', sequence='t2', **sz, **kw)
    te = get_dataset('phantom-brats', 'test', sequence='t2', n_subjects=4, **kw)
    save_sliceset(tr, work / 'train.npz'); save_sliceset(va, work / 'val.npz')
    data_s = time.perf_counter() - t0
    tc = TrainConfig.from_preset('paper', unet=cfg['preset'], dataset='phantom-brain', sequence='t2', train_data=str(work / 'train.npz'),
                                 val_data=str(work / 'val.npz'), device=str(b.device), batch_size=cfg['phantom_batch'],
                                 num_workers=cfg['workers'], max_steps=10**6, val_start=10**6, checkpoint_every=10**6,
                                 log_every=10**6)
    trainer = Trainer(tc, work / 'runs', resume=False, progress=False)
    it = iter(trainer.train_loader())
    losses, secs = [], min(cfg['phantom_s'], max(5.0, b.left() - cfg['phantom_reserve_s']))
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < secs:
        loss = trainer.train_step(next(it)); trainer.step += 1
        if trainer.step % 10 == 0 or trainer.step == 1: losses.append((trainer.step, loss))
    b.sync()
    wall = time.perf_counter() - t1
    losses = [(s, float(l)) for s, l in losses]
    fig, ax = plt.subplots(figsize=(6, 3.5)); ax.semilogy(*zip(*losses)); ax.set_xlabel('step'); ax.set_ylabel('Min-SNR ε-loss')
    ax.set_title(f"{cfg['preset']} preset, phantom-brain T2, batch {cfg['phantom_batch']}, {wall:.0f} s"); fig.tight_layout()
    fig.savefig(b.out / 'phantom_loss.png', dpi=90); plt.close(fig)
    idx = np.argsort(-te.masks.reshape(len(te), -1).sum(1))[:cfg['phantom_restore']]
    sub = te.subset(idx.tolist())
    trainer.ema.copy_to(trainer.model); trainer.model.eval()
    y = to_model_space(torch.from_numpy(sub.images), 'MRI')
    t2 = time.perf_counter()
    r = restore_dataset(trainer.model, y, slice_seeds(0, sub.ids), 'ddpm', cfg['phantom_steps'], batch_size=len(sub),
                        device=b.device, progress=False)
    restore_s = time.perf_counter() - t2
    maps = anomaly_map(restoration=r, image=y, modality='MRI')
    n = len(sub)
    fig, axs = plt.subplots(3, n, figsize=(2 * n, 6), squeeze=False)
    for i in range(n):
        for row, im, title in ((0, sub.images[i, 0], 'input'), (1, r[i, 0].clamp(0, 1).numpy(), 'restoration'),
                               (2, maps[i, 0].numpy(), 'map')):
            axs[row, i].imshow(im, cmap='gray' if row < 2 else 'magma', vmin=0, vmax=1 if row < 2 else None)
            axs[row, i].set_axis_off(); axs[row, i].set_title(title, fontsize=8)
    fig.tight_layout(); fig.savefig(b.out / 'phantom_restorations.png', dpi=80); plt.close(fig)
    b.emit('phantom', 'phantom-train', preset=cfg['preset'], batch=cfg['phantom_batch'], steps=trainer.step,
           train_s=round(wall, 1), images_per_s=round(trainer.step * cfg['phantom_batch'] / wall, 2), data_s=round(data_s, 1),
           train_slices=len(tr), first_loss=losses[0][1], last_loss=losses[-1][1], losses=losses[::max(1, len(losses) // 60)],
           restore_steps=cfg['phantom_steps'], restore_s=round(restore_s, 2), restored=n,
           lesion_map_mean=float(maps[torch.from_numpy(sub.masks)].mean()), healthy_map_mean=float(maps[torch.from_numpy(~sub.masks) & (y > 0)].mean()),
           pngs=['phantom_loss.png', 'phantom_restorations.png'])
    trainer._close()


# ------------------------------------------------------------------------------------------------------------ main
def configs(dry: bool, out: Path):
    if dry:
        common = dict(size=32, train_batches=[2], precisions=['fp32'], compiled=[(2, 'fp32')], warmup=1, iters=1, config_s=1, compile_s=1,
                      sample_batches=[2], sample_steps=2, sample_iters=1, parity_presets=['tiny'], attn_batch=2,
                      workers=0, phantom_subjects=1, phantom_slice_step=20, ens_folds=3, ens_batch=2, phantom_batch=2, phantom_s=3, phantom_reserve_s=0, phantom_restore=2,
                      phantom_steps=2, work=str(out / 'work'))
        return dict(folds={**common, 'preset': 'tiny'}, paper={**common, 'preset': 'tiny'}, fast={**common, 'preset': 'tiny'}, attention={**common, 'preset': 'tiny'},
                    phantom={**common, 'preset': 'tiny'}, parity=common)
    common = dict(size=128, train_batches=[16, 32], precisions=['bf16', 'fp16'], compiled=[(32, 'bf16')], warmup=3, iters=10,
                  config_s=25, compile_s=90, sample_batches=[32, 128], sample_steps=5, sample_iters=2,
                  parity_presets=['tiny', 'paper'], attn_batch=32, workers=8, phantom_subjects=12, phantom_slice_step=None,
                  ens_folds=10, ens_batch=16, phantom_batch=32,
                  phantom_s=180, phantom_reserve_s=45, phantom_restore=4, phantom_steps=50, work='/tmp/condiff-device')
    return dict(folds={**common, 'preset': 'fast'}, paper={**common, 'preset': 'paper'}, fast={**common, 'preset': 'fast', 'train_batches': [32], 'compiled': [],
                                                            'sample_batches': [128]},
                attention={**common, 'preset': 'paper'}, phantom={**common, 'preset': 'paper'}, parity=common)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=os.environ.get('OUT', 'runs/device'), help='where device.jsonl and the PNGs go (default: $OUT)')
    p.add_argument('--dry', action='store_true', help='CPU, toy sizes: the same code, for the pytest')
    p.add_argument('--budget', type=float, default=None, help='seconds for the whole run (default: 450; dry: 55)')
    p.add_argument('--sections', default='1,2,3,4,5,7,6', help='which sections, e.g. 1,2,6 (they run in the order 1-5, 7, 6)')
    a = p.parse_args(argv)
    out = Path(a.out)
    dev = torch.device('cpu' if a.dry or not torch.cuda.is_available() else 'cuda')
    b = Bench(out, a.budget if a.budget is not None else (55 if a.dry else 450), a.dry, dev)
    # dry: torch.compile with the eager backend (the same tracing code path, no compiler); GPU: inductor
    b.compile_kw = {'backend': 'eager'} if a.dry else {}
    cf = configs(a.dry, out)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = 'tf32'
        torch.backends.cudnn.benchmark = True
    else: torch.set_num_threads(1)  # a CPU run is a toy: one thread (no OpenMP spin-waits on a busy machine)
    info = dict(dry=a.dry, device=str(dev), torch=torch.__version__, python=platform.python_version(), budget_s=b.budget,
                gpu=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else None, cpu_count=os.cpu_count())
    try:
        import diffusers; info['diffusers'] = diffusers.__version__
    except ImportError as e: info['diffusers'] = f'missing ({e}): carry its wheel (bench/README.md)'
    try:
        import subprocess
        info['commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip() or None
    except Exception: info['commit'] = None
    b.emit('start', 'info', **info)
    want = {int(s) for s in a.sections.split(',') if s}
    plan = [(1, 'parity', lambda: parity(b, cf['parity']), 5 if a.dry else 30),
            (2, 'train', lambda: train_section(b, cf['paper'], cf['paper']['preset'], 'train'), 5 if a.dry else 60),
            (3, 'sample', lambda: sample_section(b, cf['paper'], cf['paper']['preset'], 'sample'), 3 if a.dry else 40),
            (4, 'fast', lambda: (train_section(b, cf['fast'], cf['fast']['preset'], 'fast-train'),
                                 sample_section(b, cf['fast'], cf['fast']['preset'], 'fast-sample')), 3 if a.dry else 40),
            (5, 'attention', lambda: attention_section(b, cf['attention']), 2 if a.dry else 15),
            (7, 'folds', lambda: folds_section(b, cf['folds']), 2 if a.dry else 30),
            (6, 'phantom', lambda: phantom_section(b, cf['phantom']), 3 if a.dry else 90)]
    plan = [x for x in plan if x[0] in want]
    for i, (k, name, fn, need) in enumerate(plan):
        b.reserve = sum(x[3] for x in plan[i + 1:])  # keep the minimum of every later section
        b.run(name, fn, need)
    b.emit('end', 'done', wall_s=round(b.elapsed(), 1))


if __name__ == '__main__':
    main()
