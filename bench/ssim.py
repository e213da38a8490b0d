"""Benchmark: SSIM maps per second, condiff (torch) against scikit-image and a torchgeometry-style conv2d, same run.

Maps of 128x128 images (1 channel like MRI, 3 like fundus), batch of B. Implementations:
  condiff paper     condiff.ssim.ssim_map(mode='paper')      (torch; separable window as banded matrix products)
  condiff standard  condiff.ssim.ssim_map(mode='standard')   (torch; reflect border)
  tgm conv2d        the official computation: torchgeometry 0.1.2 SSIM as an 11x11 depthwise conv2d (ported here)
  skimage           skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
                    use_sample_covariance=False, full=True), one image (channel_axis=0) at a time
Each line also gives the max |difference| to the matching reference (skimage for standard, tgm conv2d for paper).
Times are the best of --reps calls (minimum, as timeit does).
Usage: .venv/bin/python bench/ssim.py [--batch 64] [--reps 5] [--device cpu|cuda] [--threads N]
"""
import argparse, json, time

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from condiff.ssim import ssim_map


def tgm_ssim_map(x, y):
    "torchgeometry.losses.SSIM(11, max_val=255) as the official code uses it: 11x11 depthwise conv, zero padding 5."
    c = x.shape[1]
    i = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-i**2 / (2 * 1.5**2)); g = g / g.sum()
    w = torch.outer(g, g).to(x)[None, None].repeat(c, 1, 1, 1)
    f = lambda z: F.conv2d(z, w, padding=5, groups=c)
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m1, m2 = f(x), f(y)
    s1, s2, s12 = f(x * x) - m1**2, f(y * y) - m2**2, f(x * y) - m1 * m2
    return (((2 * m1 * m2 + C1) * (2 * s12 + C2)) / ((m1**2 + m2**2 + C1) * (s1 + s2 + C2))).mean(1, keepdim=True)


def skimage_maps(x, y, data_range):
    return np.stack([structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           full=True, data_range=data_range, channel_axis=0)[1].mean(0)[None]
                     for a, b in zip(x, y)])


def timeit(fn, reps, sync):
    "Best (minimum) wall time of `reps` calls after a warm-up; as with timeit, the minimum is least disturbed by other jobs."
    out = fn(); sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); out = fn(); sync()
        times.append(time.perf_counter() - t)
    return float(np.min(times)), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    for C in (1, 3):
        y = rng.random((a.batch, C, 128, 128)).astype(np.float32)
        x = np.clip(y + 0.05 * rng.standard_normal(y.shape), 0, 1).astype(np.float32)
        sk_s, sk = timeit(lambda: skimage_maps(x.astype(np.float64), y.astype(np.float64), 1.0), max(1, a.reps // 2), lambda: None)
        base = dict(bench="ssim", batch=a.batch, size=128, channels=C, device=str(dev),
                    torch_threads=torch.get_num_threads())
        print(json.dumps(dict(base, impl="skimage", mode="standard", dtype="float64", seconds=round(sk_s, 4),
                              maps_per_s=round(a.batch / sk_s, 1))), flush=True)
        for dtype in (torch.float32, torch.float64):
            xt, yt = torch.tensor(x, dtype=dtype, device=dev), torch.tensor(y, dtype=dtype, device=dev)
            if dtype == torch.float32:
                tg_s, tg = timeit(lambda: tgm_ssim_map(xt, yt), a.reps, sync)
                rows = [("tgm conv2d", "paper", tg_s, None)]
            else:  # float64 conv2d is very slow on a CPU: reference values on 4 images only, no timing
                tg_s, tg = None, tgm_ssim_map(xt[:4], yt[:4])
                rows = []
            p_s, p = timeit(lambda: ssim_map(xt, yt, "paper"), a.reps, sync)
            rows.append(("condiff", "paper", p_s, float((p[:len(tg)] - tg).abs().max())))
            s_s, s = timeit(lambda: ssim_map(xt, yt, "standard", 1.0), a.reps, sync)
            rows.append(("condiff", "standard", s_s, float(np.abs(s.cpu().double().numpy() - sk).max())))
            for impl, mode, secs, diff in rows:
                print(json.dumps(dict(base, impl=impl, mode=mode, dtype=str(dtype).replace("torch.", ""),
                                      seconds=round(secs, 4), maps_per_s=round(a.batch / secs, 1),
                                      speedup_vs_skimage=round(sk_s / secs, 2), speedup_vs_tgm=round(tg_s / secs, 2) if tg_s else None,
                                      max_abs_diff_to_ref=diff)), flush=True)


if __name__ == "__main__":
    main()
