"""Model export folders and training state.

Model folder (what `tessera.load` reads; needs nothing else):
    config.json        the model's config dataclass
    model.safetensors  weights
    meta.json          ModelMeta: {"kind", "tessera_version", "sha256" of model.safetensors, "created", ...}
A pipeline folder (`tessera.pipelines.folder`) holds model_index.json and one model folder per component.

Training state (`state.pt`): model(s), EMA, optimizers, schedulers, step, RNG. Written atomically
(temp file + fsync + rename) and read with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tessera.errors import ModelNotFoundError, TesseraError, WrongModelError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"


class CheckpointError(TesseraError, RuntimeError):
    """A model folder or training state is missing, corrupt or does not match."""


@dataclasses.dataclass
class ModelMeta:
    """What a model folder says about its weights (meta.json); `model.meta` after loading."""

    kind: str
    sha256: str | None = None
    tessera_version: str | None = None
    stored_dtype: str | None = None
    created: str | None = None
    trained_steps: int | None = None
    preset: str | None = None
    train: dict | None = None        # the trainer config it was trained with
    task: dict | None = None         # the training task's config (caches, text encoder, process)
    source: str | None = None        # where imported weights came from
    extra: dict = dataclasses.field(default_factory=dict)  # any other recorded field (reports, ...)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelMeta":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={**data.get("extra", {}), **{k: v for k, v in data.items()
                                                               if k not in names and k != "extra"}})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file next to `path` (same filesystem, so os.replace is atomic), created with the
    umask's normal mode (mkstemp's 0600 would make shards and reports unreadable to the group)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: cannot create a temporary file")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
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
    fd, tmp = temp_beside(path)
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


def export_model(model: nn.Module, out_dir: str | Path, extra_meta: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors + meta.json; the kind comes from the model's registered family.

    `dtype` (e.g. torch.float16) stores floating-point weights smaller; loading casts them back to the
    model's own dtype."""
    from safetensors.torch import save_file

    import tessera
    from tessera.registry import family_of

    kind = family_of(model).kind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in state.items()}
    fd, tmp = temp_beside(out / WEIGHTS)
    os.close(fd)
    save_file(state, tmp, metadata={"kind": kind})
    os.replace(tmp, out / WEIGHTS)
    atomic_write_bytes(out / CONFIG, (model.config.to_json() + "\n").encode())
    meta = ModelMeta.from_dict({
        "kind": kind,
        "tessera_version": tessera.__version__,
        "sha256": sha256_file(out / WEIGHTS),
        "stored_dtype": str(dtype or next(iter(state.values())).dtype).removeprefix("torch."),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra_meta or {}),
    })
    atomic_write_bytes(out / META, (json.dumps(meta.to_dict(), indent=2) + "\n").encode())
    model.meta = meta
    return out


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A .safetensors file read tensor by tensor into this process's own memory (floating-point tensors cast
    to `dtype` one at a time), not memory-mapped: a mapped file stays resident while any of its tensors is
    alive, so a real-size network loaded that way and then repacked or cast would hold the file twice.
    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then the bytes; anything inconsistent is a CheckpointError naming the file."""
    import struct

    path = Path(path)
    with open(path, "rb") as f:
        size = path.stat().st_size
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
            entries = sorted(((k, v["dtype"], [int(d) for d in v["shape"]], [int(o) for o in v["data_offsets"]])
                              for k, v in header.items() if k != "__metadata__"), key=lambda e: e[3][0])
        except (struct.error, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
        start, out = 8 + n, {}
        for name, dtype_name, shape, offsets in entries:
            kind = SAFETENSORS_DTYPES.get(dtype_name)
            begin, end = (offsets + [-1, -1])[:2]
            count = math.prod(shape)
            if kind is None or not 0 <= begin <= end <= size - start or end - begin != count * kind.itemsize:
                raise CheckpointError(f"{path}: tensor {name!r} has a bad entry ({dtype_name}, {shape}, {offsets})")
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise CheckpointError(f"{path}: truncated at tensor {name!r}")
            t = buf.view(kind).reshape(shape)
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def read_pickled_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a released PyTorch pickle (a Lightning .ckpt's `state_dict`, LlamaGen's `model` /
    `module`): tensors only (`weights_only=True`), unless the user trusts the file (`trust_pickle`: a pickle
    can run code). Tessera itself writes safetensors only (`tessera convert` reads such a file once)."""
    import pickle

    path = Path(path)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise WrongModelError(f"{path}: holds more than tensors, which Tessera does not unpickle by default "
                              f"({str(e).splitlines()[0]}); if you trust the file, pass --trust-pickle") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    state = next((ckpt[k] for k in ("state_dict", "model", "module") if isinstance(ckpt, dict) and k in ckpt), ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WrongModelError(f"{path}: no state dict of tensors (under state_dict / model / module)")
    return state


def is_model_folder(path: str | Path) -> bool:
    return all((Path(path) / name).is_file() for name in (CONFIG, WEIGHTS, META))


def read_meta(folder: str | Path) -> ModelMeta:
    try:
        return ModelMeta.from_dict(json.loads((Path(folder) / META).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{Path(folder) / META}: not a readable model record ({e})") from None


def _weight_only_layers(model: nn.Module, record: dict, folder: Path) -> None:
    from tessera.nn.quant import quantize_int8

    layers = set(record.get("layers") or [])
    found = quantize_int8(model, keep=lambda name: name in layers)
    if found != len(layers):
        raise WrongModelError(f"{folder / META}: its quantization names {len(layers)} linear layers; the network "
                              f"has {found} of them")


def _build(fam, cfg) -> nn.Module:
    """The network without memory (on the meta device, its tensors then assigned from the checkpoint), unless
    its construction computes buffers that are not stored (DiT's positional table): then for real."""
    model = on_meta(lambda: fam.model(cfg))
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        model = fam.model(cfg)
    return model


def on_meta(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A network built without memory (`make()` on the meta device): `load_strict` then assigns the checkpoint's
    tensors, so an 866 M U-Net never exists twice (nor once in float32 when the compute dtype is bf16)."""
    with torch.device("meta"):
        return make()


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path,
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """load_state_dict(strict=True), with every missing / unexpected key and shape mismatch named; the
    tensors are assigned (cast to `dtype`, default: float32)."""
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(ours[k].shape)}" for k in set(ours) & set(state)
              if state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise WrongModelError(f"{where}: the weights do not fit ({len(missing)} missing, e.g. {missing[:3]}; "
                              f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; shapes {shapes[:3]})")
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(dtype if v.is_floating_point() else v.dtype) for k, v in state.items()},
                          strict=True, assign=True)
    return model


def load_model(path: str | Path, verify: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model from an export folder: class from meta.kind, config from config.json, strict weights,
    floating-point tensors in `dtype` (one copy: nothing is built in float32 first)."""
    from tessera.registry import family

    folder = Path(path)
    for name in (CONFIG, WEIGHTS, META):
        if not (folder / name).is_file():
            raise ModelNotFoundError(f"{folder} is not a Tessera model folder: {name} is missing")
    meta = read_meta(folder)
    if verify and sha256_file(folder / WEIGHTS) != meta.sha256:
        raise CheckpointError(f"{folder / WEIGHTS}: sha256 does not match meta.json (corrupt or replaced)")
    fam = family(meta.kind)
    model = _build(fam, fam.config.load(folder / CONFIG))
    if meta.extra.get("quantization"):  # `tessera optimize MODEL --int8`: its int8 layers before the strict load
        _weight_only_layers(model, meta.extra["quantization"], folder)
    state = read_safetensors(folder / WEIGHTS, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.meta = meta
    return model.eval()
