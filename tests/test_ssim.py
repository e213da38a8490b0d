"""condiff.ssim on a GPU: the same maps as on the CPU (skipped without CUDA). The oracle checks (scikit-image, scipy, the
torchgeometry formula) are test cells under their definitions in nbs/03_ssim.ipynb."""
import numpy as np
import pytest
import torch

from condiff.ssim import anomaly_map, ssim_map


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


