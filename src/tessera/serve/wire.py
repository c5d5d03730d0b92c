"""What crosses the wire between the gateway and the stage services: tensors and images as safetensors
bytes (never pickle), with a JSON metadata entry. Images travel as uint8 [n,H,W,3]."""
from __future__ import annotations

import json
import struct

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load, save


def pack(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"json": json.dumps(meta or {})})


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors, metadata); a malformed body is a ValueError naming what is wrong."""
    if len(data) < 8:
        raise ValueError("body: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
        meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
        return load(data), meta
    except Exception as e:
        raise ValueError(f"body: not a valid safetensors file ({e})") from e


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    if not images:
        return torch.zeros((0, 1, 1, 3), dtype=torch.uint8)
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [n,H,W,3], got {x.dtype} {list(x.shape)}")
    return [Image.fromarray(a) for a in x.numpy()]
