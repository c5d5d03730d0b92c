"""The LAION aesthetic predictor (seed 000/004: "Remove low-aesthetic images: specialized ML models"): a head
over CLIP ViT-L/14 image embeddings that predicts the mean 1-10 rating people gave an image.

    improved-aesthetic-predictor ("sac+logos+ava1-l14-linearMSE"): an MLP 768-1024-128-64-16-1 (dropout
        between the first four layers, no activations), keys layers.{0,2,4,6,7}.{weight,bias}
    LAION-Aesthetics v1 ("sa_0_4_vit_l_14_linear"): one linear layer 768-1, keys weight, bias

on the L2-normalised CLIP image embedding. Both are published as PyTorch pickles; Tessera reads only
safetensors, so convert your copy once, yourself (docs/data.md), and pass both paths:

    --scorer 'aesthetic?clip=/models/clip-vit-large-patch14&head=/models/aesthetic-l14.safetensors&min_score=5'

The CLIP image features come from `transformers` (eval/clipscore.HFClip: the folder's own preprocessing)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from tessera.checkpoint import load_strict, read_safetensors
from tessera.config import Config
from tessera.data.dataset import to_tensor
from tessera.errors import WrongModelError

MLP_WIDTHS = (1024, 128, 64, 16)


@dataclasses.dataclass
class AestheticHeadConfig(Config):
    dim: int = 768                      # CLIP ViT-L/14 projection width
    hidden: tuple[int, ...] = MLP_WIDTHS  # () = the v1 linear head


class AestheticHead(nn.Module):
    """layers = Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear (the published module's
    indices, so its keys load unchanged); one Linear for the v1 head."""

    def __init__(self, config: AestheticHeadConfig):
        super().__init__()
        self.config = config
        if not config.hidden:
            self.linear = nn.Linear(config.dim, 1)
            return
        widths, layers = (config.dim, *config.hidden), []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(config.hidden) - 1:
                layers.append(nn.Dropout((0.2, 0.2, 0.1)[i] if i < 3 else 0.0))
        layers.append(nn.Linear(widths[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (B, dim) unit CLIP image embeddings -> (B,) predicted ratings."""
        return (self.layers(emb) if self.config.hidden else self.linear(emb)).squeeze(-1)


def head_config(state: dict[str, torch.Tensor], where: Path) -> AestheticHeadConfig:
    """The head's form from its keys: the v1 linear layer or the MLP."""
    if set(state) == {"weight", "bias"}:
        return AestheticHeadConfig(dim=state["weight"].shape[1], hidden=())
    if not state or not all(re.fullmatch(r"layers\.\d+\.(weight|bias)", k) for k in state):
        raise WrongModelError(f"{where}: not a LAION aesthetic head (keys {sorted(state)[:4]} ...; expected "
                              f"layers.N.weight / bias, or weight / bias)")
    weights = sorted((int(k.split(".")[1]), v) for k, v in state.items() if k.endswith(".weight"))
    return AestheticHeadConfig(dim=weights[0][1].shape[1], hidden=tuple(w.shape[0] for _, w in weights[:-1]))


def load_head(path: str | Path) -> AestheticHead:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WrongModelError(f"{path}: give the head as .safetensors (convert the published .pth yourself, "
                              f"docs/data.md); Tessera does not unpickle downloaded files")
    state = read_safetensors(path)
    head = AestheticHead(head_config(state, path))
    state = {("linear." + k if not head.config.hidden else k): v for k, v in state.items()}
    return load_strict(head, state, path).eval()


class Aesthetic:
    """`data prepare` scorer `aesthetic`: predicted rating (1-10 scale); below `min_score` is rejected."""

    name = "aesthetic"
    reject_above = None

    def __init__(self, clip: str | Path, head: str | Path, min_score: float | None = None):
        from tessera.eval.clipscore import HFClip

        self.clip, self.head = HFClip(clip), load_head(head)
        self.reject_below = min_score
        dim = self.clip.model.config.projection_dim
        if dim != self.head.config.dim:
            raise WrongModelError(f"aesthetic head {head} takes {self.head.config.dim}-d embeddings; CLIP {clip} "
                                  f"gives {dim}-d (the LAION heads need CLIP ViT-L/14)")

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.stack([to_tensor(im.convert("RGB")) for im in images])
        return self.head(self.clip.image_features(x))

    def score(self, im: Image.Image, caption: str) -> float:
        return float(self.predict([im])[0])


def aesthetic(clip: str, head: str, min_score: str | None = None) -> Aesthetic:
    """Scorer factory, registered as `aesthetic`: `--scorer 'aesthetic?clip=DIR&head=FILE&min_score=5'`."""
    return Aesthetic(clip, head, float(min_score) if min_score is not None else None)
