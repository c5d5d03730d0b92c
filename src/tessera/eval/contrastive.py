"""A small contrastive image-text model (CLIP, Radford et al. 2021) for offline CLIPScore and
caption-image match filtering: a frozen prompt encoder (MiniLM's mean-pooled, L2-normalised sentence
vector) under a trained projection, and a small convolutional image tower trained from scratch.

    image [B,3,H,W] in [-1,1] -> conv stem (stride 2) -> residual stages (stride 2 each) -> mean pool -> proj -> e_i
    text  pooled sentence vector [B,D]        -> MLP                                      -> e_t
    similarity = cos(e_i, e_t); training logits = exp(logit_scale) * cos (CLIP's learned temperature)

It is trained on Tessera's own captioned data (`tessera train contrastive`), so its scores say how well
an image matches a caption *in the vocabulary of that data*; it is not OpenAI's CLIP and its scores
are not comparable to published CLIPScores (use `--clip PATH` with a real CLIP for those).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.registry import register_family, register_preset


@dataclasses.dataclass
class ContrastiveConfig(Config):
    image_size: int = 64                       # images are resized to this side before the tower
    channels: tuple[int, ...] = (32, 64, 128, 256)  # stem width, then one stride-2 stage per entry
    stem_stride: int = 2
    blocks_per_stage: int = 1
    text_encoder: str = "minilm"               # the frozen prompt encoder whose pooled vector is the input
    text_dim: int = 384
    text_hidden: int = 512
    embed_dim: int = 256
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature

    def __post_init__(self):
        if self.image_size % (self.stem_stride * 2 ** len(self.channels)):
            raise ValueError(f"image_size={self.image_size} must be divisible by stem_stride * 2**{len(self.channels)}")


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + self.skip(x))


@register_family("contrastive", ContrastiveConfig, role="scorer", task="contrastive",
                 cache="tessera.train.runs:prepare_contrastive_inputs",
                 train=dict(batch_size=128, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1, warmup_steps=100, ema_decay=0.995,
                            max_steps=2000, val_every=250))
class ImageTextModel(nn.Module):
    def __init__(self, config: ContrastiveConfig):
        super().__init__()
        self.config = c = config
        self.stem = nn.Sequential(nn.Conv2d(3, c.channels[0], 3, c.stem_stride, 1, bias=False), nn.GroupNorm(8, c.channels[0]),
                                  nn.SiLU())
        stages, cin = [], c.channels[0]
        for cout in c.channels:
            stages += [ResBlock(cin, cout, 2)] + [ResBlock(cout, cout, 1) for _ in range(c.blocks_per_stage - 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.image_proj = nn.Linear(cin, c.embed_dim)
        self.text_mlp = nn.Sequential(nn.Linear(c.text_dim, c.text_hidden), nn.GELU(),
                                      nn.Linear(c.text_hidden, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(c.init_logit_scale)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] (any size; resized to image_size) -> unit vectors [B,E]."""
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        h = self.stages(self.stem(x)).mean(dim=(2, 3))  # (B, C)
        return F.normalize(self.image_proj(h), dim=-1)

    def encode_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled sentence vectors [B,D] of the frozen prompt encoder -> unit vectors [B,E]."""
        return F.normalize(self.text_mlp(pooled), dim=-1)

    def forward(self, images: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """-> logits [B_img, B_txt] = exp(logit_scale) * cosine similarity (CLIP eq. in Fig. 3)."""
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return scale * self.encode_image(images) @ self.encode_text(pooled).T


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: image i's caption is text i and vice versa."""
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

# contrastive image-text model over frozen MiniLM sentence vectors: offline CLIPScore, caption filtering
register_preset("clip-xs", "contrastive", weights=True, image_size=64, channels=(32, 64, 128, 256), text_dim=384,
                embed_dim=256)
