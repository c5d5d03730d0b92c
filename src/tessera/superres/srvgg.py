"""SRVGGNetCompact (Real-ESRGAN's compact model, `realesr-animevideov3` / `realesr-general-x4v3`): a
plain stack of 3x3 convolutions at low resolution, one pixel shuffle, and a nearest-upsampled copy of
the input added back, so the network only learns the residual.

    x [B,3,H,W] in [0,1] --conv_first, act--> num_conv x (conv, act) --> conv to 3*s*s channels
      --> pixel shuffle (s) --> + nearest-upsampled x --> [B,3,H*s,W*s]

`body` keeps the authors' flat module list (conv, act, conv, act, ...), so their `.pth` files load with
`strict=True`. Tessera's own fast SR models use this architecture at smaller widths.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class SRVGGConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    num_feat: int = 64
    num_conv: int = 16
    upscale: int = 4
    act: str = "prelu"     # prelu | lrelu | relu

    def __post_init__(self):
        if self.act not in ("prelu", "lrelu", "relu"):
            raise ValueError(f"act={self.act!r} must be prelu, lrelu or relu")
        if self.upscale < 1:
            raise ValueError(f"upscale={self.upscale} must be >= 1")


def activation(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(num_parameters=channels)
    return nn.LeakyReLU(0.1) if kind == "lrelu" else nn.ReLU()


@register_family("srvgg", SRVGGConfig, role="superres", task="sr",
                 train=dict(batch_size=16, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=200, ema_decay=0.999,
                            max_steps=20000, val_every=500))
class SRVGGNetCompact(nn.Module):
    def __init__(self, cfg: SRVGGConfig):
        super().__init__()
        self.config = cfg
        f, s = cfg.num_feat, cfg.upscale
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, f, 3, padding=1), activation(cfg.act, f)]
        for _ in range(cfg.num_conv):
            layers += [nn.Conv2d(f, f, 3, padding=1), activation(cfg.act, f)]
        layers.append(nn.Conv2d(f, cfg.out_channels * s * s, 3, padding=1))
        self.body = nn.ModuleList(layers)

    @property
    def scale(self) -> int:
        return self.config.upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,C,H,W] in [0, 1] -> [B,C,H*s,W*s] (not clamped)."""
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.config.upscale)  # (B, C*s*s, H, W) -> (B, C, H*s, W*s)
        return out + F.interpolate(x, scale_factor=self.config.upscale, mode="nearest")

# compact residual nets for Tessera's own fast x4 / x2 models
register_preset("sr-compact-x4", "srvgg", weights=True, num_feat=48, num_conv=12, upscale=4)
register_preset("sr-compact-x2", "srvgg", weights=True, num_feat=32, num_conv=8, upscale=2)
