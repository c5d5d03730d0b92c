"""oneDNN-prepacked weights for CPU inference: lossless speed for real-size networks in bf16.

Eager PyTorch hands a convolution's or linear layer's weight to oneDNN in the plain layout on every call,
and oneDNN reorders it into its blocked layout each time; on this CPU class that reorder is a large part of
a small-map convolution (SD's 1280-channel 8x8 / 16x16 levels: 3x / 1.9x faster prepacked, measured in
benchmarks/RESULTS.md). `pack(model)` reorders every Conv2d / Linear weight once (the same kernels as
inductor's freezing uses, `torch.ops.mkldnn._convolution_pointwise` / `_linear_pointwise`), so each call
runs the kernel alone; the outputs are those of the plain layers (the same oneDNN primitives).

The packed weight REPLACES the plain one (no second copy of an 866 M network): while packed, a layer's
`weight` parameter is empty, so anything that reads or writes weights (state_dict, LoRA merging, saving,
`.to(dtype)`) calls `unpack(model)` first, which restores them exactly (a reorder is a permutation).
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

PACKED = "_onednn_weight"  # the attribute that holds a layer's packed weight


def available() -> bool:
    """oneDNN's bf16 kernels on this CPU (they need AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU has
    none, and its emulated bf16 is slow anyway: device.py runs float32 there)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_convolution_pointwise")
            and hasattr(mkldnn, "_is_mkldnn_bf16_supported") and bool(mkldnn._is_mkldnn_bf16_supported()))


def _conv_forward(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    w = getattr(m, PACKED)
    return torch.ops.mkldnn._convolution_pointwise(x.to(w.dtype), w, m.bias, list(m.padding), list(m.stride),
                                                   list(m.dilation), m.groups, "none", [], "")


def _linear_forward(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = getattr(m, PACKED)
    return torch.ops.mkldnn._linear_pointwise(x.to(w.dtype), w, m.bias, "none", [], "")


def _packable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dtype != torch.bfloat16 or hasattr(m, PACKED):
        return False
    if type(m) is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return type(m) is nn.Linear


def pack(model: nn.Module, size_hint: tuple[int, int] = (64, 64), tokens_hint: int = 4096) -> int:
    """Prepack the bf16 CPU Conv2d / Linear layers of `model` (others are left as they are); -> how many.
    The hints are the input size oneDNN picks its layout for (any input still works)."""
    if not available():
        return 0
    ops, n = torch.ops.mkldnn, 0
    for m in model.modules():
        if not _packable(m):
            continue
        w = m.weight.detach()
        if isinstance(m, nn.Conv2d):
            packed = ops._reorder_convolution_weight(w, list(m.padding), list(m.stride), list(m.dilation), m.groups,
                                                     [1, m.in_channels, *size_hint])
            m.forward = types.MethodType(_conv_forward, m)
        else:
            packed = ops._reorder_linear_weight(w, tokens_hint)
            m.forward = types.MethodType(_linear_forward, m)
        setattr(m, PACKED, packed)
        m.weight.data = torch.empty(0, dtype=w.dtype)  # the packed tensor is now the only copy
        n += 1
    if n:
        _own(model)
    return n


def _own(model: nn.Module) -> None:
    """Private copies of the tensors left plain (biases, norms, embeddings): a model loaded by memory-mapping
    its file (transformers does) keeps the whole file resident while any one tensor still maps it."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.numel():
            t.data = t.data.clone()


def unpack(model: nn.Module) -> int:
    """Restore the plain weights (exactly) and the layers' own forward; -> how many were packed."""
    n = 0
    for m in model.modules():
        packed = getattr(m, PACKED, None)
        if packed is None:
            continue
        dense = packed.to_dense()
        if isinstance(m, nn.Conv2d):
            dense = dense.contiguous(memory_format=torch.channels_last)
        m.weight.data = dense
        delattr(m, PACKED)
        del m.forward  # the class's forward again
        n += 1
    return n


def is_packed(model: nn.Module) -> bool:
    return any(hasattr(m, PACKED) for m in model.modules())


class Prepacked:
    """A pipeline mixin: its `networks` prepacked on a CPU in bf16 while `prepack` is on, and `unpacked()`,
    the context in which their plain weights are back (to read, change, move or save them)."""

    prepack: bool = True

    @property
    def networks(self) -> list[nn.Module]:
        raise NotImplementedError

    @contextlib.contextmanager
    def unpacked(self):
        for m in self.networks:
            unpack(m)
        try:
            yield self
        finally:
            if self.prepack and self.placement.device.type == "cpu":
                for m in self.networks:
                    pack(m)
