"""LlamaGen's VQ tokenizer (`VQ_16`: 16384 codes of dimension 8, l2-normalised; `vq_ds16_c2i.pt`) under
its checkpoint's names. The convolutional stacks are taming's (tokenizer/taming.py's blocks) with
attention only at the lowest resolution and a different container layout:

    encoder.conv_blocks.{level}.res.{j} / .attn.{j} / .downsample,  encoder.mid.{0,1,2}
    decoder.conv_blocks.{k}  (k = 0 is the LOWEST resolution: stored in the order they run), .upsample

Quantization: z and the codebook both l2-normalised, nearest code by squared distance (codebook_l2_norm);
decoding looks the normalised code up. `quantize.codebook_used` (a usage counter of training) is stored
in the checkpoints and kept as a buffer so they load strictly.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.registry import register_family
from tessera.tokenizer.taming import (
    AttnBlock,
    Downsample,
    Quantize,
    ResnetBlock,
    TokenAutoencoder,
    Upsample,
    _norm,
    level,
    run_level,
)


@dataclasses.dataclass
class LlamaGenVQConfig(Config):
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2

    @property
    def factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


class Encoder(nn.Module):
    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        mult, n = (1, *cfg.encoder_ch_mult), len(cfg.encoder_ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i, m in enumerate(cfg.encoder_ch_mult):
            block = level(cfg.ch * mult[i], cfg.ch * m, cfg.num_res_blocks, i == n - 1, "res")
            if i < n - 1:
                block.downsample = Downsample(cfg.ch * m)
            self.conv_blocks.append(block)
        c = cfg.ch * cfg.encoder_ch_mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = run_level(block, h, "res")
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        n = len(cfg.decoder_ch_mult)
        c = cfg.ch * cfg.decoder_ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        self.conv_blocks = nn.ModuleList()
        for lv in reversed(range(n)):  # in the order they run: lowest resolution first
            block = level(c, cfg.ch * cfg.decoder_ch_mult[lv], cfg.num_res_blocks + 1, lv == n - 1, "res")
            c = cfg.ch * cfg.decoder_ch_mult[lv]
            if lv > 0:
                block.upsample = Upsample(c)
            self.conv_blocks.append(block)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = run_level(block, h, "res")
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class Quantizer(Quantize):
    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__(cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm)
        if cfg.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))  # training statistics, stored


@register_family("llamagen-vq", LlamaGenVQConfig, role="tokenizer")
class LlamaGenVQ(TokenAutoencoder):
    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)
        self.codebook_size = cfg.codebook_size
