"""Benchmark of condiff.unet against diffusers' UNet2DModel with the same configuration and the same weights.

For each case it times condiff and diffusers alternately (so both see the same machine load) and prints one JSON line
per measurement: wall seconds (min and median over `--reps`), process CPU seconds (min; with `--threads 1` the figure
least disturbed by other jobs on a shared machine), the ratio diffusers / condiff of the minimum wall times (> 1: condiff
faster), and the max abs difference of the two outputs.

    .venv/bin/python bench/unet.py                          # CPU: tiny training step (b16) and forward (b64) at 128²,
                                                            #      paper forward at 32² (b2), 2 torch threads
    .venv/bin/python bench/unet.py --widths 8,16,32,64      # try other tiny widths (the sizing study)
    .venv/bin/python bench/unet.py --device cuda --dtype bf16 --cases paper128,fast128   # on a GPU

Cases: tiny_train (AdamW step, batch 16), tiny_fwd (no-grad forward, batch 64), paper32 (paper forward, batch 2, 32²),
paper128 / fast128 (forward, batch 8, 128²; for a GPU). Inputs are 1 → 1 channels (MRI).
"""
import argparse, json, os, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
from diffusers import UNet2DModel
from condiff.unet import build_unet, condiff_to_diffusers, diffusers_config

CASES = {  # name: (preset, batch, size, train)
    'tiny_train': ('tiny', 16, 128, True), 'tiny_fwd': ('tiny', 64, 128, False), 'paper32': ('paper', 2, 32, False),
    'paper128': ('paper', 8, 128, False), 'fast128': ('fast', 8, 128, False)}


def sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()


def run_case(name, args):
    preset, batch, size, train = CASES[name]
    dev, cl = args.device, torch.channels_last if args.channels_last else torch.contiguous_format
    over = {'block_out_channels': tuple(int(c) for c in args.widths.split(','))} if args.widths and preset == 'tiny' else {}
    torch.manual_seed(0)
    ours = build_unet(preset, 1, **over)
    ref = UNet2DModel(sample_size=size, **diffusers_config(ours.config))
    ref.load_state_dict(condiff_to_diffusers(ours.state_dict()))
    models = {'condiff': ours.to(dev, memory_format=cl), 'diffusers': ref.to(dev, memory_format=cl)}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 2, size, size, generator=g).to(dev, memory_format=cl)
    t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
    amp = torch.autocast(dev.split(':')[0], dtype=torch.bfloat16) if args.dtype == 'bf16' else torch.autocast(dev.split(':')[0], enabled=False)
    fns = {}
    for impl, m in models.items():
        call = (lambda m: lambda: m.forward_concat(x, t)) if impl == 'condiff' else (lambda m: lambda: m(x, t).sample)
        f = call(m)
        if train:
            m.train(); opt = torch.optim.AdamW(m.parameters(), 1e-4)
            def step(f=f, opt=opt):
                opt.zero_grad(set_to_none=True)
                with amp: loss = f().float().pow(2).mean()
                loss.backward(); opt.step()
            fns[impl] = step
        else:
            m.eval()
            def fwd(f=f):
                with torch.no_grad(), amp: return f()
            fns[impl] = fwd
    with torch.no_grad(), amp:
        diff = (models['condiff'].forward_concat(x[:2], t[:2]).float() - models['diffusers'](x[:2], t[:2]).sample.float()).abs().max().item()
    times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(args.warmup):
        for f in fns.values(): f()
    sync(dev)
    for _ in range(args.reps):
        for impl, f in fns.items():
            sync(dev); t0, c0 = time.perf_counter(), time.process_time(); f(); sync(dev)
            times[impl].append(time.perf_counter() - t0); cpu[impl].append(time.process_time() - c0)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    for impl, ts in times.items():
        rec = dict(bench='unet', case=name, impl=impl, preset=preset, widths=list(ours.config['block_out_channels']),
                   params=sum(p.numel() for p in ours.parameters()), what='train_step' if train else 'forward',
                   batch=batch, size=size, device=dev, dtype=args.dtype, channels_last=args.channels_last,
                   threads=torch.get_num_threads(), seconds_min=round(min(ts), 4), seconds_median=round(statistics.median(ts), 4),
                   cpu_seconds_min=round(min(cpu[impl]), 4),
                   ratio_diffusers_over_condiff_min=round(min(times['diffusers']) / min(times['condiff']), 3),
                   max_abs_diff=diff, load_avg_1min=load)
        print(json.dumps(rec), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cases', default='tiny_train,tiny_fwd,paper32', help=f"comma-separated, from {sorted(CASES)}")
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16'], help='bf16 = torch.autocast bfloat16')
    p.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--widths', default='', help='override the tiny preset widths, e.g. 8,16,32,64')
    p.add_argument('--contiguous', dest='channels_last', action='store_false', help='NCHW instead of channels_last')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for c in args.cases.split(','):
        if c not in CASES: p.error(f"unknown case {c!r}; choose from {sorted(CASES)}")
        run_case(c, args)


if __name__ == '__main__':
    main()
