"Oracle checks for condiff.ssim: scikit-image for standard SSIM, an independent torchgeometry-formula SSIM for paper mode."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.metrics import structural_similarity

from condiff.ssim import anomaly_map, anomaly_score, gaussian_blur, ssim_channels, ssim_map


def _pairs(seed, shape, lo=0.0, hi=1.0):
    "A test image (smooth structure + noise) and a 'restoration' that differs by a local blob and noise."
    rng = np.random.default_rng(seed)
    B, C, H, W = shape
    yy, xx = np.mgrid[:H, :W]
    base = 0.5 + 0.3 * np.sin(xx / 3.0 + rng.random((B, C, 1, 1)) * 6) * np.cos(yy / 5.0)
    y = base + 0.05 * rng.standard_normal(shape)
    blob = np.exp(-((yy - H / 2) ** 2 + (xx - W / 3) ** 2) / (2 * 4.0**2))
    x = y - 0.4 * blob * rng.random((B, C, 1, 1)) + 0.03 * rng.standard_normal(shape)
    x, y = (np.clip(a, 0, 1) * (hi - lo) + lo for a in (x, y))
    return x, y


# ---------------------------------------------------------------- (d) standard SSIM == scikit-image
@pytest.mark.parametrize("shape,lo,hi", [((2, 1, 32, 32), 0.0, 1.0), ((2, 3, 23, 41), -1.0, 1.0), ((1, 3, 128, 128), 0.0, 1.0)])
def test_standard_equals_skimage_full_map(shape, lo, hi):
    x, y = _pairs(0, shape, lo, hi)
    dr = hi - lo
    ours_c = ssim_channels(torch.tensor(x), torch.tensor(y), "standard", data_range=dr).numpy()
    ours = ssim_map(torch.tensor(x), torch.tensor(y), "standard", data_range=dr).numpy()
    for b in range(shape[0]):
        mssim, S = structural_similarity(x[b], y[b], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         full=True, data_range=dr, channel_axis=0)
        assert S.shape == ours_c[b].shape
        np.testing.assert_allclose(ours_c[b], S, rtol=0, atol=1e-5)  # per-channel full map
        np.testing.assert_allclose(ours[b, 0], S.mean(0), rtol=0, atol=1e-5)  # channel mean
        # skimage's mean SSIM crops (win_size-1)//2 = 5 pixels on each side before averaging
        assert abs(ours_c[b][:, 5:-5, 5:-5].mean(axis=(1, 2)).mean() - mssim) < 1e-10
        assert np.abs(ours_c[b] - S).max() < 1e-12  # in float64 it is equal to rounding


def test_standard_float32_close_to_skimage():
    x, y = _pairs(1, (1, 1, 64, 64))
    ours = ssim_map(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), "standard", 1.0)
    _, S = structural_similarity(x[0, 0], y[0, 0], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 full=True, data_range=1.0)
    np.testing.assert_allclose(ours[0, 0].numpy(), S, atol=2e-4)


# ---------------------------------------------------------------- (e) paper SSIM == independent torchgeometry formula
def _tgm_window():
    "torchgeometry 0.1.2 get_gaussian_kernel2d((11,11),(1.5,1.5)), written out: outer product of a normalised 1-D Gaussian."
    i = np.arange(11) - 11 // 2
    g = np.exp(-(i**2) / (2 * 1.5**2))
    g = g / g.sum()
    return np.outer(g, g)


def _tgm_ssim_numpy(a, b):
    "SSIM of one 2-D channel with tgm.losses.SSIM(11, max_val=255) semantics: 2-D correlation, zero padding 5."
    w = _tgm_window()
    f = lambda z: ndimage.correlate(z, w, mode="constant", cval=0.0)
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = f(a), f(b)
    s1, s2, s12 = f(a * a) - mu1**2, f(b * b) - mu2**2, f(a * b) - mu1 * mu2
    return ((2 * mu1 * mu2 + C1) * (2 * s12 + C2)) / ((mu1**2 + mu2**2 + C1) * (s1 + s2 + C2))


def _official_ssim_map_torch(batch1, batch2):
    "The official UPD `ssim_map` (tgm SSIM module with a depthwise 11x11 conv2d, DSSIM, channel mean) ported to torch."
    c = batch1.shape[1]
    w = torch.tensor(_tgm_window(), dtype=batch1.dtype)[None, None].repeat(c, 1, 1, 1)
    f = lambda z: F.conv2d(z, w, padding=5, groups=c)
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = f(batch1), f(batch2)
    s1, s2, s12 = f(batch1 * batch1) - mu1**2, f(batch2 * batch2) - mu2**2, f(batch1 * batch2) - mu1 * mu2
    ssim = ((2 * mu1 * mu2 + C1) * (2 * s12 + C2)) / ((mu1**2 + mu2**2 + C1) * (s1 + s2 + C2))
    dssim = torch.clamp(1.0 - ssim, min=0, max=1) / 2.0
    return 1 - (1 - 2 * dssim.mean(1, keepdim=True))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("shape,lo", [((2, 1, 40, 33), 0.0), ((2, 3, 32, 32), -1.0)])
def test_paper_equals_independent_formula(dtype, atol, shape, lo):
    x, y = _pairs(2, shape, lo, 1.0)
    ours = ssim_channels(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype), "paper").numpy()
    for b in range(shape[0]):
        for c in range(shape[1]):
            ref = _tgm_ssim_numpy(x[b, c], y[b, c])
            np.testing.assert_allclose(ours[b, c], ref, rtol=0, atol=atol)
    # the border really is zero-padded: the reflect-padded map differs there
    assert np.abs(ours[:, :, 0] - ssim_channels(torch.tensor(x), torch.tensor(y), "standard", 255.0).numpy()[:, :, 0]).max() > 1e-6


def test_anomaly_map_equals_official_pipeline():
    "anomaly_map == the official ssim_map times the official batch/column-min background mask, on skull-stripped-like data."
    x, y = _pairs(3, (4, 1, 48, 48))
    yy, xx = np.mgrid[:48, :48]
    brain = ((yy - 24) ** 2 / 18**2 + (xx - 24) ** 2 / 15**2) < 1  # background exactly 0 around an ellipse
    x, y = x * brain, y * brain
    xt, yt = torch.tensor(x), torch.tensor(y)
    official = _official_ssim_map_torch(xt, yt)
    official = official * (yt > yt.amin(dim=(0, 1, 2), keepdim=True))  # spec §5.2 quirk
    ours = anomaly_map(restoration=xt, image=yt, modality="MRI")
    np.testing.assert_allclose(ours.numpy(), official.numpy(), rtol=0, atol=1e-12)
    # RF: 3 channels in [-1, 1], no masking, per-channel clamp then channel mean
    x3, y3 = _pairs(4, (2, 3, 32, 32), -1.0, 1.0)
    np.testing.assert_allclose(anomaly_map(restoration=torch.tensor(x3), image=torch.tensor(y3), modality="RF").numpy(),
                               _official_ssim_map_torch(torch.tensor(x3), torch.tensor(y3)).numpy(), atol=1e-12)
    s = anomaly_score(ours)
    np.testing.assert_allclose(s.numpy(), official.mean(dim=(1, 2, 3)).numpy(), atol=1e-15)


def test_blur_matches_scipy_any_size():
    rng = np.random.default_rng(5)
    for H, W in [(1, 1), (2, 7), (5, 3), (11, 12), (30, 17)]:
        x = rng.random((1, 2, H, W))
        zb = gaussian_blur(torch.tensor(x), "zeros").numpy()
        rb = gaussian_blur(torch.tensor(x), "reflect").numpy()
        for c in range(2):
            np.testing.assert_allclose(zb[0, c], ndimage.correlate(x[0, c], _tgm_window(), mode="constant"), atol=1e-13)
            np.testing.assert_allclose(rb[0, c], ndimage.gaussian_filter(x[0, c], 1.5, mode="reflect", truncate=3.5), atol=1e-13)


def test_batch_independence_and_dtypes():
    x, y = _pairs(6, (5, 3, 24, 24))
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    full = anomaly_map(restoration=xt, image=yt, modality="RF")
    for i in range(5):  # an image's map does not depend on its batch (up to float32 summation order in BLAS)
        torch.testing.assert_close(anomaly_map(restoration=xt[i:i + 1], image=yt[i:i + 1], modality="RF"), full[i:i + 1], atol=1e-7, rtol=0)
    assert full.dtype == torch.float32 and full.shape == (5, 1, 24, 24)
    assert anomaly_map(restoration=xt.half(), image=yt.half(), modality="RF").dtype == torch.float32
    d64 = anomaly_map(restoration=xt.double(), image=yt.double(), modality="RF")
    assert (d64.float() - full).abs().max() < 1e-6
    assert float(full.min()) >= 0 and float(full.max()) <= 1
    # numpy input works too
    np.testing.assert_allclose(anomaly_map(restoration=x, image=y, modality="RF").numpy(), anomaly_map(restoration=torch.tensor(x), image=torch.tensor(y), modality="RF").numpy(), atol=1e-15)


def test_differentiable_path_equals_fast_path_and_gradcheck():
    x, y = _pairs(10, (2, 2, 20, 20))
    xt, yt = torch.tensor(x), torch.tensor(y)
    for mode, dr in [("paper", None), ("standard", 1.0)]:
        fast = ssim_map(xt, yt, mode, dr)  # no input requires grad: in-place formula
        xg = xt.clone().requires_grad_()
        slow = ssim_map(xg, yt, mode, dr)
        torch.testing.assert_close(slow.detach(), fast, atol=1e-14, rtol=0)
        small_x = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
        small_y = torch.rand(1, 1, 6, 7, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda a: ssim_map(a, small_y, mode, dr), (small_x,))


def test_autocast_and_tf32_do_not_leak():
    x, y = _pairs(7, (2, 1, 32, 32))
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    ref = ssim_map(xt, yt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ssim_map(xt, yt)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-7, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _pairs(8, (4, 3, 128, 128), -1.0, 1.0)
    for dtype, atol in [(torch.float32, 1e-6), (torch.float64, 1e-12)]:
        xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
        for mode, dr in [("paper", None), ("standard", 2.0)]:
            cpu = ssim_map(xt, yt, mode, dr)
            with torch.autocast("cuda"):  # must be ignored inside
                gpu = ssim_map(xt.cuda(), yt.cuda(), mode, dr)
            assert gpu.device.type == "cuda"
            torch.testing.assert_close(gpu.cpu(), cpu, atol=atol, rtol=0)
        torch.testing.assert_close(anomaly_map(restoration=xt.cuda(), image=yt.cuda(), modality="MRI").cpu(), anomaly_map(restoration=xt, image=yt, modality="MRI"), atol=atol, rtol=0)


@pytest.mark.parametrize("call,msg", [
    (lambda x, y: ssim_map(x, y[:, :, :-1]), "differ in shape"),
    (lambda x, y: ssim_map(x[0], y[0]), "4-D"),
    (lambda x, y: ssim_map(x[:0], y[:0]), "empty"),
    (lambda x, y: ssim_map(x * float("nan"), y), "NaN"),
    (lambda x, y: ssim_map(x, y, "ms-ssim"), "unknown SSIM mode"),
    (lambda x, y: ssim_map(x, y, "standard"), "needs data_range"),
    (lambda x, y: ssim_map(x, y, "standard", -1.0), "positive finite"),
    (lambda x, y: ssim_map(x, y, "paper", 1.0), "only for mode='standard'"),
    (lambda x, y: ssim_map((x * 255).to(torch.uint8), (y * 255).to(torch.uint8)), "floating-point"),
    (lambda x, y: anomaly_map(restoration=x, image=y, modality="CT"), "unknown modality"),
    (lambda x, y: anomaly_map(restoration=x, image=y[:1], modality="MRI"), "differ in shape"),
    (lambda x, y: anomaly_score(x[0]), "4-D"),
    (lambda x, y: anomaly_score(x[:0]), "empty"),
    (lambda x, y: anomaly_score(x * float("inf")), "NaN or Inf"),
])
def test_bad_input(call, msg):
    x, y = (torch.tensor(a, dtype=torch.float32) for a in _pairs(9, (2, 1, 16, 16)))
    with pytest.raises(ValueError, match=msg):
        call(x, y)


def test_fp32_precision_sets_and_restores_the_new_api():
    "One TF32 API (torch ≥ 2.9): `fp32_precision` switches CUDA matmul and cuDNN conv to IEEE inside and restores afterwards."
    import torch
    from condiff.ssim import fp32_precision
    mm, cv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = mm.fp32_precision, cv.fp32_precision
    try:
        mm.fp32_precision = cv.fp32_precision = 'tf32'
        with fp32_precision('ieee'): assert (mm.fp32_precision, cv.fp32_precision) == ('ieee', 'ieee')
        assert (mm.fp32_precision, cv.fp32_precision) == ('tf32', 'tf32')
        with pytest.raises(ValueError, match='ieee'):
            with fp32_precision('fast'): pass
    finally: mm.fp32_precision, cv.fp32_precision = old
