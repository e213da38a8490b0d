"""Benchmark of condiff.tasks against the official implementation's figures.

Reproduces the method of ../shared/reference/official_tasks_anchor.md on the same kind of inputs (40 axial 128×128
slices of nilearn's MNI152 1 mm template, padded to a 240×240 field of view; external task-1 sources
A = {camera, coins, moon} and B = {brick, grass, gravel} from scikit-image), computes the statistics of
official_tasks_stats.json for condiff, and prints one JSON line per measurement with the official value beside it.

    .venv/bin/python bench/tasks.py                 # full run: 5 × 1000 task samples + 2000 fold-0 samples
    .venv/bin/python bench/tasks.py --n 200         # quicker
    .venv/bin/python bench/tasks.py --markdown      # also print the README tables
    .venv/bin/python bench/tasks.py --clip image    # the whole-image clip instead of the official per-column one

Runs single-threaded (BLAS/OpenMP/torch threads = 1), as the official single-thread timing row.
"""
import os
for _v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMEXPR_NUM_THREADS'): os.environ[_v] = '1'
import argparse, json, math, sys, time, platform
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from condiff.tasks import RestorationTask, MultiSource, fold_tasks, foreground_mask, TASK_NAMES

ANCHOR = ROOT.parent / 'shared' / 'reference' / 'official_tasks_stats.json'
STREAMS = ['0_same_dset_poisson_blend', '1_other_dset_poisson_blend', '2_sink_deform', '3_source_deform',
           '4_smooth_intensity_change']
FOLD0 = 'fold0_restoration_task_p_no_aug_0.2'
DIFF_THR = 1e-3


def mni_slices(n=40):
    "The anchor's inputs: MNI152 1 mm, axial first, centre-crop square, <1e-4 → 0, pad to 240², resize, /max."
    from nilearn.datasets import load_mni152_template
    from skimage.transform import resize
    v = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32)
    v = np.moveaxis(v, 2, 0)
    S, H, W = v.shape; s = min(H, W)
    v = v[:, (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    v[v < 1e-4] = 0
    p = (240 - s) // 2
    v = np.pad(v, ((0, 0), (p, 240 - s - p), (p, 240 - s - p)))
    r = resize(v, (S, 128, 128)); r /= r.max()
    r = r[r.reshape(S, -1).sum(1) > 0]
    idx = np.round(np.linspace(0, len(r) - 1, n)).astype(int)
    return r[idx].astype(np.float64)[:, None], idx


def external_sources():
    "Two 1-channel external datasets from skimage.data, squash-resized to 128², min-max scaled (as the anchor)."
    import skimage.data
    from skimage.transform import resize
    from skimage.util import img_as_float
    def load(names):
        out = []
        for n in names:
            im = resize(img_as_float(getattr(skimage.data, n)()), (128, 128))
            out.append(((im - im.min()) / (im.max() - im.min()))[None].astype(np.float32))
        return np.stack(out)
    return MultiSource(load(['camera', 'coins', 'moon']), load(['brick', 'grass', 'gravel']))


def summ(a):
    a = np.asarray(a, float)
    if a.size == 0: return dict(n=0)
    return dict(p10=float(np.percentile(a, 10)), p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                mean=float(a.mean()), min=float(a.min()), max=float(a.max()), n=int(a.size))


def run_stream(task, slices, n, seed, stream_id):
    "Run `task` on n samples (sample i uses slice (7i) mod 40 and rng [seed, stream_id, i]); collect raw records."
    recs = []
    for i in range(n):
        x = slices[(7 * i) % len(slices)].astype(np.float32)
        rng = np.random.default_rng([seed, stream_id, i])
        t0, c0 = time.perf_counter(), time.process_time()
        xt, _, info = task(x, rng, return_info=True)
        ms, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        recs.append((x, xt, info, ms, cpu))
    return recs


def stats(recs):
    ms = np.array([r[3] for r in recs])
    aug = [r for r in recs if r[2]['task_id'] is not None]
    out = dict(n_samples=len(recs), ms_per_sample=summ(ms), cpu_ms_per_sample=summ([r[4] for r in recs]))
    if len(aug) < len(recs):
        out['no_aug_fraction'] = 1 - len(aug) / len(recs)
        out['ms_per_sample_augmented_only'] = summ([r[3] for r in aug])
    counts = np.array([len(r[2]['anomalies']) for r in aug])
    out['n_anomalies_dist'] = {str(k): float((counts == k).mean()) for k in range(5)}
    out['n_anomalies_mean'] = float(counts.mean())
    fr, mad, msd, mx, fob, fob_s, uni, uni_out = [], [], [], [], [], [], [], []
    pooled = dict(abs=0., n=0, pos=0, out_brain=0, out_masks=0)
    grid, grid0, grid1, tight, tight_max, area, ovl = [], [], [], [], [], [], []
    n_exceed, max_excess, n_anoms = 0, 0, 0
    lo, hi = np.inf, -np.inf
    per = []  # per-sample quantities for the bootstrap
    for x, xt, info, _, _ in aug:
        d = (xt - x)[0]; ad = np.abs(d); ch = ad > DIFF_THR
        brain = foreground_mask(x)
        union = np.zeros_like(brain)
        for a in info['anomalies']:
            m = a['shape'].mask; (y0, x0) = a['corner']; h, w = m.shape
            union[y0:y0 + h, x0:x0 + w] |= m
            grid += [h, w]; grid0.append(h); grid1.append(w)
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            th, tw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            tight += [th, tw]; tight_max.append(max(th, tw)); area.append(int(m.sum())); ovl.append(a['overlap'])
            ub = info['ub']; exc = max(h - ub[0], w - ub[1]); n_anoms += 1
            if exc > 0: n_exceed += 1; max_excess = max(max_excess, int(exc))
        nc = int(ch.sum())
        fr.append(nc / ch.size); mx.append(float(ad.max()))
        uni.append(union.mean()); uni_out.append((union & ~brain).sum() / max(union.sum(), 1))
        if nc:
            mad.append(ad[ch].mean()); msd.append(d[ch].mean()); fob_s.append((ch & ~brain).sum() / nc)
            pooled['abs'] += ad[ch].sum(); pooled['n'] += nc; pooled['pos'] += int((d[ch] > 0).sum())
            pooled['out_brain'] += int((ch & ~brain).sum()); pooled['out_masks'] += int((ch & ~union).sum())
        lo, hi = min(lo, float(xt.min())), max(hi, float(xt.max()))
        per.append((len(info['anomalies']), nc / ch.size, nc, ad[ch].sum(), int((d[ch] > 0).sum()),
                    int((ch & ~brain).sum()), int((ch & ~union).sum()), union.mean(), uni_out[-1]))
    out.update(frac_pixels_changed=summ(fr), frac_samples_no_change=float(np.mean(np.array(fr) == 0)),
               mean_abs_diff_over_changed=summ(mad), mean_abs_diff_over_changed_pooled=pooled['abs'] / pooled['n'],
               mean_signed_diff_over_changed=summ(msd), frac_changed_px_positive_pooled=pooled['pos'] / pooled['n'],
               max_abs_diff=summ(mx), frac_changed_outside_brain_pooled=pooled['out_brain'] / pooled['n'],
               frac_changed_outside_brain_per_sample=summ(fob_s),
               frac_changed_outside_anomaly_masks_pooled=pooled['out_masks'] / pooled['n'],
               anomaly_union_frac_of_image=summ(uni), anomaly_union_frac_outside_brain=summ(uni_out),
               n_anomalies_total=n_anoms, bbox_grid_side_px_pooled=summ(grid), bbox_grid_side_px_axis0=summ(grid0),
               bbox_grid_side_px_axis1=summ(grid1), bbox_tight_side_px_pooled=summ(tight),
               bbox_tight_max_side_px=summ(tight_max), anomaly_area_px=summ(area), anomaly_brain_overlap=summ(ovl),
               out_range=[lo, hi], grid_vs_ub=dict(n_anoms=n_anoms, n_grid_exceeds_ub=n_exceed, max_excess_px=max_excess))
    out['se'] = bootstrap_se(np.array(per, float))
    chosen = [r[2]['task_id'] for r in recs]
    if len(set(c for c in chosen if c is not None)) > 1:
        out['chosen_task_fraction'] = {str(t): chosen.count(t) / len(chosen) for t in sorted(set(c for c in chosen if c is not None))}
        out['per_chosen_task'] = {str(t): dict(n=chosen.count(t), ms_median=float(np.median([r[3] for r in recs if r[2]['task_id'] == t])))
                                  for t in sorted(set(c for c in chosen if c is not None))}
    return out


def bootstrap_se(per, n_boot=300, seed=0):
    "Bootstrap standard errors (resampling samples) of the main statistics; `per` rows as collected in `stats`."
    rng = np.random.default_rng(seed)
    def st(p):
        return {'n_anomalies_mean': p[:, 0].mean(), 'n_anomalies_dist.1': (p[:, 0] == 1).mean(),
                'frac_pixels_changed.mean': p[:, 1].mean(), 'frac_samples_no_change': (p[:, 2] == 0).mean(),
                'mean_abs_diff_over_changed_pooled': p[:, 3].sum() / p[:, 2].sum(),
                'frac_changed_px_positive_pooled': p[:, 4].sum() / p[:, 2].sum(),
                'frac_changed_outside_brain_pooled': p[:, 5].sum() / p[:, 2].sum(),
                'frac_changed_outside_anomaly_masks_pooled': p[:, 6].sum() / p[:, 2].sum(),
                'anomaly_union_frac_of_image.mean': p[:, 7].mean(), 'anomaly_union_frac_outside_brain.mean': p[:, 8].mean()}
    boots = [st(per[rng.integers(len(per), size=len(per))]) for _ in range(n_boot)]
    return {k: float(np.std([b[k] for b in boots])) for k in boots[0]}


def zscore(key, c, o, res, off):
    """(SE of condiff, z) of condiff − official, or (None, None) without an SE.

    The official run's SE is condiff's bootstrap SE scaled by √(n_condiff / n_official) (same statistic, its own sample
    size), so z = (c − o) / (SE_c·√(1 + n_c/n_o)) — √2·SE_c when the sizes are equal. The share of samples with no
    change is a rare-event proportion: there both SEs are binomial, √(p(1−p)/n), each with its own p and n."""
    se = res['se'].get(key)
    if o is None or c is None or not off: return None, None
    n_c, n_o = res['n_samples'], off.get('n_samples') or res['n_samples']
    if key == 'frac_samples_no_change':
        aug = lambda r, n: n * (1 - r.get('no_aug_fraction', 0))
        na_c, na_o = aug(res, n_c), aug(off, n_o)
        var = c * (1 - c) / na_c + o * (1 - o) / na_o
        return math.sqrt(c * (1 - c) / na_c), ((c - o) / math.sqrt(var) if var > 0 else None)
    if not se: return None, None
    return se, (c - o) / (se * math.sqrt(1 + n_c / n_o))


# (key, label) for the printed comparison
ROWS = [
    ('ms_per_sample.p50', 'ms/sample median'), ('ms_per_sample.mean', 'ms/sample mean'),
    ('ms_per_sample.p90', 'ms/sample p90'), ('cpu_ms_per_sample.p50', 'CPU ms/sample median'),
    ('cpu_ms_per_sample.mean', 'CPU ms/sample mean'),
    ('n_anomalies_mean', 'mean #anomalies'), ('n_anomalies_dist.1', 'P(1 anomaly)'), ('n_anomalies_dist.4', 'P(4 anomalies)'),
    ('frac_pixels_changed.mean', 'frac px changed, mean'), ('frac_pixels_changed.p50', 'frac px changed, median'),
    ('frac_samples_no_change', 'samples with no change'),
    ('mean_abs_diff_over_changed.p50', 'mean |Δ| over changed, median'),
    ('mean_abs_diff_over_changed_pooled', 'mean |Δ| over changed, pooled'),
    ('max_abs_diff.p50', 'max |Δ|, median'), ('max_abs_diff.p90', 'max |Δ|, p90'),
    ('frac_changed_px_positive_pooled', 'changed px brighter'),
    ('frac_changed_outside_brain_pooled', 'changed px outside brain'),
    ('frac_changed_outside_anomaly_masks_pooled', 'changed px outside shape masks'),
    ('anomaly_union_frac_of_image.mean', 'shape-mask union / image'),
    ('anomaly_union_frac_outside_brain.mean', 'shape-mask union outside brain'),
    ('bbox_grid_side_px_pooled.p50', 'grid side median'), ('bbox_grid_side_px_pooled.p10', 'grid side p10'),
    ('bbox_grid_side_px_pooled.p90', 'grid side p90'), ('bbox_tight_side_px_pooled.p50', 'tight side median'),
    ('bbox_tight_side_px_pooled.p10', 'tight side p10'), ('bbox_tight_side_px_pooled.p90', 'tight side p90'),
    ('anomaly_area_px.p50', 'shape area median'), ('anomaly_area_px.mean', 'shape area mean'),
    ('anomaly_brain_overlap.min', 'min brain overlap'), ('anomaly_brain_overlap.p50', 'brain overlap median'),
    ('grid_exceeds_ub_frac', 'grid > ub (fraction of anomalies)'), ('grid_vs_ub.max_excess_px', 'grid > ub max excess'),
]


def get(d, key):
    for k in key.split('.'):
        if d is None or k not in d: return None
        d = d[k]
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=1000, help='samples per task stream (fold 0 uses 2n)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--markdown', action='store_true', help='print the README comparison tables')
    ap.add_argument('--out', type=str, default=None, help='write the full statistics JSON here')
    ap.add_argument('--clip', choices=('column', 'image'), default='column',
                    help="range each anomaly is clipped to: 'column' (official, condiff default) or 'image'")
    args = ap.parse_args()
    try:
        import torch; torch.set_num_threads(1)
    except ImportError: pass
    try:
        from threadpoolctl import threadpool_limits; threadpool_limits(1)
    except ImportError: pass
    official = json.loads(ANCHOR.read_text()) if ANCHOR.exists() else None
    slices, _ = mni_slices()
    same = slices.astype(np.float32)
    other = external_sources()
    # warm-up (imports, caches) outside the timed loops
    RestorationTask([0, 1, 2, 3, 4], same, other, p_no_aug=0)(same[20], np.random.default_rng(0))
    results = {}
    for k, name in enumerate(STREAMS):
        rt = RestorationTask([k], same_source=same, other_source=other, p_no_aug=0.0, has_bg=True, clip=args.clip)
        results[name] = stats(run_stream(rt, slices, args.n, args.seed, 1000 + k))
    train, val = fold_tasks(0)
    rt = RestorationTask(train, same_source=same, other_source=other, p_no_aug=0.2, has_bg=True, clip=args.clip)
    results[FOLD0] = stats(run_stream(rt, slices, 2 * args.n, args.seed, 2000))
    meta = dict(bench='tasks', python=platform.python_version(), numpy=np.__version__, machine=platform.platform(),
                cpu_count=os.cpu_count(), threads=1, clip=args.clip, n_per_task=args.n, n_fold0=2 * args.n, seed=args.seed,
                date=time.strftime('%Y-%m-%d'))
    print(json.dumps(dict(meta=meta)))
    for name, res in results.items():
        res['grid_exceeds_ub_frac'] = res['grid_vs_ub']['n_grid_exceeds_ub'] / max(res['grid_vs_ub']['n_anoms'], 1)
        off = (official['tasks'].get(name) if name in STREAMS else official.get(name)) if official else None
        if off is not None:
            g = official['checks']['grid_vs_ub'].get(name[0]) if name in STREAMS else None
            if g: off = dict(off, grid_exceeds_ub_frac=g['n_grid_exceeds_ub'] / g['n_anoms'], grid_vs_ub=g)
        for key, label in ROWS:
            c, o = get(res, key), get(off, key)
            if c is None: continue
            line = dict(bench='tasks', stream=name, metric=key, condiff=c, official=o)
            if key.startswith('ms_per_sample') and o: line['speedup'] = o / c if c else None
            if key.startswith('cpu_ms_per_sample'):   # the official figures are wall-clock on an idle machine
                o = get(off, 'ms_per_sample.' + key.split('.')[1]); line.update(official=o, speedup=o / c if o and c else None)
            se, z = zscore(key, c, o, res, off)
            if z is not None: line.update(se=se, z=z)
            print(json.dumps(line, default=float))
    if official:  # the single-thread official timing, for the per-task speed-up
        for name in STREAMS:
            o = official['timing_single_thread_blas_omp']['median_ms'][name]; c = results[name]['ms_per_sample']['p50']
            print(json.dumps(dict(bench='tasks', stream=name, metric='ms_per_sample.p50_vs_official_single_thread',
                                  condiff=c, official=o, speedup=o / c)))
    if args.out: Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=float))
    if args.markdown and official: print_markdown(results, official)


def print_markdown(results, official):
    names = STREAMS + [FOLD0]
    short = ['0 same blend', '1 other blend', '2 sink', '3 source', '4 intensity', 'fold 0']
    print('\n| statistic | ' + ' | '.join(f'{s} (off. / condiff)' for s in short) + ' |')
    print('|---|' + '---|' * len(names))
    for key, label in ROWS:
        cells = []
        for name in names:
            res = results[name]
            off = official['tasks'].get(name) if name in STREAMS else official.get(name)
            g = official['checks']['grid_vs_ub'].get(name[0]) if name in STREAMS else None
            if g: off = dict(off, grid_exceeds_ub_frac=g['n_grid_exceeds_ub'] / g['n_anoms'], grid_vs_ub=g)
            c, o = get(res, key), get(off, key)
            if key.startswith('cpu_ms_per_sample'): o = get(off, 'ms_per_sample.' + key.split('.')[1])
            f = (lambda v: '–' if v is None else (f'{v:.3g}' if isinstance(v, (float, np.floating)) else str(v)))
            _, zz = zscore(key, c, o, res, off)
            z = f' (z {zz:+.1f})' if zz is not None else ''
            cells.append(f'{f(o)} / {f(c)}{z}')
        print(f'| {label} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
