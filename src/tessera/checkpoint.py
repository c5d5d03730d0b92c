"""Model export folders and training state.

Export folder (what `tessera.load` reads; needs nothing else):
    config.json        the model's config dataclass
    model.safetensors  weights
    meta.json          {"kind", "tessera_version", "sha256" of model.safetensors, "created", extra...}

Training state (`state.pt`): model(s), EMA, optimizers, schedulers, step, RNG. Written atomically
(temp file + fsync + rename) and read with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A model folder or training state is missing, corrupt or does not match."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_training_state(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_training_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {path}: {e}") from e


def export_model(model: nn.Module, kind: str, out_dir: str | Path, extra_meta: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors + meta.json. `model.config` must be a Config.

    `dtype` (e.g. torch.float16) stores floating-point weights smaller; loading casts them back to the
    model's own dtype."""
    from safetensors.torch import save_file

    import tessera

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model.", suffix=".tmp")
    os.close(fd)
    save_file(state, tmp, metadata={"kind": kind})
    os.replace(tmp, out / WEIGHTS)
    atomic_write_bytes(out / CONFIG, (model.config.to_json() + "\n").encode())
    meta = {
        "kind": kind,
        "tessera_version": tessera.__version__,
        "sha256": sha256_file(out / WEIGHTS),
        "stored_dtype": str(dtype or next(iter(state.values())).dtype).removeprefix("torch."),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra_meta or {}),
    }
    atomic_write_bytes(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def load_model(path: str | Path, verify: bool = True) -> nn.Module:
    """Rebuild a model from an export folder: class from meta.kind, config from config.json, strict weights."""
    from safetensors.torch import load_file

    from tessera.registry import model_class

    folder = Path(path)
    for name in (CONFIG, WEIGHTS, META):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a Tessera model folder: {name} is missing")
    meta = json.loads((folder / META).read_text())
    if verify and sha256_file(folder / WEIGHTS) != meta.get("sha256"):
        raise CheckpointError(f"{folder / WEIGHTS}: sha256 does not match meta.json (corrupt or replaced)")
    cls, cfg_cls = model_class(meta["kind"])
    model = cls(cfg_cls.load(folder / CONFIG))
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    model.meta = meta
    return model.eval()
