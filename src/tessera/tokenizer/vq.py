"""VQ image tokenizer (Stage I of seed 000; VQ-VAE / VQGAN of seeds 002-003).

    image [B,3,H,W] --Encoder--> z [B,z_ch,h,w] --quant_in--> e [B,d,h,w] --VectorQuantizer--> q, tokens [B,h,w]
    q --quant_out--> [B,z_ch,h,w] --Decoder--> image [B,3,H,W],   h = H / factor

The quantizer uses low-dimensional, l2-normalised codes (ViT-VQGAN, LlamaGen): look-up happens in
a d=8 space on the unit sphere, which keeps most of the codebook in use where plain VQ collapses.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.nn import AttnBlock2d, Downsample, ResBlock2d, Upsample, group_norm
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class VQConfig(Config):
    resolution: int = 128               # training resolution; any multiple of `factor` works at inference
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; factor = 2 ** (levels - 1)
    num_res_blocks: int = 1
    attn_heads: int = 4                 # attention in the middle block at the token resolution
    z_channels: int = 256
    codebook_size: int = 8192
    codebook_dim: int = 8
    l2_normalize: bool = True
    beta: float = 0.25                  # commitment weight (VQ-VAE eq. 3)

    def __post_init__(self):
        if not self.channel_mult:
            raise ValueError("VQConfig.channel_mult must have at least one level")
        if self.resolution % self.factor:
            raise ValueError(f"VQConfig.resolution={self.resolution} is not a multiple of factor {self.factor}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = chs[0]
        for level, out_ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock2d(ch, out_ch))
                ch = out_ch
            if level < len(chs) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock2d(ch), AttnBlock2d(ch, cfg.attn_heads), ResBlock2d(ch))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock2d(ch), AttnBlock2d(ch, cfg.attn_heads), ResBlock2d(ch))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(chs))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock2d(ch, chs[level]))
                ch = chs[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with a straight-through gradient (VQ-VAE, van den Oord 2017)."""

    def __init__(self, size: int, dim: int, beta: float, l2_normalize: bool):
        super().__init__()
        self.size, self.dim, self.beta, self.l2_normalize = size, dim, beta, l2_normalize
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,d,h,w] -> token ids [B,h,w] of the nearest code by Euclidean distance."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (B*h*w, d)
        cb = self.codebook().float()  # (K, d)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 ; ||z||^2 is constant per row
        dist = cb.pow(2).sum(1)[None, :] - 2.0 * flat @ cb.t()  # (B*h*w, K)
        return dist.argmin(dim=1).reshape(b, h, w)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [B,h,w] -> codes [B,d,h,w]."""
        return F.embedding(tokens, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (straight-through codes, codebook + beta * commitment loss, token ids)."""
        z = z.float()
        if self.l2_normalize:
            z = F.normalize(z, dim=1)
        tokens = self.lookup(z)
        q = self.embed(tokens)
        # codebook loss ||sg[z] - e||^2 + beta * commitment ||z - sg[e]||^2 (seed 000, VQGAN eq. 4)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through estimator
        return q, loss, tokens


@register_family("vq", VQConfig, role="tokenizer", task="tokenizer",
                 train=dict(batch_size=16, lr=2e-4, betas=(0.5, 0.9), warmup_steps=500, ema_decay=0.999, max_steps=20000))
class VQModel(nn.Module):
    """Encoder + quantizer + decoder. Images are float tensors in [-1, 1]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_in = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.beta, cfg.l2_normalize)
        self.quant_out = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def factor(self) -> int:
        return self.config.factor

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [B,{self.config.in_channels},H,W], got {tuple(images.shape)}")
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of factor {self.factor}")

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantization latents [B, codebook_dim, H/f, W/f] (on the unit sphere if l2)."""
        self._check(images)
        e = self.quant_in(self.encoder(images)).float()
        return F.normalize(e, dim=1) if self.config.l2_normalize else e

    def decode_latents(self, latents: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latents -> images. With `quantize` the latents snap to the codebook first (LDM's VQ-reg decoder)."""
        if quantize:
            latents = self.quantizer.embed(self.quantizer.lookup(latents))
        return self.decoder(self.quant_out(latents))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> token ids [B, H/f, W/f] (int64)."""
        return self.quantizer.lookup(self.encode_latents(images))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [B,h,w] -> images [B,3,h*f,w*f] in about [-1,1]."""
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [B,h,w], got {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.config.codebook_size:
            raise ValueError(f"token ids must lie in [0, {self.config.codebook_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return self.decoder(self.quant_out(self.quantizer.embed(tokens)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, quantization loss, token ids)."""
        self._check(images)
        q, qloss, tokens = self.quantizer(self.quant_in(self.encoder(images)))
        return self.decoder(self.quant_out(q)), qloss, tokens

    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where VQGAN's adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

# 128 px -> 16x16 tokens, 8192 codes of dim 8 (seed 000 "Image tokenizer"); the bundled default
register_preset("vq-f8", "vq", default=True, base_channels=32, channel_mult=(1, 2, 4, 8), codebook_size=8192)
# vq-f8 fine-tuned on photo crops at native resolution (issue 23): the default of reconstruct / tokenize; the
# bundled generators keep vq-f8, whose tokens they were trained on
register_preset("vq-f8-photo", "vq", weights=True, base_channels=32, channel_mult=(1, 2, 4, 8), codebook_size=8192)
# 256 px -> 16x16 tokens
register_preset("vq-f16", "vq", resolution=256, base_channels=32, channel_mult=(1, 2, 2, 4, 8), codebook_size=8192)
