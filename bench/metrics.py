"""Benchmark: pixel-level AP and max-Dice, condiff (exact and streaming) against scikit-learn, same run.

Data: maps in [0,1] with half of the pixels exactly 0, ~3% positive pixels (correlated with the map), generated
chunk by chunk from fixed seeds so every implementation sees the same pixels. Two kinds:
  f16: maps stored as float16 (as condiff stores them)  -> condiff exact = streaming = exact histogram
  f32: continuous float32 maps                          -> condiff exact sorts; streaming uses the fine histogram
Each implementation runs in its own subprocess; peak memory is reported two ways: `peak_mb` = tracemalloc peak of
the allocations the implementation made (beyond its input), `maxrss_mb` = the subprocess's high-water RSS (input,
Python, numpy and torch imports included; `rss_base_mb` is that RSS right after the imports).

Usage:  .venv/bin/python bench/metrics.py            # full: 1e8 pixels (+ sklearn once), streaming at 1.2e9
        .venv/bin/python bench/metrics.py --quick    # smoke run, small sizes
Prints one JSON line per measurement.
"""
import argparse, json, os, resource, subprocess, sys, time, tracemalloc

import numpy as np

CHUNK = 1 << 22  # 256 slices of 128x128


def chunks(n, seed, kind):
    "Deterministic (maps, masks) chunks: half exact zeros, P(positive) = 0.12*v on the rest, 0.005 on the zeros."
    for i, start in enumerate(range(0, n, CHUNK)):
        size = min(CHUNK, n - start)
        rng = np.random.default_rng([seed, i])
        v = rng.random(size, dtype=np.float32)
        v[rng.random(size, dtype=np.float32) < 0.5] = 0
        m = rng.random(size, dtype=np.float32) < np.where(v > 0, np.float32(0.12) * v, np.float32(0.005))
        yield (v.astype(np.float16) if kind == "f16" else v), m


def full(n, seed, kind):
    vs, ms = zip(*chunks(n, seed, kind))
    return np.concatenate(vs), np.concatenate(ms)


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(impl, kind, n, seed):
    from condiff.metrics import StreamingMetrics, pixel_metrics  # noqa: imports before the baseline RSS
    if impl == "sklearn":
        from sklearn.metrics import precision_recall_curve
    base = rss_mb()
    out = dict(impl=impl, kind=kind, pixels=n, rss_base_mb=round(base, 1))
    if impl == "streaming":
        sm, secs = StreamingMetrics(), 0.0
        tracemalloc.start()
        for v, m in chunks(n, seed, kind):
            v, m = v.reshape(-1, 1, 128, 128), m.reshape(-1, 1, 128, 128)
            t = time.perf_counter()
            sm.update(m, v, scores=np.zeros(len(v)))  # image scores are not part of this benchmark
            secs += time.perf_counter() - t
        t = time.perf_counter()
        r = sm.pixel_metrics()
        b = sm.bounds()
        secs += time.perf_counter() - t
        out.update(exact=sm.exact, AP_bound=b["AP_p"], Dice_bound=b["max_Dice"])
    else:
        v, m = full(n, seed, kind)
        tracemalloc.start()
        t = time.perf_counter()
        if impl == "exact":
            r = pixel_metrics(m, v)
        else:  # the official computation (UPD utilities/metrics.py), spec §6
            precision, recall, _ = precision_recall_curve(m, v.astype(np.float32, copy=False))
            ap = -np.sum(np.diff(recall) * precision[:-1])
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = 2 * precision * recall / (precision + recall)
            r = {"AP_p": float(ap), "max_Dice": float(dice[np.nanargmax(dice)])}
        secs = time.perf_counter() - t
    out.update(seconds=round(secs, 3), peak_mb=round(tracemalloc.get_traced_memory()[1] / 2**20, 1),
               maxrss_mb=round(rss_mb(), 1), AP_p=r["AP_p"], max_Dice=r["max_Dice"])
    print(json.dumps(out), flush=True)


def run(impl, kind, n, seed=0):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, __file__, "--worker", impl, kind, str(n), str(seed)], capture_output=True,
                       text=True, env=env)
    if p.returncode: raise RuntimeError(f"{impl} {kind} {n} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def report(r, ref=None, ref_name=None):
    if ref is not None:
        r.update(ref=ref_name, abs_dAP=abs(r["AP_p"] - ref["AP_p"]), abs_dDice=abs(r["max_Dice"] - ref["max_Dice"]),
                 speedup=round(ref["seconds"] / r["seconds"], 2) if r["seconds"] else None)
    print(json.dumps(r), flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "KIND", "N", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        impl, kind, n, seed = a.worker
        return worker(impl, kind, int(n), int(seed))
    # sizes in whole 128x128 slices: 6104 slices = 1.0001e8 pixels, 73243 slices = 1.2000e9 pixels
    n, n_small, n_big = ((61, 7, 733) if a.quick else (6104, 611, 73243))
    n, n_small, n_big = (k * 128 * 128 for k in (n, n_small, n_big))
    # float16 maps at 1e8: scikit-learn once, condiff exact and streaming
    sk = report(run("sklearn", "f16", n))
    report(run("exact", "f16", n), sk, "sklearn")
    report(run("streaming", "f16", n), sk, "sklearn")
    # continuous float32 maps: condiff exact (sort) vs scikit-learn at 1e7, then the fine histogram vs exact at 1e8
    sk32 = report(run("sklearn", "f32", n_small))
    report(run("exact", "f32", n_small), sk32, "sklearn")
    ex32 = report(run("exact", "f32", n))
    report(run("streaming", "f32", n), ex32, "exact")
    # memory must not grow with the pixel count: streaming at 1.2e9 pixels fed in chunks of 2**22
    report(run("streaming", "f16", n_big))
    report(run("streaming", "f32", n_big))


if __name__ == "__main__":
    main()
