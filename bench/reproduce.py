"""The parts of `condiff reproduce` on the embedded default, timed, and the whole job projected from them.

Measures, on this machine and in one run: (1) a tiny-preset training step (batch 8) for each model family; (2) the
restoration cost per image and step of the default sampler (DDIM, `RUN_DEFAULTS['tiny']`) against the paper sampler
(DDPM, 50 steps) on the first images of each phantom test set; (3) the same workload run as 2 processes x 1 torch
thread (what `reproduce` does on 2 cores) against 1 process x 2 threads. Each line is one JSON measurement; the last
line projects the default job (3 families x 10 folds trained, 4 test sets x 10 folds evaluated) from the parts.
Models are freshly initialised: only time is measured here (quality: nbs/11_pipeline.ipynb and bench/README.md).

    .venv/bin/python bench/reproduce.py [--images 8] [--train-steps 10]
"""
import argparse, json, os, sys, tempfile, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def emit(rec): print(json.dumps(rec), flush=True)


def _restore_cost(kind, n, steps, threads, seed=0):
    "Seconds to restore n phantom-brats-t2 images with `steps` steps of `kind`, in this process with `threads` threads."
    import torch
    torch.set_num_threads(threads)
    from condiff.pipeline import load_testset
    from condiff.unet import build_unet
    from condiff.inference import restore_dataset, slice_seeds
    ss = load_testset('phantom-brats-t2')
    torch.manual_seed(seed)
    model = build_unet('tiny', 1).eval()
    x = torch.from_numpy(ss.images[:n])
    restore_dataset(model, x[:1], [0], kind, 1, progress=False)  # warm-up
    t0 = time.perf_counter()
    restore_dataset(model, x, slice_seeds(seed, ss.ids[:n]), kind, steps, batch_size=n, progress=False)
    return time.perf_counter() - t0


def _warm(_):
    import torch, condiff.cli  # noqa: F401
    return os.getpid()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--images', type=int, default=8, help='test images restored per measurement')
    p.add_argument('--train-steps', type=int, default=10, help='training steps timed per family')
    p.add_argument('--threads', type=int, default=1, help='torch threads per process (reproduce uses 1)')
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from condiff.pipeline import RUN_DEFAULTS, ReproduceConfig, train_config, load_testset
    from condiff.experiment import TESTSETS, PHANTOM_TESTSETS
    from condiff.train import Trainer
    from condiff.unet import build_unet
    from condiff.inference import restore_dataset, slice_seeds
    d = RUN_DEFAULTS['tiny']
    cfg0 = ReproduceConfig()
    jobs, threads = cfg0.resolved_jobs()
    info = dict(bench='reproduce', cpu_count=os.cpu_count(), threads=a.threads, load_avg=round(os.getloadavg()[0], 2))
    # 1. data (from the phantom cache if it is warm)
    t0 = time.perf_counter()
    sets = {t: load_testset(t) for t in PHANTOM_TESTSETS}
    emit({**info, 'part': 'load_test_sets', 'seconds': round(time.perf_counter() - t0, 2),
          'images': {t: len(s) for t, s in sets.items()}})
    # 2. training steps per family
    step_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fam, t in (('phantom-brain-t2', 'phantom-brats-t2'), ('phantom-brain-t1', 'phantom-atlas'), ('phantom-fundus', 'phantom-ddr')):
            cfg = train_config(t, 0, 'tiny', 'cpu', 42, a.train_steps + 2, val_start=10**6, checkpoint_every=10**6)
            tr = Trainer(cfg, tmp, resume=False, progress=False)
            it = iter(tr.train_loader())
            for _ in range(2): tr.train_step(next(it))  # warm-up
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(a.train_steps): tr.train_step(next(it))
            w, c = (time.perf_counter() - w0) / a.train_steps, (time.process_time() - c0) / a.train_steps
            step_s[fam] = w
            emit({**info, 'part': 'train_step', 'family': fam, 'batch': cfg.batch_size, 's_per_step': round(w, 4),
                  'cpu_s_per_step': round(c, 4)})
    # 3. restoration: the default sampler against the paper sampler, per test set
    per_img_step = {}
    for t, ss in sets.items():
        C = ss.images.shape[1]
        torch.manual_seed(0)
        model = build_unet('tiny', C).eval()
        from condiff.data import to_model_space
        x = to_model_space(torch.from_numpy(ss.images[:a.images]), ss.modality)
        seeds = slice_seeds(0, ss.ids[:a.images])
        restore_dataset(model, x[:1], seeds[:1], 'ddim', 1, progress=False)
        res = {}
        for kind, steps in ((d['sampler'], d['num_steps']), ('ddpm', 50)):
            w0 = time.perf_counter()
            restore_dataset(model, x, seeds, kind, steps, batch_size=a.images, progress=False)
            res[(kind, steps)] = time.perf_counter() - w0
        dflt, paper = res[(d['sampler'], d['num_steps'])], res[('ddpm', 50)]
        per_img_step[t] = dflt / (a.images * d['num_steps'])
        emit({**info, 'part': 'restore', 'testset': t, 'images': a.images,
              'default': f"{d['sampler']}/{d['num_steps']}", 's_per_image_default': round(dflt / a.images, 4),
              'paper': 'ddpm/50', 's_per_image_paper': round(paper / a.images, 4), 'speedup_vs_paper': round(paper / dflt, 2),
              'projected_full_set_s': round(dflt / a.images * len(ss), 1)})
    # 4. two 1-thread processes against one 2-thread process, same total work
    n, steps = 2 * a.images, d['num_steps']
    one_proc = _restore_cost('ddim', 2 * n, steps, 2)
    with ProcessPoolExecutor(2, mp_context=get_context('spawn')) as ex:
        list(ex.map(_warm, range(2)))  # workers started and torch imported before timing
        w0 = time.perf_counter()
        list(ex.map(_restore_cost, ['ddim'] * 2, [n] * 2, [steps] * 2, [1] * 2))
        two_proc = time.perf_counter() - w0
    emit({**info, 'part': 'jobs', 'work': f"2 x {n} images x {steps} DDIM steps", '1_process_2_threads_s': round(one_proc, 2),
          '2_processes_1_thread_s': round(two_proc, 2), 'speedup_2_processes': round(one_proc / two_proc, 2),
          'note': '1 process: restoration time only; 2 processes: wall time of both, each also loading its data and model'})
    # 5. the default job, projected (data generation and the cheap steps excluded)
    S, K, F = d['max_steps'], d['num_steps'], 10
    n_val = max(0, (S - d['train']['val_start']) // d['train']['val_every'] + 1)
    val = n_val * 32 * per_img_step['phantom-brats-t2']  # validations of 32 slices: one forward each
    train_total = sum(F * (S * s + val) for s in step_s.values())
    eval_total = sum(F * len(sets[t]) * K * per_img_step[t] for t in sets)
    emit({**info, 'part': 'projection', 'max_steps': S, 'sampler': f"{d['sampler']}/{K}", 'jobs': jobs,
          'train_s': round(train_total / jobs, 1), 'evaluate_s': round(eval_total / jobs, 1),
          'total_min': round((train_total + eval_total) / jobs / 60, 1),
          'note': 'sum of measured parts / jobs; add ~1-2 min for building the phantoms on a cold cache'})


if __name__ == '__main__':
    sys.exit(main())
