"""Curation scorers (issue 25): the LAION aesthetic head over a transformers CLIP, and the no-reference
technical-quality score, as `data prepare` scorers whose parts the catalog records."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter
from safetensors.torch import save_file

from conftest import photo_like, tiny_hf_clip
from tessera.data.catalog import Catalog
from tessera.data.prepare import PrepareConfig, prepare
from tessera.data.quality import technical_score
from tessera.errors import WrongModelError
from tessera.eval.aesthetic import AestheticHeadConfig, load_head


class PublishedMLP(torch.nn.Module):
    """The improved-aesthetic-predictor module as published (its layer list, written out here as the reference)."""

    def __init__(self, dim):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                          torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                          torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_mlp_head_loads_the_published_layout_and_matches_it(tmp_path):
    torch.manual_seed(0)
    ref = PublishedMLP(16).eval()
    save_file(ref.state_dict(), tmp_path / "head.safetensors")
    head = load_head(tmp_path / "head.safetensors")
    assert head.config == AestheticHeadConfig(dim=16, hidden=(1024, 128, 64, 16))
    x = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    assert torch.allclose(head(x), ref(x).squeeze(-1), atol=1e-6)
    lin = torch.nn.Linear(16, 1)
    save_file(lin.state_dict(), tmp_path / "v1.safetensors")
    assert torch.allclose(load_head(tmp_path / "v1.safetensors")(x), lin(x).squeeze(-1), atol=1e-6)


def test_aesthetic_head_refuses_pickles_and_foreign_keys(tmp_path):
    torch.save(PublishedMLP(16).state_dict(), tmp_path / "head.pth")
    with pytest.raises(WrongModelError, match="safetensors"):
        load_head(tmp_path / "head.pth")
    save_file({"proj.weight": torch.zeros(1, 16)}, tmp_path / "other.safetensors")
    with pytest.raises(WrongModelError, match="not a LAION aesthetic head"):
        load_head(tmp_path / "other.safetensors")
    state = PublishedMLP(16).state_dict()
    state["layers.9.weight"] = torch.zeros(1, 1)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(WrongModelError):
        load_head(tmp_path / "extra.safetensors")


def test_aesthetic_scorer_is_the_head_on_transformers_clip_features(tmp_path):
    from tessera.data.filters import load_scorer

    folder, model, _, proc = tiny_hf_clip(tmp_path / "clip")
    torch.manual_seed(1)
    ref = PublishedMLP(16).eval()
    save_file(ref.state_dict(), tmp_path / "head.safetensors")
    scorer = load_scorer(f"aesthetic?clip={folder}&head={tmp_path / 'head.safetensors'}&min_score=0")
    ims = [photo_like(i, (32, 32)) for i in range(3)]
    with torch.no_grad():
        feats = model.get_image_features(**proc(images=ims, return_tensors="pt"))
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        want = ref(torch.nn.functional.normalize(feats, dim=-1)).squeeze(-1)
    got = torch.tensor([scorer.score(im, "") for im in ims])
    assert torch.allclose(got, want, atol=1e-5) and scorer.reject_below == 0
    save_file(PublishedMLP(8).state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(WrongModelError, match="ViT-L/14"):
        load_scorer(f"aesthetic?clip={folder}&head={tmp_path / 'narrow.safetensors'}")


def jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_technical_score_falls_with_each_defect():
    rng = np.random.default_rng(0)
    im = photo_like(7, (256, 192))
    noisy = Image.fromarray(np.clip(np.asarray(im) + rng.normal(0, 25, (192, 256, 3)), 0, 255).astype(np.uint8))
    clean = technical_score(im)
    cases = {"sharp": im.filter(ImageFilter.GaussianBlur(4)), "clean": noisy, "unblocked": jpeg(im, 5),
             "exposed": ImageEnhance.Brightness(im).enhance(0.15)}
    for part, bad in cases.items():
        worse = technical_score(bad)
        assert worse[part] < clean[part] - 0.2, (part, worse[part], clean[part])
        assert worse["score"] < clean["score"], part
    assert 0 <= clean["score"] <= 10


def test_prepare_rejects_below_the_technical_threshold_and_records_the_parts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = photo_like(3, (128, 112))
    good.save(src / "good.png")
    jpeg(photo_like(4, (128, 112)), 3).save(src / "blocky.png")  # JPEG artefacts kept in a lossless file
    cfg = PrepareConfig.from_options(min_size=32, phash_distance=4, scorers=("technical?min_score=6",), size=64,
                                     workers=1)
    prepare([src], tmp_path / "out", cfg, progress=False)
    with Catalog.read(tmp_path / "out") as cat:
        rows = {r["source"].split("/")[-1]: (r["status"], r["reason"], json.loads(r["verdicts"])) for r in cat.rows()}
    assert rows["good.png"][0] == "kept" and rows["good.png"][2]["technical"] >= 6
    status, reason, v = rows["blocky.png"]
    assert (status, reason) == ("rejected", "scorer:technical") and v["technical"] < 6
    assert v["technical.blockiness"] > 1.5 and {"technical.sharp", "technical.noise_sigma"} <= set(v)
