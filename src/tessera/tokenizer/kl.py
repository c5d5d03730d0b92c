"""The KL-regularised latent autoencoder of latent diffusion (Rombach et al. 2022; Stable Diffusion's VAE;
diffusers `AutoencoderKL`): taming's convolutional encoder / decoder with a diagonal-Gaussian latent.

    encoder: conv_in -> per level: ResNet blocks (+ stride-2 downsample) -> mid (ResNet, 1-head
             self-attention, ResNet) -> GroupNorm, SiLU, conv -> quant_conv -> (mean, logvar) [B,2z,h,w]
    decoder: post_quant_conv -> conv_in -> mid -> per level (reversed): ResNet blocks (+ 2x nearest
             upsample, conv) -> GroupNorm, SiLU, conv_out -> images [B,3,H,W] in about [-1,1]

Parameter names are diffusers' (`encoder.down_blocks.{i}.resnets.{j}`, `mid_block.attentions.0.to_q`, ...),
so its safetensors load strictly as they are. SD 1.x / 2.x: block_out_channels (128, 256, 512, 512),
2 layers per block, 4 latent channels, scaling factor 0.18215 (REFERENCE 2.2).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config, check_diffusers_config
from tessera.nn.quant import upsample_nearest
from tessera.registry import register_family


@dataclasses.dataclass
class KLAutoencoderConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215   # x_0 of the diffusion model = (latents - shift) * scale
    shift_factor: float = 0.0
    force_upcast: bool = True         # run in float32 even when the rest runs in half precision (SD1/2's VAE)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "KLAutoencoderConfig":
        """An `AutoencoderKL` config.json; a setting Tessera's network does not have is an error."""
        n = len(config.get("block_out_channels", (64,)))
        fixed = {"act_fn": "silu", "down_block_types": ("DownEncoderBlock2D",) * n,
                 "up_block_types": ("UpDecoderBlock2D",) * n, "latents_mean": None, "latents_std": None}
        names = {"in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
                 "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
                 "norm_num_groups": "norm_num_groups", "mid_block_add_attention": "mid_attention",
                 "use_quant_conv": "use_quant_conv", "use_post_quant_conv": "use_post_quant_conv",
                 "scaling_factor": "scaling_factor", "shift_factor": "shift_factor", "force_upcast": "force_upcast"}
        check_diffusers_config("AutoencoderKL", config, fixed, {*names, "sample_size"})  # sample_size: inert
        kw = {ours: config[theirs] for theirs, ours in names.items() if theirs in config}
        if kw.get("shift_factor") is None:
            kw["shift_factor"] = 0.0
        return cls.from_dict(kw)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, plus the input (1x1-projected when the width changes)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SpatialSelfAttention(nn.Module):
    """One head over the h*w positions, with a residual (the mid block's attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding: (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest(x, self.conv, scale_factor=2.0))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """`resnets` at one resolution, then a down- or upsampler (diffusers' Down/UpDecoderBlock2D)."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: KLAutoencoderConfig, double_z: bool = True):
        super().__init__()
        ch, g, last = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                                               "down" if i < last else None) for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        # mean and log-variance (a VQ model's encoder: the latents alone)
        self.conv_out = nn.Conv2d(ch[-1], (2 if double_z else 1) * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: KLAutoencoderConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList(Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g,
                                             "up" if i < len(ch) - 1 else None) for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@register_family("kl", KLAutoencoderConfig, role="autoencoder")
class KLAutoencoder(nn.Module):
    """`encode_latents` gives the posterior mean (diffusers' `latent_dist.mode()`); `sample_latents` draws."""

    def __init__(self, cfg: KLAutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z2, z = 2 * cfg.latent_channels, cfg.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None

    @property
    def factor(self) -> int:
        return self.config.factor

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] in [-1,1] -> (mean, log-variance clamped to [-30, 20]) [B,z,H/f,W/f]."""
        if images.ndim != 4 or images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(f"images must be [B,C,H,W] with H, W multiples of {self.factor}, got {tuple(images.shape)}")
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.moments(images)[0]

    def sample_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.moments(images)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B,z,h,w] (unscaled: divide the diffusion model's x_0 by scaling_factor first) -> images."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
