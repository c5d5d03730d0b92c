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


def _conv_act_pairs(body: nn.ModuleList) -> list[tuple[nn.Conv2d, nn.Module]]:
    """The (conv, activation) pairs of a body: [conv, act] * (num_conv + 1) + [last conv]."""
    return [(body[k], body[k + 1]) for k in range(0, len(body) - 1, 2)]


@torch.no_grad()
def grown(src: SRVGGNetCompact, num_feat: int, num_conv: int, noise: float = 1e-2, seed: int = 0) -> SRVGGNetCompact:
    """A wider / deeper SRVGGNetCompact computing exactly what `src` computes (Net2Net, Chen et al. 2016):
    new channels receive small random inputs but feed nothing old (their outgoing weights are zero), and
    new layers are identity convolutions with identity PReLUs, spread evenly between the old ones. The
    starting point for training a bigger model from a smaller trained one."""
    c = src.config
    if num_feat < c.num_feat or num_conv < c.num_conv or c.act != "prelu":
        raise ValueError(f"grown: {c.num_feat}x{c.num_conv} can only grow (to {num_feat}x{num_conv}); prelu only")
    g = torch.Generator().manual_seed(seed)
    dst = SRVGGNetCompact(dataclasses.replace(c, num_feat=num_feat, num_conv=num_conv))
    old, new = _conv_act_pairs(src.body), _conv_act_pairs(dst.body)
    keep = {round(i * num_conv / c.num_conv) for i in range(1, c.num_conv + 1)}  # hidden layers that carry old ones
    carried = iter(old)
    for i, (conv, act) in enumerate(new):  # i = 0: the input conv; 1..num_conv: hidden
        conv.weight.zero_()
        conv.bias.zero_()
        if i == 0 or i in keep:
            o, o_act = next(carried)
            n_out, n_in = o.weight.shape[:2]
            conv.weight[n_out:].normal_(0, noise, generator=g)            # into the new channels, from all
            conv.weight[:n_out, :n_in] = o.weight
            conv.bias[:n_out] = o.bias
            act.weight.fill_(0.25)
            act.weight[:n_out] = o_act.weight
        else:  # an inserted identity layer
            conv.weight[:, :, 1, 1] = torch.eye(num_feat)
            act.weight.fill_(1.0)
    last_old, last_new = src.body[-1], dst.body[-1]
    last_new.weight.zero_()
    last_new.weight[:, :last_old.weight.shape[1]] = last_old.weight       # the new channels feed nothing yet
    last_new.bias.copy_(last_old.bias)
    return dst


# compact residual nets for Tessera's own fast x4 / x2 models
# the architectures to train (issue 6's bundled sizes) and the bundled models (issue 23: trained on photo crops)
register_preset("sr-compact-x4", "srvgg", num_feat=48, num_conv=12, upscale=4)
register_preset("sr-compact-x2", "srvgg", num_feat=32, num_conv=8, upscale=2)
register_preset("sr-fidelity-x4", "srvgg", weights=True, num_feat=64, num_conv=16, upscale=4)
register_preset("sr-fidelity-x2", "srvgg", weights=True, num_feat=32, num_conv=8, upscale=2)
register_preset("sr-perceptual-x4", "srvgg", weights=True, num_feat=64, num_conv=16, upscale=4)
register_preset("sr-perceptual-x2", "srvgg", weights=True, num_feat=32, num_conv=8, upscale=2)
