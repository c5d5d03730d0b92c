"""aMUSEd's U-ViT (Patil et al. 2024, "aMUSEd: an open MUSE reproduction"; diffusers `UVit2DModel`), the
masked token predictor of seed 003's Muse in its open form, under diffusers' parameter names so a released
`transformer/` folder loads strictly as it is:

    ids [B,h,w] (mask id = vocab_size - 1) -> embedding, RMSNorm, 1x1 conv -> [B,C,h,w]
      -> down block: [stride-2 conv], n x (ConvNeXt block (depthwise 3x3, RMSNorm, MLP with GRN, AdaLN by
         the pooled condition), two cross-attentions to the text)
      -> RMSNorm, Linear -> depth x transformer layer (AdaLN-RMSNorm self-attention, AdaLN-RMSNorm
         cross-attention, AdaLN-LayerNorm GEGLU feed-forward; no biases) -> RMSNorm, Linear
      -> up block (as the down block, then [2x2 transposed conv]) -> 1x1 conv, RMSNorm, 1x1 conv
      -> logits [B, h*w, codebook_size] (the mask token is never predicted)

The condition: the text encoder's penultimate states (projected to hidden_size, RMSNorm) for every
cross-attention; the pooled CLIP embedding concatenated with the sinusoidal embeddings of the five
micro-conditions (width, height, crop top, crop left, aesthetic score; SDXL's micro-conditioning) ->
Linear, SiLU, Linear -> the AdaLN modulation of every block. Classifier-free guidance uses the empty
prompt's states (no learned null condition). No decoding loop here: `sampling/masked.amused_step`.

What depends on the condition alone (every AdaLN's scale / shift, every cross-attention's keys / values of
the text) is the same at every decoding step: `prepare(...)` computes it once, `forward(ids,
prepared=...)` reuses it (the same arithmetic, so the same logits as computing it at each call).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config, check_diffusers_config
from tessera.generators.sd_unet import Attention, FeedForward, TimestepEmbedding, timestep_embedding
from tessera.nn.layers import RMSNorm
from tessera.registry import register_family


@dataclasses.dataclass
class Prepared:
    """The condition of a call: the projected text [B,L,D], the AdaLN vector [B,D] and, when kept, each
    module's part of it (AdaLN: (scale, shift); cross-attention: (keys, values))."""

    text: torch.Tensor
    cond: torch.Tensor
    static: dict = dataclasses.field(default_factory=dict)

    def get(self, module: nn.Module, compute):
        if module not in self.static:
            return compute()
        return self.static[module]


@dataclasses.dataclass
class UVitConfig(Config):
    """diffusers' `UVit2DModel` config (its names; defaults: aMUSEd-256 / -512)."""

    hidden_size: int = 1024
    use_bias: bool = False
    cond_embed_dim: int = 768              # the pooled text embedding's width
    micro_cond_encode_dim: int = 256       # the sinusoidal width of each micro-condition
    micro_cond_embed_dim: int = 1280       # 5 micro-conditions x micro_cond_encode_dim
    encoder_hidden_size: int = 768         # the text states' width
    vocab_size: int = 8256                 # codebook + the mask token, rounded up
    codebook_size: int = 8192
    in_channels: int = 768
    block_out_channels: int = 768
    num_res_blocks: int = 3
    downsample: bool = False
    upsample: bool = False
    block_num_heads: int = 12
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    sample_size: int = 64                  # the token grid's side

    def __post_init__(self):
        if self.micro_cond_embed_dim != 5 * self.micro_cond_encode_dim:
            raise ValueError(f"micro_cond_embed_dim={self.micro_cond_embed_dim}: must be 5 x micro_cond_encode_dim "
                             f"({self.micro_cond_encode_dim}; five micro-conditions)")
        for heads, width, name in ((self.block_num_heads, self.block_out_channels, "block_out_channels"),
                                   (self.num_attention_heads, self.hidden_size, "hidden_size")):
            if width % heads:
                raise ValueError(f"{name}={width} must be divisible by its {heads} attention heads")

    @property
    def conditional(self) -> bool:
        return True

    @property
    def cond_dim(self) -> int:
        return self.encoder_hidden_size

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    @property
    def grid_factor(self) -> int:
        """The token grid's side must be a multiple of this (the down block's stride)."""
        return 2 if self.downsample else 1

    @classmethod
    def from_diffusers(cls, config: dict) -> "UVitConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        check_diffusers_config("UVit2DModel", config, {"hidden_dropout": 0.0, "attention_dropout": 0.0}, names)
        return cls.from_dict({k: v for k, v in config.items() if k in names})


class ConvEmbed(nn.Module):
    def __init__(self, cfg: UVitConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.in_channels)
        self.layer_norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.conv = nn.Conv2d(cfg.in_channels, cfg.block_out_channels, 1, bias=cfg.use_bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.embeddings(ids))  # (B, h, w, in_channels)
        return self.conv(x.permute(0, 3, 1, 2))   # (B, C, h, w)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN (Woo et al. 2023, eq. 1-3) over channels-last maps [B,h,w,C]:
    x + gamma (x * N(x)) + beta, N = ||x||_spatial / mean_channels(||x||_spatial)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNextBlock(nn.Module):
    """Depthwise 3x3, RMSNorm, Linear(4C), GELU, GRN, Linear(C), + input, then AdaLN: x (1 + scale) + shift."""

    def __init__(self, cfg: UVitConfig, mult: int = 4):
        super().__init__()
        c, bias = cfg.block_out_channels, cfg.use_bias
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=bias)
        self.norm = RMSNorm(c, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.channelwise_linear_1 = nn.Linear(c, c * mult, bias=bias)
        self.channelwise_norm = GlobalResponseNorm(c * mult)
        self.channelwise_linear_2 = nn.Linear(c * mult, c, bias=bias)
        self.cond_embeds_mapper = nn.Linear(cfg.hidden_size, 2 * c, bias=bias)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)  # each (B, C)
        return scale[:, :, None, None], shift[:, :, None, None]

    def forward(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        h = self.norm(self.depthwise(x).permute(0, 2, 3, 1))  # (B, h, w, C)
        h = self.channelwise_linear_2(self.channelwise_norm(F.gelu(self.channelwise_linear_1(h))))
        x = h.permute(0, 3, 1, 2) + x  # (B, C, h, w)
        scale, shift = p.get(self, lambda: self.modulation(p.cond))
        return x * (1 + scale) + shift


class SkipFFBlock(nn.Module):
    """diffusers' SkipFFTransformerBlock: two pre-RMSNorm cross-attentions to the text (mapped to C by
    SiLU + Linear when its width differs), no feed-forward."""

    def __init__(self, cfg: UVitConfig):
        super().__init__()
        c, bias = cfg.block_out_channels, cfg.use_bias
        self.kv_mapper = nn.Linear(cfg.hidden_size, c, bias=bias) if cfg.hidden_size != c else None
        self.norm1 = RMSNorm(c, 1e-6)
        self.attn1 = Attention(c, cfg.block_num_heads, c, bias=bias, out_bias=bias)
        self.norm2 = RMSNorm(c, 1e-6)
        self.attn2 = Attention(c, cfg.block_num_heads, c, bias=bias, out_bias=bias)

    def keys_values(self, text: torch.Tensor) -> tuple:
        if self.kv_mapper is not None:
            text = self.kv_mapper(F.silu(text))  # (B, L, C)
        return self.attn1.keys_values(text), self.attn2.keys_values(text)

    def forward(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        kv1, kv2 = p.get(self, lambda: self.keys_values(p.text))
        x = self.attn1(self.norm1(x), kv=kv1) + x
        return self.attn2(self.norm2(x), kv=kv2) + x


class Resample(nn.Module):
    """RMSNorm over channels, then a 2x2 stride-2 conv (down; diffusers pads right / bottom by one first)
    or a 2x2 stride-2 transposed conv (up)."""

    def __init__(self, cfg: UVitConfig, up: bool):
        super().__init__()
        c, self.up = cfg.block_out_channels, up
        self.norm = RMSNorm(c, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(c, c, kernel_size=2, stride=2, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, h, w)
        return self.conv(x) if self.up else self.conv(F.pad(x, (0, 1, 0, 1)))


class UVitBlock(nn.Module):
    def __init__(self, cfg: UVitConfig, down: bool, up: bool):
        super().__init__()
        self.downsample = Resample(cfg, up=False) if down else None
        self.res_blocks = nn.ModuleList(ConvNextBlock(cfg) for _ in range(cfg.num_res_blocks))
        self.attention_blocks = nn.ModuleList(SkipFFBlock(cfg) for _ in range(cfg.num_res_blocks))
        self.upsample = Resample(cfg, up=True) if up else None

    def forward(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for res, attn in zip(self.res_blocks, self.attention_blocks):
            x = res(x, p)
            b, c, h, w = x.shape
            t = attn(x.reshape(b, c, h * w).transpose(1, 2), p)  # (B, hw, C)
            x = t.transpose(1, 2).reshape(b, c, h, w)
        return self.upsample(x) if self.upsample is not None else x


class AdaNorm(nn.Module):
    """diffusers' AdaLayerNormContinuous: norm(x) (1 + scale) + shift, [scale, shift] = Linear(SiLU(cond))."""

    def __init__(self, cfg: UVitConfig, kind: str):
        super().__init__()
        d, bias = cfg.hidden_size, cfg.use_bias
        self.linear = nn.Linear(d, 2 * d, bias=bias)
        self.norm = RMSNorm(d, cfg.layer_norm_eps, cfg.ln_elementwise_affine) if kind == "rms" else \
            nn.LayerNorm(d, cfg.layer_norm_eps, cfg.ln_elementwise_affine, bias=bias)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.linear(F.silu(cond)).chunk(2, dim=1)  # each (B, D)
        return scale[:, None, :], shift[:, None, :]

    def forward(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        scale, shift = p.get(self, lambda: self.modulation(p.cond))
        return self.norm(x) * (1 + scale) + shift


class TransformerLayer(nn.Module):
    """diffusers' BasicTransformerBlock with norm_type="ada_norm_continuous": self-attention,
    cross-attention to the text, GEGLU feed-forward, each residual behind its AdaLN."""

    def __init__(self, cfg: UVitConfig):
        super().__init__()
        d, heads, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.use_bias
        self.norm1, self.attn1 = AdaNorm(cfg, "rms"), Attention(d, heads, bias=bias, out_bias=bias)
        self.norm2, self.attn2 = AdaNorm(cfg, "rms"), Attention(d, heads, d, bias=bias, out_bias=bias)
        self.norm3, self.ff = AdaNorm(cfg, "layer"), FeedForward(d, cfg.intermediate_size, bias)

    def forward(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        x = self.attn1(self.norm1(x, p)) + x
        x = self.attn2(self.norm2(x, p), kv=p.get(self.attn2, lambda: self.attn2.keys_values(p.text))) + x
        return self.ff(self.norm3(x, p)) + x


class MlmLayer(nn.Module):
    def __init__(self, cfg: UVitConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.block_out_channels, cfg.in_channels, 1, bias=cfg.use_bias)
        self.layer_norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.conv2 = nn.Conv2d(cfg.in_channels, cfg.codebook_size, 1, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, in_channels, h, w)
        return self.conv2(x)  # (B, codebook, h, w)


@register_family("amused-uvit", UVitConfig, role="generator", paradigm="masked",
                 pipeline="tessera.pipelines.amused:AmusedPipeline")
class UVit2D(nn.Module):
    def __init__(self, cfg: UVitConfig):
        super().__init__()
        self.config = cfg
        d, bias = cfg.hidden_size, cfg.use_bias
        self.encoder_proj = nn.Linear(cfg.encoder_hidden_size, d, bias=bias)
        self.encoder_proj_layer_norm = RMSNorm(d, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.embed = ConvEmbed(cfg)
        self.cond_embed = TimestepEmbedding(cfg.micro_cond_embed_dim + cfg.cond_embed_dim, d, bias=bias)
        self.down_block = UVitBlock(cfg, down=cfg.downsample, up=False)
        self.project_to_hidden_norm = RMSNorm(cfg.block_out_channels, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.project_to_hidden = nn.Linear(cfg.block_out_channels, d, bias=bias)
        self.transformer_layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.project_from_hidden_norm = RMSNorm(d, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.project_from_hidden = nn.Linear(d, cfg.block_out_channels, bias=bias)
        self.up_block = UVitBlock(cfg, down=False, up=cfg.upsample)
        self.mlm_layer = MlmLayer(cfg)

    def condition(self, pooled: torch.Tensor, micro_conds: torch.Tensor) -> torch.Tensor:
        """pooled [B,cond_embed_dim], micro_conds [B,5] -> the AdaLN condition [B,hidden_size]."""
        b = pooled.shape[0]
        micro = timestep_embedding(micro_conds.flatten(), self.config.micro_cond_encode_dim, True, 0.0)  # (5B, e)
        x = torch.cat([pooled, micro.reshape(b, -1).to(pooled.dtype)], dim=1)  # (B, cond_embed_dim + 5e)
        return self.cond_embed(x.to(self.cond_embed.linear_1.weight.dtype))

    def prepare(self, text: torch.Tensor, pooled: torch.Tensor, micro_conds: torch.Tensor,
                keep: bool = True) -> Prepared:
        """text [B,L,encoder_hidden_size]; pooled [B,cond_embed_dim]; micro_conds [B,5] (width, height, crop
        top, crop left, aesthetic score) -> the call's condition; `keep`: every module's part computed now."""
        text = self.encoder_proj_layer_norm(self.encoder_proj(text))  # (B, L, D)
        p = Prepared(text, self.condition(pooled, micro_conds).to(text.dtype))  # cond (B, D)
        if keep:
            for m in self.modules():
                if isinstance(m, (AdaNorm, ConvNextBlock)):
                    p.static[m] = m.modulation(p.cond)
                elif isinstance(m, SkipFFBlock):
                    p.static[m] = m.keys_values(p.text)
            for layer in self.transformer_layers:
                p.static[layer.attn2] = layer.attn2.keys_values(p.text)
        return p

    def forward(self, ids: torch.Tensor, text: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                micro_conds: torch.Tensor | None = None, prepared: Prepared | None = None) -> torch.Tensor:
        """ids [B,h,w] and the condition (text, pooled, micro_conds as in `prepare`, or `prepared`) ->
        logits [B, h*w, codebook_size]."""
        if ids.shape[-1] % self.config.grid_factor or ids.shape[-2] % self.config.grid_factor:
            raise ValueError(f"a {tuple(ids.shape[-2:])} token grid: its sides must be multiples of "
                             f"{self.config.grid_factor}")
        p = prepared if prepared is not None else self.prepare(text, pooled, micro_conds, keep=False)
        x = self.down_block(self.embed(ids), p)  # (B, C, h', w')
        b, c, h, w = x.shape
        t = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, h * w, c)))
        for layer in self.transformer_layers:
            t = layer(t, p)  # (B, h'w', D)
        t = self.project_from_hidden(self.project_from_hidden_norm(t))  # (B, h'w', C)
        x = self.up_block(t.reshape(b, h, w, c).permute(0, 3, 1, 2), p)  # (B, C, h, w)
        logits = self.mlm_layer(x)  # (B, V, h, w)
        return logits.flatten(2).transpose(1, 2)  # (B, hw, V)
