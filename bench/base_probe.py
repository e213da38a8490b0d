"""Does a model restore, and from which noise level on? A probe of MRI weights files, each against the identity.

For every weights file given (e.g. the shipped `base-mri` and a longer-trained candidate), on `--n` healthy slices of
each phantom MRI test set (their healthy references, `SliceSet.healthy`):
- *x0-prediction removal at t*: the slice is corrupted by the synthetic tasks (`--tasks`, as in training) or is the
  phantom's lesioned version; the clean slice is diffused to `x_t` and the model predicts x0 from (x_t, t, cond). Removal
  = 1 − mean|x̂0 − x| / mean|cond − x| over the pixels the corruption changed (> 0.02). The identity (x̂0 = cond) scores 0,
  a perfect restoration 1. A model that only copies its condition scores about 0 at every t; one that restores scores
  well at t ≈ T, where sampling starts.
- *restoration removal*: the same, for the full DDIM-10 restoration of the corrupted slice from pure noise.

Prints one JSON line per measurement.

    .venv/bin/python bench/base_probe.py condiff/weights/base-mri.safetensors runs/mriB/base-mri/cpu/fold0/checkpoints/latest/ema.safetensors
"""
import argparse, json, os


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('weights', nargs='+', help='MRI weights files (.safetensors) of the `cpu` UNet')
    p.add_argument('--testsets', default='phantom-brats-t2,phantom-brats-t1,phantom-atlas', help='comma-separated MRI test sets')
    p.add_argument('--tasks', default='0,1,2', help='synthetic tasks that corrupt the healthy slices')
    p.add_argument('--n', type=int, default=60, help='slices per test set (evenly spaced)')
    p.add_argument('--t', default='999,700,400,100,20', help='timesteps of the x0-prediction probe')
    a = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import numpy as np, torch
    torch.set_num_threads(1)
    from condiff.unet import build_unet
    from condiff.train import init_from_weights
    from condiff.pipeline import load_testset
    from condiff.inference import restore_dataset
    from condiff.tasks import RestorationTask
    from condiff.ddpm import NoiseSchedule, q_sample

    tasks, ts_ = tuple(int(i) for i in a.tasks.split(',')), [int(t) for t in a.t.split(',')]
    sched = NoiseSchedule()
    removal = lambda pred, cond, x, ch: float(1 - (pred - x).abs()[ch].mean() / (cond - x).abs()[ch].mean())
    for name in a.testsets.split(','):
        ts = load_testset(name, preset='cpu', test_images=a.n)
        if ts.healthy is None: raise SystemExit(f"{name}: no healthy references (not a phantom test set)")
        x = torch.from_numpy(ts.healthy.astype(np.float32))
        rt = RestorationTask(tasks, ts.healthy.astype(np.float32), None, p_no_aug=0.0, has_bg=True)
        conds = {'tasks': torch.from_numpy(np.stack([rt(ts.healthy[i].astype(np.float32), np.random.default_rng(i))[0]
                                                     for i in range(len(x))]).astype(np.float32)),
                 'lesion': torch.from_numpy(ts.images.astype(np.float32))}
        for w in a.weights:
            m = build_unet('cpu', 1); init_from_weights(m, w); m.eval()
            for kind, cond in conds.items():
                ch = (cond - x).abs() > 0.02
                if not ch.any(): continue
                g = torch.Generator().manual_seed(0)
                rec = dict(testset=name, weights=w, corruption=kind, changed_px=round(float(ch.float().mean()), 4))
                for t in ts_:
                    tt = torch.full((len(x),), t)
                    with torch.no_grad(): x0 = m(q_sample(sched, x, tt, torch.randn(x.shape, generator=g)), tt, cond)
                    rec[f"x0_removal_t{t}"] = round(removal(x0, cond, x, ch), 3)
                r = restore_dataset(m, cond, list(range(len(x))), 'ddim', 10, progress=False)
                rec['ddim10_removal'] = round(removal(r, cond, x, ch), 3)
                fg = (x > 0) & ~ch
                rec['ddim10_healthy_error'] = round(float((r - cond).abs()[fg].mean()), 4)
                print(json.dumps(rec), flush=True)


if __name__ == '__main__':
    main()
