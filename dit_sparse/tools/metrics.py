"""Fidelity metrics between a sparse and a dense render: PSNR, SSIM, optional LPIPS, per-layer attention error.

Frames are float arrays/tensors in [0, 1] shaped ``[F, H, W, 3]`` (videos) or ``[H, W, 3]`` (images), as diffusers
pipelines return with ``output_type="np"``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "lpips_distance", "compare_frames"]


def _as_video(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames [F, H, W, C] or an image [H, W, C] with C in (1, 3), got {tuple(t.shape)}")
    return t


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB over all frames (``inf`` for identical inputs)."""
    a, b = _as_video(a), _as_video(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b) -> float:
    """Mean structural similarity (Gaussian window 11, sigma 1.5; Wang et al. 2004) over frames and channels."""
    a, b = _as_video(a), _as_video(b)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    x = a.permute(0, 3, 1, 2).reshape(-1, 1, a.shape[1], a.shape[2])
    y = b.permute(0, 3, 1, 2).reshape(-1, 1, b.shape[1], b.shape[2])
    size = min(11, x.shape[-1], x.shape[-2])
    g = _gaussian(size)
    win = (g[:, None] * g[None, :]).view(1, 1, size, size)

    def blur(t):
        return F.conv2d(t, win)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def lpips_distance(a, b) -> float | None:
    """LPIPS (AlexNet) when the ``lpips`` package and its weights are available locally, else None."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None
    try:
        model = lpips.LPIPS(net="alex", verbose=False)
    except Exception:  # weights are downloaded on first use; offline machines have none
        return None
    a, b = _as_video(a).float(), _as_video(b).float()
    with torch.no_grad():
        d = model(a.permute(0, 3, 1, 2) * 2 - 1, b.permute(0, 3, 1, 2) * 2 - 1)
    return float(d.mean())


def compare_frames(sparse, dense) -> dict:
    """``{"psnr", "ssim", "lpips"}`` of a sparse render against the dense one (lpips None when unavailable)."""
    return {"psnr": psnr(sparse, dense), "ssim": ssim(sparse, dense), "lpips": lpips_distance(sparse, dense)}
