import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the tiny test presets live here, not among the users' presets: registered in-process for the tests,
# passed as files (tiny_preset("ar-tiny")) to the CLI under torchrun
PRESETS = Path(__file__).parent / "presets"


def tiny_preset(name: str) -> str:
    return str(PRESETS / f"{name}.json")


def _register_tiny_presets() -> None:
    import json

    from tessera.registry import register_preset

    for f in sorted(PRESETS.glob("*.json")):
        spec = json.loads(f.read_text())
        register_preset(f.stem, spec["kind"], **spec["config"])


_register_tiny_presets()


def photo_like(seed: int, size=(96, 80), mode="RGB") -> Image.Image:
    """A textured, non-constant synthetic image, distinct per seed (smooth gradients + blobs + noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.02, 0.2, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 127 + 90 * np.sin(xx * fx + ph) * np.cos(yy * fy - ph)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 20)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return im.convert(mode) if mode != "RGB" else im


def tiny_hf_clip(folder: Path, projection_dim: int = 16):
    """A random two-tower CLIP folder (model, MiniLM's tokenizer, image processor at 32 px) -> (folder, model,
    tokenizer, processor)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from tessera.text.encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=tok.vocab_size, max_position_embeddings=64, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=projection_dim)
    model = CLIPModel(cfg).eval()
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for obj in (model, tok, proc):
        obj.save_pretrained(folder)
    return folder, model, tok, proc


def png_bytes(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared folder of 24 synthetic 32x32 images (train + val splits)."""
    from tessera.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("tiny_src")
    for i in range(24):
        photo_like(1000 + i, (64, 64)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a synthetic picture number {i}")
    out = tmp_path_factory.mktemp("tiny_data")
    from tessera.data.filters import FilterConfig

    report = prepare([root], out, PrepareConfig(size=32, workers=1, val_fraction=0.25,
                                                filters=FilterConfig(min_size=32, phash_distance=2)),
                     progress=False)
    assert report["kept_by_split"].get("val", 0) >= 2, report
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """An exported, randomly initialised vq-tiny tokenizer (seed 0)."""
    from tessera.checkpoint import export_model
    from tessera.registry import build

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "vq-tiny"
    export_model(build("vq-tiny"), out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
