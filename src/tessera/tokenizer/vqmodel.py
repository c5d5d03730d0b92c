"""diffusers' `VQModel` (the tokenizer of aMUSEd / open-Muse: VQGAN f16, 8192 codes of dimension 64) in
Tessera: the SD VAE's convolutional encoder / decoder (tokenizer/kl.py, diffusers' names) with a single-z
encoder, `quant_conv` / `post_quant_conv` and a nearest-code quantizer (`quantize.embedding`), loaded
strictly from a diffusers folder (`vqvae/` of an aMUSEd pipeline).

    images --encoder--> --quant_conv--> [B,e,h,w] --nearest code (euclidean)--> token ids [B,h,w]
    ids --quantize.embedding--> [B,e,h,w] --post_quant_conv--> --decoder--> images   (lookup_from_codebook)
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tessera.config import Config, check_diffusers_config
from tessera.registry import register_family
from tessera.tokenizer.kl import Decoder, Encoder, KLAutoencoderConfig
from tessera.tokenizer.taming import Quantize, TokenAutoencoder


@dataclasses.dataclass
class VQModelConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 64
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 768)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_attention: bool = False
    num_vq_embeddings: int = 8192
    vq_embed_dim: int = 64
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def stacks(self) -> KLAutoencoderConfig:
        """The encoder / decoder settings, in the form tokenizer/kl.py's stacks take."""
        return KLAutoencoderConfig(in_channels=self.in_channels, out_channels=self.out_channels,
                                   latent_channels=self.latent_channels, block_out_channels=self.block_out_channels,
                                   layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                                   mid_attention=self.mid_attention)

    @classmethod
    def from_diffusers(cls, config: dict) -> "VQModelConfig":
        """A `VQModel` config.json (diffusers' defaults for absent keys); `lookup_from_codebook` and `sample_size`
        change nothing here (tokens are always decoded through the codebook)."""
        config = {**DIFFUSERS_DEFAULTS, **config}
        n = len(config["block_out_channels"])
        fixed = {"act_fn": "silu", "down_block_types": ("DownEncoderBlock2D",) * n,
                 "up_block_types": ("UpDecoderBlock2D",) * n, "norm_type": "group"}
        names = {"mid_block_add_attention": "mid_attention", **{k: k for k in (
            "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
            "norm_num_groups", "num_vq_embeddings", "vq_embed_dim", "scaling_factor", "force_upcast")}}
        check_diffusers_config("VQModel", config, fixed, {*names, "sample_size", "lookup_from_codebook"})
        kw = {ours: config[theirs] for theirs, ours in names.items()}
        return cls.from_dict({**kw, "vq_embed_dim": kw["vq_embed_dim"] or kw["latent_channels"]})


DIFFUSERS_DEFAULTS = {"in_channels": 3, "out_channels": 3, "block_out_channels": (64,), "layers_per_block": 1,
                      "latent_channels": 3, "num_vq_embeddings": 256, "norm_num_groups": 32, "vq_embed_dim": None,
                      "scaling_factor": 0.18215, "mid_block_add_attention": True, "force_upcast": False}


class CdistQuantize(Quantize):
    """The nearest code by euclidean distance as diffusers' VectorQuantizer computes it (torch.cdist)."""

    def distances(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return torch.cdist(flat, codes)


@register_family("vqmodel", VQModelConfig, role="tokenizer")
class VQModel(TokenAutoencoder):
    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg.stacks(), double_z=False), Decoder(cfg.stacks())
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.vq_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.vq_embed_dim, cfg.latent_channels, 1)
        self.quantize = CdistQuantize(cfg.num_vq_embeddings, cfg.vq_embed_dim)
        self.codebook_size = cfg.num_vq_embeddings
