"""Quality versus CPU time: the CPU default's design against the previous default (`tiny`), one fold per family, one run.

For each model family (T1 and T2 phantom brains, phantom fundus) it trains fold 0 from scratch with each design, stops at
several step budgets (resuming the same run, so each budget continues the previous one), and evaluates the EMA weights
at each budget on the family's phantom test set: AP_p and max-Dice of the 1 − SSIM maps, lesion removal and healthy
fidelity of the restorations (`condiff.metrics.RestorationMeter`), against the Intensity control of the same slices.
A third arm fine-tunes fold 0 from the shipped base model (`init_weights='base'`), the route `make demo` takes.
The x axis is the training process's CPU time (one torch thread), so the curve does not depend on the machine's load.

Designs (each a `condiff.train.TRAIN_PRESETS` entry plus `condiff.cli.RUN_DEFAULTS`):
- `tiny`: the previous CPU default, ε-prediction with Min-SNR-1, 128², batch 8, lr 2e-3, DDIM 10 at evaluation;
- `cpu`: the new CPU default from scratch, x0 = cond + f (`cond_skip`), anomaly-weighted x0 loss (L1 since 2026-12-03), 64², batch 32, lr 3e-3;
- `cpu-base`: `cpu` fine-tuned from the shipped base model (its budget 0 is the base model itself).

Prints one JSON line per measurement (also OUT/quality.jsonl) and draws OUT/quality.png.

    nice -n 5 .venv/bin/python bench/quality.py --out /tmp/condiff-quality [--steps 25,50,100,200] [--test-images 40] [--set loss=mse]
"""
import argparse, json, os, tempfile, time
from pathlib import Path

FAMILIES = {'t1': ('phantom-brain', 't1', 'phantom-brats-t1'), 't2': ('phantom-brain', 't2', 'phantom-brats-t2'),
            'rf': ('phantom-fundus', None, 'phantom-ddr')}


def emit(lines, rec):
    lines.append(rec); print(json.dumps(rec), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='runs/bench-quality', help='work folder (runs, quality.jsonl, quality.png)')
    p.add_argument('--families', default='t1,t2,rf', help='comma-separated: t1, t2, rf')
    p.add_argument('--designs', default='tiny,cpu,cpu-base', help='comma-separated: tiny, cpu, cpu-base')
    p.add_argument('--steps', default='25,50,100,200', help='step budgets (cumulative, one run per design)')
    p.add_argument('--test-images', type=int, default=40, help='test slices per evaluation (evenly spaced, both classes)')
    p.add_argument('--fold', type=int, default=0)
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help="a TrainConfig override for every design, e.g. --set loss=mse (repeatable; recorded in each line's 'set')")
    a = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch
    torch.set_num_threads(1)
    from condiff.pipeline import fold_config, load_testset, RUN_DEFAULTS
    from condiff.train import train, load_model
    from condiff.experiment import run_dir_for
    from condiff.inference import evaluate_model
    from condiff.report import intensity_control
    from condiff.checks import parse_sets
    from condiff.pipeline import check_train_overrides
    sets = check_train_overrides(parse_sets(a.set), 'set')

    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    steps = [int(s) for s in a.steps.split(',')]
    lines = []
    for fam in a.families.split(','):
        dataset, seq, testset = FAMILIES[fam]
        for design in a.designs.split(','):
            preset = 'tiny' if design == 'tiny' else 'cpu'
            over = {} if design == 'cpu-base' else {'init_weights': None} if preset == 'cpu' else {}
            over = {**over, **sets}
            budgets = ([0] if design == 'cpu-base' else []) + steps
            d = RUN_DEFAULTS[preset]
            ts = load_testset(testset, preset=preset, test_images=a.test_images)
            ctl = intensity_control(ts.images, ts.masks)
            cpu = 0.0
            for s in budgets:
                cfg = fold_config(dataset, seq, a.fold, preset, 'cpu', 42, max(s, 1), None, checkpoint_every=max(s, 1),
                                  val_start=10**9, **over)
                runs = out / 'runs' / (design + ''.join(f"-{k}={v}" for k, v in sets.items()))
                if s > 0:
                    t0 = time.process_time()
                    run = train(cfg, runs, resume=True, progress=False)
                    cpu += time.process_time() - t0
                    model, _ = load_model(run, 'latest')
                else:  # the shipped base model as it is
                    from condiff.train import build_unet, init_from_weights, base_weights, base_kind
                    model = build_unet('cpu', ts.images.shape[1]); init_from_weights(model, base_weights(base_kind(ts.modality)))
                    model.eval()
                t0 = time.process_time()
                with tempfile.TemporaryDirectory() as tmp:
                    r = evaluate_model(model, ts, tmp, sampler=d['sampler'], num_steps=d['num_steps'], batch_size=d['eval_batch_size'],
                                       progress=False)
                q = r.get('restoration') or {}
                emit(lines, dict(family=fam, design=design, steps=s, train_cpu_s=round(cpu, 1), testset=testset,
                                 size=int(ts.images.shape[-1]), n_images=len(ts), AP_p=r['AP_p'], max_Dice=r['max_Dice'],
                                 AP_i=r['AP_i'], control_AP_p=ctl['AP_p'], control_max_Dice=ctl['max_Dice'],
                                 AP_p_over_control=r['AP_p'] / ctl['AP_p'], lesion_removal=q.get('lesion_removal'),
                                 healthy_fidelity=q.get('healthy_fidelity'), noise_floor=q.get('noise_floor'),
                                 eval_cpu_s=round(time.process_time() - t0, 1), sampler=f"{d['sampler']}/{d['num_steps']}",
                                 **({'set': sets} if sets else {})))
    (out / 'quality.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
    try: plot(lines, out / 'quality.png')
    except Exception as e: print(json.dumps({'plot_error': repr(e)}))


def plot(lines, path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fams = list(dict.fromkeys(l['family'] for l in lines))
    keys = [('AP_p_over_control', 'AP_p / Intensity control'), ('lesion_removal', 'lesion removal'), ('healthy_fidelity', 'healthy fidelity')]
    fig, axs = plt.subplots(len(fams), 3, figsize=(11, 2.6 * len(fams)), squeeze=False)
    for i, f in enumerate(fams):
        for j, (k, name) in enumerate(keys):
            ax = axs[i][j]
            for design in dict.fromkeys(l['design'] for l in lines):
                pts = [(l['train_cpu_s'], l[k]) for l in lines if l['family'] == f and l['design'] == design and l[k] is not None]
                if k == 'lesion_removal': pts = [(x, max(v, -1.0)) for x, v in pts]  # `tiny`'s −5 would flatten the others
                if pts: ax.plot(*zip(*pts), 'o-', label=design)
            ax.set_title(f"{f}: {name}" + (' (clipped at −1)' if k == 'lesion_removal' else ''), fontsize=9)
            ax.set_xlabel('training CPU s', fontsize=8)
            if k == 'AP_p_over_control': ax.axhline(1, color='grey', lw=0.5)
            if k == 'healthy_fidelity': ax.set_yscale('log')  # 0.001 (copies its input) to 0.4 (noise) on one axis
            ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=90)


if __name__ == '__main__':
    main()
