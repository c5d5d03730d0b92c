"""The Stable Diffusion U-Net (LDM, Rombach et al. 2022; diffusers `UNet2DConditionModel`), with diffusers'
parameter names so SD 1.x / 2.x / SD-Turbo weights load strictly as they are (REFERENCE 2.1).

    x_t [B,4,h,w] --conv_in--> down levels: (ResBlock(+t) [+ Transformer(text)]) x n, stride-2 conv
                  --> mid: ResBlock(+t), Transformer(text), ResBlock(+t)
                  --> up levels: (concat skip, ResBlock(+t) [+ Transformer(text)]) x (n+1), 2x nearest + conv
                  --> GroupNorm, SiLU, conv_out --> epsilon or v [B,4,h,w]

    Transformer: GroupNorm, proj_in (1x1 conv in SD1, linear in SD2), depth x [self-attention,
                 cross-attention to the text states, GEGLU feed-forward] (each pre-LayerNorm, residual),
                 proj_out, plus the input.

The timestep enters as diffusers' sinusoidal embedding (flip_sin_to_cos, freq_shift) -> Linear, SiLU,
Linear. Unlike Tessera's own `unet.py` this network has no learned null condition: classifier-free
guidance uses the text encoder's states of the empty (or negative) prompt, as SD was trained. It holds
no sampling loop (`tessera.sampling.solvers` drives it).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config, check_diffusers_config
from tessera.nn.kernels import ATTENTION, attend
from tessera.nn.quant import upsample_nearest
from tessera.nn.tome import bipartite_soft_matching
from tessera.registry import register_family


@dataclasses.dataclass
class SDUNetConfig(Config):
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # per down level (up levels mirror it)
    layers_per_block: int = 2
    heads: tuple[int, ...] = (8, 8, 8, 8)            # attention heads per level (SD2: 5, 10, 20, 20)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False               # SD2: proj_in / proj_out are Linear, SD1: 1x1 conv
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_cond_proj_dim: int | None = None             # LCM-distilled U-Nets: the guidance-scale embedding's width

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("cross_attention", "heads", "transformer_depth"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per level ({n}), got {getattr(self, name)}")

    @property
    def conditional(self) -> bool:
        return True

    @property
    def cond_dim(self) -> int:
        return self.cross_attention_dim

    @classmethod
    def from_diffusers(cls, config: dict) -> "SDUNetConfig":
        return _from_diffusers(cls, config)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """diffusers' sinusoidal embedding: exp(-ln(10^4) i / (dim/2 - shift)) frequencies, [sin, cos] or [cos, sin]."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale w (the conditioning an LCM-distilled U-Net takes instead of
    classifier-free guidance; Luo et al. 2023, after VDM's eq. for timestep embeddings): sinusoids of
    1000 w at the frequencies exp(-ln(10^4) i / (dim/2 - 1)), [sin, cos], zero-padded to `dim`."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = (w.float() * 1000.0)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int | None = None, bias: bool = True):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(c_in, c_out, bias), nn.Linear(c_out, c_out, bias)
        self.cond_proj = nn.Linear(cond_dim, c_in, bias=False) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this U-Net (time_cond_proj_dim set: LCM-distilled) needs the guidance embedding")
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, + projected time embedding, GroupNorm, SiLU, conv, + (projected) input."""

    def __init__(self, c_in: int, c_out: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) over the map
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nn.Module):
    """diffusers' `Attention` (to_q / to_k / to_v / to_out.0; scale head_dim^-1/2): self-attention, or
    cross-attention to a `context_dim`-wide context. `bias`: on q / k / v (SD: none); `out_bias`: on to_out."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False, out_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=out_bias), nn.Dropout(0.0)])
        self.impl = "sdpa"  # nn/kernels.py: sdpa | gemm | auto (SDUNet.set_attention)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, H, L, C/H)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of a context [B,L,*] -> each [B,H,L,C/H] (a fixed context's can be kept)."""
        return self.split(self.to_k(context)), self.split(self.to_v(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)
        out = attend(self.split(self.to_q(x)), k, v, self.impl)  # (B, H, N, C/H)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class GEGLU(nn.Module):
    """h * GELU(gate), [h, gate] = proj(x) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers' GEGLU feed-forward (net.0 = GEGLU, net.2 = the output Linear); `inner` default 4 dim."""

    def __init__(self, dim: int, inner: int | None = None, bias: bool = True):
        super().__init__()
        inner = inner or 4 * dim
        self.net = nn.ModuleList([GEGLU(dim, inner, bias), nn.Dropout(0.0), nn.Linear(inner, dim, bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, hw: tuple[int, int] | None = None,
                tome: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """`tome` > 0: that share of the h*w tokens merged for self-attention (nn/tome.py, tomesd's default:
        self-attention only), by similarity of x; `generator` picks each 2x2 cell's kept token (None: top-left)."""
        merge, unmerge = bipartite_soft_matching(x, *hw, int(x.shape[1] * tome), generator) if tome else (None, None)
        if merge is None:
            x = x + self.attn1(self.norm1(x))
        else:
            x = x + unmerge(self.attn1(merge(self.norm1(x))))  # attention over N - r tokens
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel for a feature map: [B,C,H,W] <-> tokens [B,HW,C]."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, cfg: SDUNetConfig, level: int):
        super().__init__()
        self.level, self.tome, self.tome_random = level, 0.0, True  # SDUNet.set_tome
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        make = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make()
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = make()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        if self.linear:
            t = self.proj_in(t)
        g = torch.Generator().manual_seed(0) if self.tome and self.tome_random and b % 2 == 0 else None  # as tomesd
        for block in self.transformer_blocks:
            t = block(t, context, (h, w), self.tome, g)
        if self.linear:
            t = self.proj_out(t)
        t = t.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            t = self.proj_out(t)
        return t + x


class Resample(nn.Module):
    """Stride-2 conv (down) or 2x nearest + conv (up), under diffusers' names `{down,up}samplers.0.conv`."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.up:
            x = upsample_nearest(x, self.conv, **({"size": size} if size else {"scale_factor": 2.0}))
        return self.conv(x)


class Level(nn.Module):
    """One down or up block: resnets (each with its transformer when the level cross-attends), resampler."""

    def __init__(self, c_ins: list[int], c_out: int, temb: int, cfg: SDUNetConfig, level: int, resample: str | None):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock(c, c_out, temb, g, eps) for c in c_ins)
        if cfg.cross_attention[level]:
            self.attentions = nn.ModuleList(
                SpatialTransformer(c_out, cfg.heads[level], cfg.transformer_depth[level], cfg.cross_attention_dim, cfg,
                                   level) for _ in c_ins)
        if resample == "down":
            self.downsamplers = nn.ModuleList([Resample(c_out, up=False)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Resample(c_out, up=True)])

    def layer(self, j: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[j](x, temb)
        return self.attentions[j](x, context) if hasattr(self, "attentions") else x


class MidBlock(nn.Module):
    def __init__(self, channels: int, temb: int, cfg: SDUNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb, g, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, cfg.heads[-1], cfg.transformer_depth[-1],
                                                            cfg.cross_attention_dim, cfg, len(cfg.heads) - 1)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, temb), context), temb)


@register_family("sd-unet", SDUNetConfig, role="generator", paradigm="diffusion", sampler="ddim")
class SDUNet(nn.Module):
    def __init__(self, cfg: SDUNetConfig):
        super().__init__()
        self.config = cfg
        ch, n, last = cfg.block_out_channels, cfg.layers_per_block, len(cfg.block_out_channels) - 1
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb, cfg.time_cond_proj_dim)
        self.down_blocks = nn.ModuleList(
            Level([ch[max(i - 1, 0)]] + [ch[i]] * (n - 1), ch[i], temb, cfg, i, "down" if i < last else None)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], temb, cfg)
        skips = self._skip_channels()
        up = []
        for i in range(len(ch)):  # up level i works at width ch[last - i] and mirrors down level last - i
            c_out, c_prev = ch[last - i], ch[last - max(i - 1, 0)]
            c_ins = [(c_prev if j == 0 else c_out) + skips.pop() for j in range(n + 1)]
            up.append(Level(c_ins, c_out, temb, cfg, last - i, "up" if i < last else None))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def set_attention(self, impl: str) -> None:
        """The attention kernel of every layer: sdpa | gemm | auto (nn/kernels.py)."""
        if impl not in ATTENTION:
            raise ValueError(f"attention={impl!r}: must be one of {ATTENTION}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.impl = impl

    def set_tome(self, ratio: float, max_downsample: int = 1, random: bool = True) -> None:
        """Token merging (nn/tome.py) in the transformers of the levels downsampled at most `max_downsample`
        times (tomesd's default 1: the full-resolution level only); ratio 0 turns it off. `random`: a random
        kept token per 2x2 cell (fixed seed per call, batches of two and more only, as tomesd), else top-left."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"tome={ratio}: the share of tokens merged must be in [0, 1)")
        for m in self.modules():
            if isinstance(m, SpatialTransformer):
                m.tome, m.tome_random = (ratio if 2 ** m.level <= max_downsample else 0.0), random

    def _skip_channels(self) -> list[int]:
        """Widths of the skip connections the down path leaves, in the order it leaves them."""
        ch, last = self.config.block_out_channels, len(self.config.block_out_channels) - 1
        out = [ch[0]]
        for i, c in enumerate(ch):
            out += [c] * self.config.layers_per_block + ([c] if i < last else [])
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,h,w], t [B] (or a scalar), context: the text encoder's states [B,L,cross_attention_dim];
        timestep_cond [B,time_cond_proj_dim]: `guidance_embedding` for an LCM-distilled U-Net."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        cond = timestep_cond.to(x.device, x.dtype) if timestep_cond is not None else None
        temb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                      cfg.freq_shift).to(x.dtype), cond)  # (B, 4 C0)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for j in range(len(block.resnets)):
                h = block.layer(j, h, temb, context)
                skips.append(h)
            for down in getattr(block, "downsamplers", ()):
                h = down(h)
                skips.append(h)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            for j in range(len(block.resnets)):
                h = block.layer(j, torch.cat([h, skips.pop()], dim=1), temb, context)  # (B, C + C_skip, H, W)
            for up in getattr(block, "upsamplers", ()):
                h = up(h, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ---- diffusers' config.json ------------------------------------------------------------------------------
_FIXED = {"center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
          "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
          "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
          "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
          "addition_time_embed_dim": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
          "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
          "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
          "conv_in_kernel": 3, "conv_out_kernel": 3,
          "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
          "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64}
_READ = {"sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
         "up_block_types", "block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps",
         "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
         "use_linear_projection", "upcast_attention", "time_cond_proj_dim"}


def _per_level(value, n: int, name: str) -> tuple:
    out = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(out) != n:
        raise ValueError(f"UNet2DConditionModel config: {name}={value!r} needs {n} entries")
    return out


def _from_diffusers(cls, config: dict) -> SDUNetConfig:
    """A `UNet2DConditionModel` config.json; a setting this network does not have is an error naming it."""
    check_diffusers_config("UNet2DConditionModel", config, _FIXED, _READ)
    ch = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(ch)
    down = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)))
    up = tuple(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)))
    cross = tuple(b == "CrossAttnDownBlock2D" for b in down)
    if not set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"} or up != tuple(
            "CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)):
        raise ValueError(f"UNet2DConditionModel config: blocks {down} / {up} are not SD's mirrored layout")
    if isinstance(config.get("cross_attention_dim", 1280), (list, tuple)):
        raise ValueError("UNet2DConditionModel config: a per-level cross_attention_dim is not implemented")
    # diffusers reads `attention_head_dim` as the number of heads when num_attention_heads is unset (SD's configs)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    return cls(in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
               sample_size=config.get("sample_size") or 64, block_out_channels=ch, cross_attention=cross,
               layers_per_block=config.get("layers_per_block", 2), heads=_per_level(heads, n, "attention_head_dim"),
               transformer_depth=_per_level(config.get("transformer_layers_per_block", 1), n,
                                            "transformer_layers_per_block"),
               cross_attention_dim=config.get("cross_attention_dim", 1280),
               use_linear_projection=config.get("use_linear_projection", False),
               norm_num_groups=config.get("norm_num_groups", 32), norm_eps=config.get("norm_eps", 1e-5),
               flip_sin_to_cos=config.get("flip_sin_to_cos", True), freq_shift=config.get("freq_shift", 0),
               time_cond_proj_dim=config.get("time_cond_proj_dim"))
