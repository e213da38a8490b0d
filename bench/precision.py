"""bf16 against fp32 at inference on the CPU: the metrics of one phantom test set restored in both precisions.

Trains (or reuses) fold 0 of the embedded default (tiny preset, RUN_DEFAULTS['tiny'] steps) on phantom-brain T2, then
evaluates it on phantom-BraTS T2 with `condiff.inference.evaluate_fold` twice, with the same per-slice seeds: UNet in
fp32 and under bf16 autocast (the sampler maths stays fp32, as on CUDA). Prints one JSON line per precision and one
with the differences (AP_p first, then AP_i, AUROC, max-Dice and the largest map difference).

    nice -n 10 .venv/bin/python bench/precision.py --out runs/bench-precision --threads 1
"""
import argparse, json, os, sys, time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='runs/bench-precision')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--test-images', type=int, default=None, help='evenly spaced subset of the test set (default: all)')
    a = p.parse_args(argv)
    os.environ['OMP_NUM_THREADS'] = str(a.threads)
    import numpy as np
    import torch
    torch.set_num_threads(a.threads)
    from condiff.pipeline import RUN_DEFAULTS, fold_config, train_fold, load_testset
    from condiff.inference import evaluate_fold, read_eval
    out = Path(a.out)
    d = RUN_DEFAULTS['tiny']
    cfg = fold_config('phantom-brain', 't2', 0, 'tiny', 'cpu', num_workers=0)
    run, _ = train_fold(cfg, out / 'runs', progress=False)
    ts = load_testset('phantom-brats-t2', test_images=a.test_images)
    res = {}
    for prec, dt in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        t0 = time.perf_counter()
        m = evaluate_fold(run, ts, out / 'eval' / prec, sampler=d['sampler'], num_steps=d['num_steps'], seed=0,
                          batch_size=d['eval_batch_size'], device='cpu', dtype=dt, which='best', progress=False)
        res[prec] = m
        print(json.dumps({'bench': 'precision', 'precision': prec, 'testset': 'phantom-brats-t2', 'n_images': m['n_images'],
                          'sampler': m['sampler'], 'num_steps': m['num_steps'],
                          **{k: m[k] for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice')}, 'wall_s': round(time.perf_counter() - t0, 1),
                          'restore_s': round(m['timing']['restore_s'], 1)}), flush=True)
    ma, mb = read_eval(out / 'eval' / 'fp32')['maps'], read_eval(out / 'eval' / 'bf16')['maps']
    print(json.dumps({'bench': 'precision', 'summary': True, 'testset': 'phantom-brats-t2',
                      **{f'delta_{k}': res['bf16'][k] - res['fp32'][k] for k in ('AP_p', 'AP_i', 'AUROC', 'max_Dice')},
                      'max_map_diff': float(np.abs(ma - mb).max()), 'mean_map_diff': float(np.abs(ma - mb).mean()),
                      'run': str(run), 'train_steps': cfg.max_steps, 'loadavg': [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == '__main__':
    main()
