"""Read ncnn models (`.param` text graph + `.bin` weights) with numpy, and copy their weights onto our
PyTorch modules. No ncnn runtime and no Vulkan are needed: only the two files.

`.param`: a magic line (7767517), "layer_count blob_count", then one line per layer:
    Type Name n_in n_out in_blobs... out_blobs... key=value...
where a key <= -23300 holds an array "-(23300+id)=count,v1,v2,...".
`.bin`: each layer's weights in layer order. A weight blob read with type 0 ("auto") starts with a
4-byte tag: 0x01306B47 = float16 (padded to 4 bytes), 0 = float32, 0x0002C056 = float32; type-1 blobs
(biases, PReLU slopes) are raw float32 without a tag (ncnn `ModelBinFromDataReader::load`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAGIC = 7767517
TAG_FP16, TAG_FP32_SCALED = 0x01306B47, 0x0002C056
NO_WEIGHTS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU", "Sigmoid",
              "Clip", "Crop", "Noop"}


class NcnnError(ValueError):
    """An ncnn file that this reader cannot read or that does not fit the target network."""


@dataclasses.dataclass
class NcnnLayer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object]
    weights: list[np.ndarray] = dataclasses.field(default_factory=list)


def _value(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _params(items: list[str], where: str) -> dict[int, object]:
    params: dict[int, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise NcnnError(f"{where}: expected key=value, got {item!r}")
        k = int(key)
        if k <= -23300:  # array: count, then the values
            vals = [_value(v) for v in value.split(",")]
            params[-k - 23300] = vals[1:1 + int(vals[0])]
        else:
            params[k] = _value(value)
    return params


def read_param(path: str | Path) -> list[NcnnLayer]:
    path = Path(path)
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != [str(MAGIC)]:
        raise NcnnError(f"{path}: not an ncnn .param file (first line must be {MAGIC})")
    n_layers = int(lines[1][0])
    layers = []
    for i, parts in enumerate(lines[2:], start=3):
        typ, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
        blobs = parts[4:4 + n_in + n_out]
        layers.append(NcnnLayer(typ, name, blobs[:n_in], blobs[n_in:], _params(parts[4 + n_in + n_out:], f"{path}:{i}")))
    if len(layers) != n_layers:
        raise NcnnError(f"{path}: header says {n_layers} layers, found {len(layers)}")
    return layers


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NcnnError(f"{self.path}: truncated at byte {self.pos} (wanted {n} more)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").copy()

    def auto(self, count: int) -> np.ndarray:
        tag = int.from_bytes(self.take(4), "little")
        if tag == TAG_FP16:
            raw = self.take((2 * count + 3) // 4 * 4)  # padded to 4 bytes
            return np.frombuffer(raw[:2 * count], dtype="<f2").astype(np.float32)
        if tag in (0, TAG_FP32_SCALED):
            return self.raw_fp32(count)
        raise NcnnError(f"{self.path}: weight tag {tag:#010x} at byte {self.pos - 4} (int8 / quantized "
                        f"weights are not supported)")


def read_model(param: str | Path, bin_path: str | Path) -> list[NcnnLayer]:
    """Layers of the graph with their weights (float32 numpy arrays) attached, in file order."""
    layers, bin_path = read_param(param), Path(bin_path)
    r = _Reader(bin_path.read_bytes(), bin_path)
    for layer in layers:
        p = layer.params
        if layer.type == "Convolution":
            if p.get(8, 0):
                raise NcnnError(f"{layer.name}: int8 convolution is not supported")
            layer.weights.append(r.auto(int(p[6])))
            if p.get(5, 0):
                layer.weights.append(r.raw_fp32(int(p[0])))
        elif layer.type == "PReLU":
            layer.weights.append(r.raw_fp32(int(p.get(0, 1))))
        elif layer.type not in NO_WEIGHTS:
            raise NcnnError(f"{layer.name}: ncnn layer type {layer.type!r} is not supported by this reader")
    if r.pos != len(r.data):
        raise NcnnError(f"{bin_path}: {len(r.data) - r.pos} bytes left after the last layer (wrong .param?)")
    return layers


def load_into(model: nn.Module, layers: list[NcnnLayer]) -> nn.Module:
    """Copy Convolution and PReLU weights, in graph order, onto the model's Conv2d / PReLU modules in
    definition order; every count and shape must match exactly."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    src_convs = [ly for ly in layers if ly.type == "Convolution"]
    src_prelus = [ly for ly in layers if ly.type == "PReLU"]
    if len(convs) != len(src_convs) or len(prelus) != len(src_prelus):
        raise NcnnError(f"the ncnn graph has {len(src_convs)} convolutions and {len(src_prelus)} PReLUs; "
                        f"{type(model).__name__} has {len(convs)} and {len(prelus)}")
    with torch.no_grad():
        for conv, ly in zip(convs, src_convs):
            k = ly.params.get(1, 1)
            if ly.params[0] != conv.out_channels or k != conv.kernel_size[0] or ly.params[6] != conv.weight.numel():
                raise NcnnError(f"{ly.name}: {ly.params[0]} outputs, kernel {k}, {ly.params[6]} weights do not fit "
                                f"{conv} ({conv.weight.numel()} weights)")
            if (conv.bias is not None) != bool(ly.params.get(5, 0)):
                raise NcnnError(f"{ly.name}: bias_term={ly.params.get(5, 0)} does not fit {conv}")
            conv.weight.copy_(torch.from_numpy(ly.weights[0]).view_as(conv.weight))  # (out, in, kh, kw) both
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(ly.weights[1]))
        for prelu, ly in zip(prelus, src_prelus):
            if ly.weights[0].size != prelu.weight.numel():
                raise NcnnError(f"{ly.name}: {ly.weights[0].size} slopes do not fit {prelu}")
            prelu.weight.copy_(torch.from_numpy(ly.weights[0]))
    return model
