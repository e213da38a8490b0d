"""Batched fold ensemble against fold-after-fold restoration, on this machine, in one run.

For each case, F fold models (the same architecture, different random weights: speed and equality do not need trained
models) restore N test-like slices with the same per-slice seeds, once per fold (`restore_folds(batched=False)`, i.e.
`restore_dataset` per model) and once with all folds in one batched pass (`batched=True`, `FoldStack`: stacked weights,
`vmap` + `functional_call`). Each path runs in its own child process, so its peak RSS is its own. One JSON line per
path (wall time, fold-images per second, peak RSS), then one per case with the speed-up and the largest difference of
the restorations and of the SSIM anomaly maps between the two paths.

Cases: `tiny-32` (the tiny preset, 3 folds, 8 slices at 32x32: the size of the pytest) and `embedded` (the CPU default
of the embedded run, RUN_DEFAULTS['tiny']: the tiny preset at 128x128, DDIM 10 steps, 32 images per call, 10 folds).

    nice -n 10 .venv/bin/python bench/ensemble.py --threads 1
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

CASES = {
    'tiny-32': dict(preset='tiny', folds=3, slices=8, size=32, sampler='ddim', steps=10, batch_size=8),
    'embedded': dict(preset='tiny', folds=10, slices=32, size=128, sampler='ddim', steps=10, batch_size=32),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(case: dict, path: str, out: str, threads: int, seed: int = 0):
    "Build the models and inputs, restore with one path, save the restorations to `out`, print one JSON line."
    import torch
    torch.set_num_threads(threads)
    from condiff.inference import restore_folds, slice_seeds
    from condiff.unet import build_unet
    models = []
    for f in range(case['folds']):
        torch.manual_seed(1000 + f); models.append(build_unet(case['preset'], 1).eval())
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, case['size']), torch.linspace(-1, 1, case['size']), indexing='ij')
    disc = ((yy ** 2 + xx ** 2) < 0.7).float()
    y = disc * (0.3 + 0.4 * torch.rand(case['slices'], 1, case['size'], case['size'], generator=g))  # MRI-like, zero background
    seeds = slice_seeds(seed, [f"bench/z{i:03d}" for i in range(case['slices'])])
    kw = dict(sampler=case['sampler'], num_steps=case['steps'], batch_size=case['batch_size'], progress=False)
    restore_folds(models, y[:1], seeds[:1], **{**kw, 'num_steps': 1}, batched=path == 'batched')  # warm-up
    rss0 = rss_mb()
    t0 = time.perf_counter()
    r = restore_folds(models, y, seeds, **kw, batched=path == 'batched')
    wall = time.perf_counter() - t0
    torch.save({'r': r, 'y': y}, out)
    n = case['folds'] * case['slices']
    print(json.dumps({'bench': 'ensemble', 'path': path, **case, 'threads': threads, 'wall_s': round(wall, 3),
                      'images_per_s': round(n / wall, 3), 'image_steps_per_s': round(n * case['steps'] / wall, 2),
                      'rss_before_mb': round(rss0, 1), 'peak_rss_mb': round(rss_mb(), 1)}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    p.add_argument('--threads', type=int, default=1, help='torch threads per path (default 1)')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--path', default=None, help=argparse.SUPPRESS)
    p.add_argument('--to', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(CASES[a.worker], a.path, a.to, a.threads)
    import torch
    from condiff.ssim import anomaly_map
    tmp = Path(tempfile.mkdtemp(prefix='condiff-bench-ensemble-'))
    env = {**os.environ, 'OMP_NUM_THREADS': str(a.threads)}
    for name in a.cases:
        recs, outs = {}, {}
        for path in ('per-fold', 'batched'):
            outs[path] = tmp / f"{name}-{path}.pt"
            res = subprocess.run([sys.executable, __file__, '--worker', name, '--path', path, '--to', str(outs[path]),
                                  '--threads', str(a.threads)], capture_output=True, text=True, env=env)
            if res.returncode: raise SystemExit(f"{name}/{path} failed:\n{res.stderr[-3000:]}")
            line = [l for l in res.stdout.splitlines() if l.startswith('{')][-1]
            recs[path] = json.loads(line); recs[path]['case'] = name
            print(json.dumps(recs[path]), flush=True)
        A, B = torch.load(outs['per-fold']), torch.load(outs['batched'])
        y = A['y'] * 1.0  # model space of MRI = [0, 1]
        ma = torch.stack([anomaly_map(restoration=A['r'][f], image=y, modality='MRI') for f in range(len(A['r']))])
        mb = torch.stack([anomaly_map(restoration=B['r'][f], image=y, modality='MRI') for f in range(len(B['r']))])
        print(json.dumps({'bench': 'ensemble', 'case': name, 'summary': True,
                          'speedup': round(recs['per-fold']['wall_s'] / recs['batched']['wall_s'], 3),
                          'images_per_s': {k: v['images_per_s'] for k, v in recs.items()},
                          'peak_rss_mb': {k: v['peak_rss_mb'] for k, v in recs.items()},
                          'max_restoration_diff': float((A['r'] - B['r']).abs().max()),
                          'max_map_diff': float((ma - mb).abs().max()),
                          'max_ensemble_map_diff': float((ma.mean(0) - mb.mean(0)).abs().max()),
                          'loadavg': [round(x, 2) for x in os.getloadavg()], 'cpu_count': os.cpu_count(),
                          'torch': torch.__version__}), flush=True)


if __name__ == '__main__':
    main()
