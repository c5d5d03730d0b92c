"""Text-conditioned U-Net denoiser (seed 004 Figures 8-10; Ronneberger et al. 2015, DDPM, LDM).

    x_t [B,C,H,W] --conv_in--> down levels: (ResBlock(+t) [+ SpatialTransformer(text)]) x n, Downsample
                  --> middle: ResBlock(+t), SpatialTransformer(text), ResBlock(+t)
                  --> up levels: (concat skip, ResBlock(+t) [+ SpatialTransformer(text)]) x (n+1), Upsample
                  --> norm, SiLU, conv_out --> predicted noise (or v) [B,C,H,W]

The sinusoidal timestep embedding enters every ResBlock. Normalization is GroupNorm, not the seed's
BatchNorm: batch statistics are unreliable at the small batches (and batch-1 sampling) used here.
Text conditioning is cross-attention to the prompt encoder's token states; rows with `drop` set see a
learned null condition instead (classifier-free guidance). The network knows nothing of noise
schedules; `tessera.sampling.diffusion` drives it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.nn.attention import CrossBlock
from tessera.nn.conditioning import timestep_embedding, with_null_condition
from tessera.nn.layers import Downsample, ResBlock2d, Upsample, group_norm
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class UNetConfig(Config):
    in_channels: int = 8                      # latent channels (vq-f8 latents: 8) or 3 for pixels
    sample_size: int = 16                     # latent side
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[bool, ...] = (False, True, True)  # text cross-attention (+ self-attention) per level
    heads: int = 4
    dropout: float = 0.0
    cond_dim: int = 384                       # prompt-encoder width; 0 = unconditional
    max_text_tokens: int = 64

    def __post_init__(self):
        if len(self.attn_levels) != len(self.channel_mult):
            raise ValueError(f"attn_levels has {len(self.attn_levels)} entries, channel_mult {len(self.channel_mult)}")
        if self.sample_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"sample_size={self.sample_size} must be divisible by 2^(levels-1)")

    @property
    def conditional(self) -> bool:
        return self.cond_dim > 0


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> CrossBlock (self-attention, cross-attention to text, MLP) -> feature map."""

    def __init__(self, channels: int, heads: int, cond_dim: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.block = CrossBlock(channels, cond_dim, heads)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # permute + reshape, not flatten + transpose: no copy when the conv output is channels-last
        t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        t = self.block(t, context, mask)
        return x + self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W) view


class _Level(nn.Module):
    """ResBlocks (each optionally followed by a SpatialTransformer) at one resolution."""

    def __init__(self, chans: list[tuple[int, int]], temb_dim: int, dropout: float, attn: bool, heads: int,
                 cond_dim: int):
        super().__init__()
        self.res = nn.ModuleList(ResBlock2d(i, o, temb_dim, dropout) for i, o in chans)
        self.attn = nn.ModuleList(SpatialTransformer(o, heads, cond_dim) for _, o in chans) if attn else None


@register_family("unet", UNetConfig, role="generator", paradigm="diffusion", sampler="ddim", pipeline="tessera.pipelines.diffusion:DiffusionPipeline",
                 task="diffusion",
                 cache="tessera.train.runs:prepare_diffusion_inputs",
                 train=dict(batch_size=32, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=500, ema_decay=0.999,
                            max_steps=20000))
class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch0, temb_dim = cfg.base_channels, 4 * cfg.base_channels
        chs = [ch0 * m for m in cfg.channel_mult]
        self.time_mlp = nn.Sequential(nn.Linear(ch0, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        if cfg.conditional:
            self.null_text = nn.Parameter(torch.randn(cfg.cond_dim) * 0.02)  # learned "no caption"
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        skips, ch = [ch0], ch0
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, out in enumerate(chs):
            pairs = [(ch if j == 0 else out, out) for j in range(cfg.num_res_blocks)]
            self.down.append(_Level(pairs, temb_dim, cfg.dropout, cfg.attn_levels[i] and cfg.conditional,
                                    cfg.heads, cfg.cond_dim))
            ch = out
            skips += [out] * cfg.num_res_blocks
            last = i == len(chs) - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skips.append(ch)

        self.mid1 = ResBlock2d(ch, ch, temb_dim, cfg.dropout)
        self.mid_attn = SpatialTransformer(ch, cfg.heads, cfg.cond_dim) if cfg.conditional else None
        self.mid2 = ResBlock2d(ch, ch, temb_dim, cfg.dropout)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chs))):
            out = chs[i]
            pairs = []
            for _ in range(cfg.num_res_blocks + 1):
                pairs.append((ch + skips.pop(), out))
                ch = out
            self.up.append(_Level(pairs, temb_dim, cfg.dropout, cfg.attn_levels[i] and cfg.conditional,
                                  cfg.heads, cfg.cond_dim))
            self.upsample.append(Upsample(ch) if i > 0 else nn.Identity())

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predicts 0 at init
        nn.init.zeros_(self.conv_out.bias)

    def _level(self, level: _Level, h, temb, ctx, mask, skips: list | None = None, push: list | None = None):
        for j, res in enumerate(level.res):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = res(h, temb)
            if level.attn is not None:
                h = level.attn[j](h, ctx, mask)
            if push is not None:
                push.append(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,H,W], t [B] -> model output [B,C,H,W]."""
        b = x.shape[0]
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels))  # (B, 4*base)
        ctx = None
        if self.config.conditional:
            ctx, mask = with_null_condition(cond, mask, drop, self.null_text, b, self.config.max_text_tokens)
        h = self.conv_in(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            h = self._level(level, h, temb, ctx, mask, push=skips)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid1(h, temb)
        if self.mid_attn is not None:
            h = self.mid_attn(h, ctx, mask)
        h = self.mid2(h, temb)
        for level, up in zip(self.up, self.upsample):
            h = up(self._level(level, h, temb, ctx, mask, skips=skips))
        return self.conv_out(F.silu(self.norm_out(h)))

# latent-diffusion U-Nets over 16x16x8 vq-f8 latents, MiniLM (384-d) cross-attention
register_preset("unet-s", "unet", base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, heads=4)
register_preset("unet-xs", "unet", default=True, base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, heads=4)
# unet-xs distilled into 4 guidance-free steps (tessera optimize --distill-steps 4; its record holds the defaults)
register_preset("unet-xs-4step", "unet", weights=True, base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, heads=4)
