"""RRDBNet, the generator of ESRGAN / Real-ESRGAN (Wang et al. 2018, 2021): Residual-in-Residual Dense
Blocks at low resolution, then two nearest x2 upsamplings with convolutions.

    x [B,3,H,W] in [0,1] --(scale 2: pixel-unshuffle x2, scale 1: x4)--> conv_first --> feat [B,F,h,w]
      --> num_block x RRDB --> conv_body --> + feat
      --> (nearest x2, conv_up1, LReLU) --> (nearest x2, conv_up2, LReLU) --> conv_hr, LReLU --> conv_last
      --> [B,3,H*scale,W*scale]

Each RRDB is three dense blocks (RDB: five 3x3 convs, each seeing every earlier output, growth G),
each with residual scaling 0.2 (ESRGAN Sec. 3.1). Module names follow the authors' code, so their
`.pth` state dicts load with `strict=True`.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class RRDBNetConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    scale: int = 4          # 4; 2 and 1 pixel-unshuffle the input first (Real-ESRGAN x2plus)
    num_feat: int = 64
    num_block: int = 23     # x4plus: 23; x4plus-anime: 6
    num_grow_ch: int = 32

    def __post_init__(self):
        if self.scale not in (1, 2, 4):
            raise ValueError(f"scale={self.scale} must be 1, 2 or 4")


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int, grow: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, grow, 3, padding=1)
        self.conv2 = nn.Conv2d(num_feat + grow, grow, 3, padding=1)
        self.conv3 = nn.Conv2d(num_feat + 2 * grow, grow, 3, padding=1)
        self.conv4 = nn.Conv2d(num_feat + 3 * grow, grow, 3, padding=1)
        self.conv5 = nn.Conv2d(num_feat + 4 * grow, num_feat, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = lrelu(self.conv1(x))
        x2 = lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x  # residual scaling (ESRGAN Sec. 3.1)


class RRDB(nn.Module):
    def __init__(self, num_feat: int, grow: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, grow)
        self.rdb2 = ResidualDenseBlock(num_feat, grow)
        self.rdb3 = ResidualDenseBlock(num_feat, grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


@register_family("rrdbnet", RRDBNetConfig, role="superres", task="sr",
                 train=dict(batch_size=16, lr=2e-4, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=200, ema_decay=0.999,
                            max_steps=20000, val_every=500))
class RRDBNet(nn.Module):
    def __init__(self, cfg: RRDBNetConfig):
        super().__init__()
        self.config = cfg
        f = cfg.num_feat
        unshuffle = {4: 1, 2: 4, 1: 16}[cfg.scale]  # input channels multiply after pixel-unshuffle
        self.conv_first = nn.Conv2d(cfg.in_channels * unshuffle, f, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(f, cfg.num_grow_ch) for _ in range(cfg.num_block)))
        self.conv_body = nn.Conv2d(f, f, 3, padding=1)
        self.conv_up1 = nn.Conv2d(f, f, 3, padding=1)
        self.conv_up2 = nn.Conv2d(f, f, 3, padding=1)
        self.conv_hr = nn.Conv2d(f, f, 3, padding=1)
        self.conv_last = nn.Conv2d(f, cfg.out_channels, 3, padding=1)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,C,H,W] in [0, 1] -> [B,C,H*scale,W*scale] (not clamped)."""
        if self.config.scale < 4:
            x = F.pixel_unshuffle(x, 4 // self.config.scale)  # (B, C*r*r, H/r, W/r)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(lrelu(self.conv_hr(feat)))

# Real-ESRGAN's x4plus architecture (pretrained weights: superres.pretrained)
register_preset("rrdb-x4", "rrdbnet", num_block=23, scale=4)
