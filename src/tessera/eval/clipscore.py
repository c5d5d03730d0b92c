"""CLIPScore (Hessel et al. 2021; seed 004 "CLIPScore") and caption-image retrieval.

    CLIPScore(image, caption) = 100 * max(cos(E_img(image), E_txt(caption)), 0)

(the torchmetrics convention; Hessel et al. use 2.5 instead of 100). Two image-text models:

    load_image_text_model("clip-xs")        Tessera's own contrastive model (eval/contrastive.py), trained
                                            offline on the captioned demo data: scores are NOT comparable
                                            to published CLIPScores, and the report says so
    load_image_text_model("/path/to/clip")  a Hugging Face CLIP folder (openai/clip-vit-base-patch32, ...),
                                            local files only: the CLIPScore of the literature

Both expose `image_features(images [B,3,H,W] in [-1,1])` and `text_features(prompts)` -> unit vectors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from tessera.data.dataset import to_tensor


class OwnContrastive:
    """Tessera's contrastive model + the frozen prompt encoder it was trained over."""

    def __init__(self, model, name: str):
        from tessera.text import load_text_encoder

        self.model, self.name = model.eval(), name
        self.encoder = load_text_encoder(model.config.text_encoder)
        self.space = f"{name} (Tessera contrastive model trained on its demo data; not OpenAI CLIP)"

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.float())

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.encoder.encode(prompts).pooled.float())


class HFClip:
    """A Hugging Face CLIP model folder (weights, tokenizer and image processor), read without internet.
    Images follow the folder's image processor: bicubic resize of the short side, centre crop, mean/std."""

    def __init__(self, path: str | Path):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.side = int(_field(proc.crop_size, "height"))
        self.short = int(_field(proc.size, "shortest_edge"))
        self.mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        self.name = str(path)
        self.space = f"CLIP {Path(path).name}"

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().add(1).div(2)  # (B,3,H,W) in [0,1]
        h, w = x.shape[-2:]
        scale = self.short / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", align_corners=False,
                          antialias=True)
        top, left = (x.shape[-2] - self.side) // 2, (x.shape[-1] - self.side) // 2
        x = x[..., top:top + self.side, left:left + self.side]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=self._pixels(images))), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        max_len = self.model.config.text_config.max_position_embeddings
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.normalize(_features(out), dim=-1)


def _field(size, key: str):
    """An image processor's size / crop_size: a dict (older transformers) or a SizeDict (newer)."""
    return size[key] if isinstance(size, dict) else getattr(size, key)


def _features(out) -> torch.Tensor:
    """transformers returns a tensor (older) or an output object with pooler_output (newer)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_image_text_model(spec: str = "clip-xs"):
    """A Tessera contrastive export (folder or bundled preset) or a Hugging Face CLIP folder."""
    path = Path(spec)
    config = path / "config.json"
    if path.is_dir() and config.is_file() and json.loads(config.read_text()).get("model_type") == "clip":
        return HFClip(path)
    import tessera

    model = tessera.load(spec)
    if getattr(model, "kind", None) != "contrastive":
        raise ValueError(f"{spec} is not an image-text model (a contrastive export or a CLIP folder)")
    return OwnContrastive(model, spec)


def image_embedder(model: str = "clip-xs"):
    """Embedder factory `image_text` (data prepare --semantic-dedup MODEL): the model's unit image features."""
    return load_image_text_model(model)


@torch.no_grad()
def clip_scores(scorer, images: list[Image.Image], prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Per-image CLIPScore [N] = 100 * max(cos, 0)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.stack([to_tensor(im) for im in images[s:s + batch_size]])
        cos = (scorer.image_features(x) * scorer.text_features(prompts[s:s + batch_size])).sum(-1)
        out.append(100 * cos.clamp_min(0))
    return torch.cat(out)


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Held-out retrieval with unit image / text embeddings of N pairs. A hit is a retrieved item whose
    caption is the query's caption (identical captions are interchangeable). Also the mean cosine of
    true pairs vs. mismatched ones (each image against the next image's caption)."""
    sim = (img @ txt.T).detach()  # (N_img, N_txt)
    same = torch.tensor([[a == b for b in captions] for a in captions])  # (N, N) caption identity
    n = len(captions)
    out = {"pairs": n, "chance_top1": 1.0 / n}
    for k in (1, 5):
        i2t = sim.topk(min(k, n), dim=1).indices  # (N, k) captions for each image
        t2i = sim.topk(min(k, n), dim=0).indices.T  # (N, k) images for each caption
        out[f"i2t_top{k}"] = float(same.gather(1, i2t).any(1).float().mean())
        out[f"t2i_top{k}"] = float(same.gather(1, t2i).any(1).float().mean())
    true = sim.diagonal()
    other = sim.gather(1, torch.arange(1, n + 1).remainder(n)[:, None]).squeeze(1)
    keep = ~same.gather(1, torch.arange(1, n + 1).remainder(n)[:, None]).squeeze(1)
    out["cos_true"] = float(true.mean())
    out["cos_mismatched"] = float(other[keep].mean()) if keep.any() else float("nan")
    out["frac_true_higher"] = float((true[keep] > other[keep]).float().mean()) if keep.any() else float("nan")
    return out


class CaptionMatch:
    """`tessera data prepare` scorer (seed 004: remove poorly matched image-caption pairs): the
    CLIPScore of the image with its caption; images scoring below `min_score` are rejected."""

    name = "caption_match"
    reject_above = None

    def __init__(self, model: str = "clip-xs", min_score: float | None = None):
        self.scorer = load_image_text_model(model)
        self.reject_below = min_score

    def score(self, im: Image.Image, caption: str) -> float:
        """NaN (kept, nothing to match) for an image without a caption."""
        if not caption.strip():
            return float("nan")
        return float(clip_scores(self.scorer, [im], [caption])[0])


def caption_match(model: str = "clip-xs", min_score: str | None = None) -> CaptionMatch:
    """Scorer factory, registered as `caption_match`: `--scorer 'caption_match?model=clip-xs&min_score=20'`."""
    return CaptionMatch(model, float(min_score) if min_score is not None else None)
