"""Int8 weight-only linear layers for memory-bound inference (an autoregressive decode step reads every weight
once per token: LlamaGen-B with CFG streams 195 MB of bf16 weights per token).

    w_q = round(w / s), s = max|w_row| / 127     (symmetric, one scale per output channel)
    y = (x @ w_q^T) * s                          (torch._weight_int8pack_mm: the int8 weight is widened in
                                                  registers, so half the bytes of bf16 leave memory)

Lossy (about 0.4% of a row's largest weight per element); `quantize_int8(model)` swaps every nn.Linear
(optionally only those `keep` does not exclude) and returns how many. The CPU kernel takes bf16 inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8(model: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> int:
    """Replace each nn.Linear of `model` whose qualified name `keep` accepts by an Int8Linear; -> how many."""
    if not available():
        raise RuntimeError("this torch build has no int8 weight-only matmul (torch._weight_int8pack_mm)")
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and keep(full):
                setattr(module, child_name, Int8Linear(child))
                n += 1
    return n
