"""Sampler cost and quality: the paper sampler (50-step ancestral DDPM) against DDIM with 10 and 25 steps, on one fold.

Trains (or reuses) a `tiny` fold-0 model on phantom-brain T2 within a wall-time budget, evaluates it on phantom-BraTS T2
with each sampler through `condiff.inference.evaluate_fold`, and prints one JSON line per measurement: AP_i, AUROC, AP_p,
max_Dice, restoration seconds, and ratios against the paper sampler measured in the same run. A last line measures what
the float16 map storage does to the pixel metrics (float32 maps of the paper sampler, recomputed, against the stored
float16 ones), and the random-classifier AP_p (the lesion pixel fraction). The lines are also written to
OUT/bench.jsonl, which the experiment section of nbs/09_inference.ipynb reads. Every step is resumable: an existing
run (with a `best` checkpoint) is not retrained, and finished evaluations are reused.

    nice -n 10 .venv/bin/python bench/sampling.py --out /tmp/condiff-sampling --train-minutes 8 --threads 1
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path


def emit(lines, rec):
    "Print one measurement as a JSON line and keep it for OUT/bench.jsonl."
    lines.append(rec); print(json.dumps(rec), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='runs/bench-sampling', help='work folder (run, evaluations)')
    p.add_argument('--run', default=None, help='an existing run folder to evaluate (default: OUT/runs/...; trained if it has no checkpoint)')
    p.add_argument('--train-minutes', type=float, default=8.0, help='wall-time budget for training (the run stops cleanly)')
    p.add_argument('--max-steps', type=int, default=1500, help='training steps if the budget allows (tiny preset: 1500)')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch decides)')
    p.add_argument('--batch-size', type=int, default=32, help='images per UNet call when sampling')
    p.add_argument('--seed', type=int, default=0, help='base sampling seed')
    p.add_argument('--skip-float16-check', action='store_true', help='do not re-run the paper sampler for the float16 check')
    a = p.parse_args(argv)
    if a.threads: os.environ['OMP_NUM_THREADS'] = str(a.threads)
    import torch
    if a.threads: torch.set_num_threads(a.threads)
    from condiff.experiment import get_dataset
    from condiff.inference import evaluate_fold
    from condiff.train import read_log

    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    lines = []
    run = Path(a.run) if a.run else out / 'runs' / 'phantom-brain-t2' / 'tiny' / 'fold0'
    if not (run / 'checkpoints' / 'best').exists():
        # train fold 0 of the tiny preset; a SIGTERM at the budget stops it cleanly at a checkpoint
        if a.run: raise SystemExit(f"{run} has no 'best' checkpoint")
        cmd = [sys.executable, '-m', 'condiff.train', '--preset', 'tiny', '--set', 'fold=0', '--set', f'max_steps={a.max_steps}',
               '--out', str(out / 'runs'), '--no-progress']
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ})
        try: stdout, _ = proc.communicate(timeout=a.train_minutes * 60)
        except subprocess.TimeoutExpired:
            proc.terminate(); stdout, _ = proc.communicate(timeout=120)
    log = read_log(run)
    losses, vals = [r for r in log if 'loss' in r], [r for r in log if 'val_loss' in r]
    model_config = json.loads((run / 'checkpoints' / 'best' / 'meta.json').read_text())['model_config']
    emit(lines, {'measure': 'train', 'run': str(run), 'steps': max(r['step'] for r in log),
                 'train_wall_s': round(max(r.get('wall_s', 0) for r in log), 1),
                 'first_loss': losses[0]['loss'], 'last_loss': losses[-1]['loss'],
                 'best_val_loss_ma': min((r['val_loss_ma'] for r in vals), default=None),
                 'images_per_s': losses[-1].get('images_per_s'),
                 'unet': {k: model_config[k] for k in ('preset', 'block_out_channels', 'attention_head_dim')}})

    test = get_dataset('phantom-brats', 'test', sequence='t2')
    lesion = float(test.masks.mean())
    rows = {}
    for sampler, steps in (('ddpm', 50), ('ddim', 10), ('ddim', 25)):
        t0 = time.perf_counter()
        m = evaluate_fold(run, test, out / 'eval' / f'{sampler}{steps}', sampler=sampler, num_steps=steps, seed=a.seed,
                          batch_size=a.batch_size, device='cpu', progress=False)
        rows[(sampler, steps)] = m
        ref = rows[('ddpm', 50)]
        emit(lines, {'measure': 'sampler', 'sampler': sampler, 'steps': steps, 'testset': test.name, 'n_images': len(test),
                     **{k: round(m[k], 4) for k in ('AP_i', 'AUROC', 'AP_p', 'max_Dice')},
                     'random_AP_p': round(lesion, 4), 'restore_s': round(m['timing']['restore_s'], 1),
                     'call_s': round(time.perf_counter() - t0, 1),
                     'time_ratio_vs_ddpm50': round(m['timing']['restore_s'] / ref['timing']['restore_s'], 3),
                     'AP_p_ratio_vs_ddpm50': round(m['AP_p'] / ref['AP_p'], 3),
                     'threads': torch.get_num_threads()})

    if not a.skip_float16_check: float16_check(a, run, test, out, lines)
    (out / 'bench.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))


def float16_check(a, run, test, out, lines):
    import numpy as np, torch
    from condiff.data import to_model_space
    from condiff.inference import read_eval, restore_dataset, slice_seeds
    from condiff.metrics import pixel_metrics
    from condiff.ssim import anomaly_map
    from condiff.train import load_model
    # float16 storage: recompute the paper sampler's float32 maps (same per-slice seeds) and compare the pixel metrics
    model, _ = load_model(run, 'best')
    y = to_model_space(torch.from_numpy(test.images), test.modality)
    rest = restore_dataset(model, y, slice_seeds(a.seed, test.ids), 'ddpm', 50, batch_size=a.batch_size, progress=False)
    maps32 = anomaly_map(restoration=rest, image=y, modality=test.modality).numpy()
    stored = read_eval(out / 'eval' / 'ddpm50')['maps']
    p32, p16 = pixel_metrics(test.masks, maps32), pixel_metrics(test.masks, stored)
    emit(lines, {'measure': 'float16_storage', 'AP_p_f32': round(p32['AP_p'], 6), 'AP_p_f16': round(p16['AP_p'], 6),
                 'dAP_p': abs(p32['AP_p'] - p16['AP_p']), 'dDice': abs(p32['max_Dice'] - p16['max_Dice']),
                 'max_map_diff': float(np.abs(maps32 - stored).max()), 'map_max': float(maps32.max())})


if __name__ == '__main__':
    main()
