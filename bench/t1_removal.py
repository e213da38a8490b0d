"""Why BraTS-T1 lesion removal stays near 0.2: three training levers and one sampling lever on the shipped MRI base.

Each training arm trains the shipped MRI base on for `--steps` steps with `condiff.train.build_base` (tasks 0, 1, 2, 4,
warm-up 100, the `cpu` preset: the command that made the shipped base, `condiff pretrain mri --tasks 0,1,2,4
--init-weights base --lr-warmup 100`) and writes its float16 weights to OUT/<arm>/ (never the package's folder):
- `control`: nothing else changed (the extra steps alone);
- `anomaly-weight-60`: the loss weighs the pixels a synthetic anomaly changed 61× instead of 21× (`anomaly_weight=60`);
- `faint-intensity`: the intensity task (id 4) draws half the magnitude, m = 0.025 + Gamma(3, 0.05) instead of the
  official 0.05 + Gamma(3, 0.1) (`condiff.tasks.intensity_patch(scale=0.05)`, patched for this process only), so more
  of its anomalies are as faint as the phantom T1 oedema (10–20% darker).
The sampling arm `passes-K` restores with the shipped base K times in a row, each pass conditioned on the previous
restoration (K = 1 is the CPU default).

Every arm is scored like `bench/base_eval.py --steps 2`: 40 evenly spaced slices of each phantom MRI test set, DDIM 2
steps, seed 0, AP_p and max-Dice of the 1 − SSIM maps, lesion removal and healthy fidelity (`RestorationMeter`).
An arm whose weights are already in OUT is not trained again. Prints one JSON line per (arm, test set).

    nice .venv/bin/python bench/t1_removal.py --out runs/bench-t1 [--steps 600] [--arms control,anomaly-weight-60,faint-intensity,passes]
"""
import argparse, functools, json, os, time
from pathlib import Path

TRAIN_ARMS = {'control': {}, 'anomaly-weight-60': {'anomaly_weight': 60.0}, 'faint-intensity': {'intensity_scale': 0.05}}


def train_arm(name, out, steps):
    "Train one arm in this process (the intensity patch is undone afterwards); returns the weights file."
    import condiff.tasks as T
    from condiff.train import build_base
    over = dict(TRAIN_ARMS[name])
    scale = over.pop('intensity_scale', None)
    orig = T.intensity_patch
    if scale is not None: T.intensity_patch = functools.partial(orig, scale=scale)
    try:
        t0 = time.perf_counter()
        w = build_base('mri', max_steps=steps, runs=out / name / 'runs', weights_dir=out / name, train_tasks=(0, 1, 2, 4),
                       progress=False, init_weights='base', lr_warmup=100, **over)
        print(json.dumps(dict(arm=name, trained_steps=steps, wall_s=round(time.perf_counter() - t0, 1))), flush=True)
        return w
    finally: T.intensity_patch = orig


def score(model, ts, images, seeds):
    "Restore `images` (the test slices or a previous restoration) with 2 DDIM steps; metrics against `ts`."
    import numpy as np, torch
    from condiff.inference import restore_dataset
    from condiff.metrics import restoration_quality, pixel_metrics
    from condiff.ssim import anomaly_map
    r = restore_dataset(model, images, seeds, sampler='ddim', num_steps=2, progress=False).clamp(0, 1)
    x = torch.from_numpy(ts.images)
    q = restoration_quality(ts.images, r.numpy(), ts.healthy, ts.masks)
    pm = pixel_metrics(ts.masks, anomaly_map(image=x, restoration=r, modality=ts.modality).numpy())
    return r, dict(AP_p=round(float(pm['AP_p']), 4), max_Dice=round(float(pm['max_Dice']), 4),
                   lesion_removal=round(q['lesion_removal'], 3), healthy_fidelity=round(q['healthy_fidelity'], 4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='runs/bench-t1', help='work folder (the arms\' runs and weights)')
    p.add_argument('--steps', type=int, default=600, help='training steps of each training arm')
    p.add_argument('--arms', default='control,anomaly-weight-60,faint-intensity,passes', help='comma-separated arms')
    p.add_argument('--passes', type=int, default=4, help='the sampling arm restores up to this many times in a row')
    p.add_argument('--n', type=int, default=40, help='slices per test set (evenly spaced)')
    a = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch
    torch.set_num_threads(1)
    from condiff.unet import build_unet
    from condiff.train import init_from_weights, base_weights
    from condiff.pipeline import load_testset
    from condiff.inference import slice_seeds
    out = Path(a.out)
    sets = {s: load_testset(s, preset='cpu', test_images=a.n) for s in ('phantom-brats-t1', 'phantom-brats-t2', 'phantom-atlas')}

    def model(w):
        m = build_unet('cpu', 1); init_from_weights(m, w); return m.eval()

    arms = a.arms.split(',')
    for arm in arms:
        if arm not in (*TRAIN_ARMS, 'passes'): raise SystemExit(f"unknown arm {arm!r}; expected {[*TRAIN_ARMS, 'passes']}")
    for arm in arms:
        if arm == 'passes':
            m = model(base_weights('mri'))
            for s, ts in sets.items():
                seeds, y = slice_seeds(0, ts.ids), torch.from_numpy(ts.images)
                for k in range(1, a.passes + 1):
                    y, rec = score(m, ts, y, seeds)
                    print(json.dumps(dict(arm=f'passes-{k}', testset=s, **rec)), flush=True)
            continue
        w = out / arm / 'base-mri.safetensors'
        if not w.exists(): w = train_arm(arm, out, a.steps)
        m = model(w)
        for s, ts in sets.items():
            _, rec = score(m, ts, torch.from_numpy(ts.images), slice_seeds(0, ts.ids))
            print(json.dumps(dict(arm=arm, steps=a.steps, testset=s, **rec)), flush=True)


if __name__ == '__main__':
    main()
