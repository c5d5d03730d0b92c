"""Reconstruction metrics on images in [-1, 1]: PSNR and SSIM (Wang et al. 2004, 11x11 Gaussian, sigma 1.5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [-1,1] images [B,C,H,W], measured on the 8-bit [0,255] scale."""
    a = _to_uint8_float(x)
    b = _to_uint8_float(y)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10.0 * torch.log10(255.0**2 / mse)


def _to_uint8_float(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (mean over channels and valid windows), on the 8-bit scale like skimage's default."""
    a, b = _to_uint8_float(x) / 255.0, _to_uint8_float(y) / 255.0
    c = a.shape[1]
    w = _gaussian_window().to(a)[None, None].repeat(c, 1, 1, 1)  # (C,1,11,11) depthwise
    def blur(t):
        return F.conv2d(t, w, groups=c)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def margin_stats(true: torch.Tensor, shuffled: torch.Tensor) -> dict[str, float]:
    """Per-image scores with the true vs. a shuffled caption (lower is better) -> mean margin, its spread
    (std, standard error), and the fraction of images where the true caption wins."""
    d = shuffled.double() - true.double()
    return {"true": float(true.double().mean()), "shuffled": float(shuffled.double().mean()),
            "margin": float(d.mean()), "margin_std": float(d.std()), "margin_sem": float(d.std() / len(d) ** 0.5),
            "frac_true_better": float((d > 0).double().mean()), "images": len(d)}
