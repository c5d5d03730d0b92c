"""Int8 inference layers: weight-only linear layers (below) and static int8 convolutions / linear layers
(further down, with their calibration).

Weight-only int8 linear layers for memory-bound inference (an autoregressive decode step reads every weight
once per token: LlamaGen-B with CFG streams 195 MB of bf16 weights per token).

    w_q = round(w / s), s = max|w_row| / 127     (symmetric, one scale per output channel)
    y = (x @ w_q^T) * s                          (torch._weight_int8pack_mm: the int8 weight is widened in
                                                  registers, so half the bytes of bf16 leave memory)

Lossy (about 0.4% of a row's largest weight per element); `quantize_int8(model)` swaps every nn.Linear
(optionally only those `keep` does not exclude) and returns how many. The CPU kernel takes bf16 inputs.
"""
from __future__ import annotations

import warnings
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
        scale = self.scale.to(torch.bfloat16)  # a no-op unless a load / .to() made the buffers float32
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8, scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
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


# ---- static int8 (PT2E-style "int8-mixed-float"): convolutions and linear layers -------------------------
# Static int8 for compute-bound layers (the U-Net's convolutions and projections), the scheme of PyTorch's
# PT2E X86InductorQuantizer run on oneDNN's int8 kernels (the ones inductor lowers to) without a compile:
#
#     x_q = clamp(round(x / s_x) + z_x, 0, q_max)  (u8, ONE scale per tensor, from calibration: the input
#                                                    range [lo, hi] seen on held-out prompts)
#     w_q = round(w / s_w)                         (s8, symmetric, one scale per output channel)
#     y   = s_x s_w (x_q - z_x) * w_q + b          (onednn.qconv_pointwise / qlinear_pointwise; s32 accumulate,
#                                                    output in the input's float dtype)
#
# q_max = 255 where the CPU has VNNI (u8 x s8 dot products); 127 elsewhere: AVX2's vpmaddubsw adds pairs of
# u8 x s8 products in int16 and saturates with 8-bit activations (measured: 10% error vs 0% at 7 bits), so
# the same stored range is re-gridded to 7 bits on such a CPU. The stored state is int8 weights, their
# scales, the bias and the calibrated range; the oneDNN-packed weight is built at the first call.
def cpu_quant_max() -> int:
    from tessera.device import cpu_has_vnni

    return 255 if cpu_has_vnni() else 127


def static_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv_pointwise")


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """Per-tensor affine u8 codes of x (computed in float32: bf16 cannot hold x / s to a unit) by ATen's fused
    quantize kernel (one vectorized pass), its quint8 storage then taken as a plain uint8 tensor of the same
    shape and strides (`.view(torch.uint8)` would stay a QuantizedCPU tensor); 7-bit codes (qmax 127, AVX2)
    are then clamped in place (a pass over the u8 bytes). Measured 4.1x faster than an elementwise chain
    (float copy, mul, add, clamp, cast) on a 1x320x64x64 bf16 activation with VNNI, 9x on a 1x256x256x256
    float32 one on AVX2 (alternating rounds)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the kernel is not
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8)
    codes = torch.empty(0, dtype=torch.uint8, device=x.device).set_(q.untyped_storage(), q.storage_offset(), q.shape,
                                                                    q.stride())
    return codes if qmax == 255 else codes.clamp_(max=qmax)


def _qparams(lo: float, hi: float, qmax: int) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact (padding, ReLU zeros)
    scale = max(hi - lo, 1e-8) / qmax
    return scale, int(min(max(round(-lo / scale), 0), qmax))


class _StaticInt8(nn.Module):
    """Shared state of the static int8 layers: int8 weight, per-channel scale, bias, calibrated input range."""

    def _init_state(self, weight_shape: tuple[int, ...], bias: bool) -> None:
        self.register_buffer("weight_int8", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight_shape[0]))
        self.register_buffer("bias", torch.zeros(weight_shape[0]) if bias else None)
        self.register_buffer("input_range", torch.tensor([-1.0, 1.0]))
        self._packed = None

    def set_from(self, layer: nn.Module, lo: float, hi: float) -> "_StaticInt8":
        w = layer.weight.detach().float()
        scale = w.flatten(1).abs().amax(1).clamp(min=1e-12) / 127  # (out,)
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.weight_int8 = (w / scale.view(shape)).round().clamp(-127, 127).to(torch.int8)
        self.weight_scale = scale
        self.bias = None if layer.bias is None else layer.bias.detach().float()
        self.input_range = torch.tensor([lo, hi])
        self._packed = None
        return self

    def _pack(self, x: torch.Tensor):
        if x.device.type != "cpu":
            from tessera.errors import InvalidInputError

            raise InvalidInputError(f"a static int8 layer runs on the CPU (oneDNN's int8 kernels), not {x.device}; "
                                    f"load the float model for {x.device.type}")
        if not x.is_floating_point() and self._packed is not None:  # u8 codes (`quantize` ran): packed already
            return self._packed[1:]
        key = (x.dtype if x.is_floating_point() else self.weight_scale.dtype, x.device)  # u8 input: the float dtype
        if self._packed is None or self._packed[0] != key:
            lo, hi = (float(v) for v in self.input_range.float())
            qmax = cpu_quant_max()
            scale, zp = _qparams(lo, hi, qmax)
            w_scale = self.weight_scale.float()
            bias = None if self.bias is None else self.bias.to(key[0])
            self._packed = (key, scale, zp, qmax, self._prepack(w_scale, scale, zp, x), w_scale,
                            torch.zeros(len(w_scale), dtype=torch.int64), bias)
        return self._packed[1:]

    def _apply(self, fn, recurse=True):  # .to() / .float(): the packed weight is rebuilt at the next call
        self._packed = None
        return super()._apply(fn, recurse)


class StaticInt8Conv2d(_StaticInt8):
    """A static int8 convolution; `fuse` chains it to its neighbours the way inductor's int8 fusions do: a
    ReLU after it and a residual sum into it run as oneDNN post-ops, and its output can stay u8 on the grid
    of the layer that reads it (no float tensor, no quantize pass, a quarter of fp32's bytes in memory)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups, self.in_channels, self.out_channels = conv.groups, conv.in_channels, conv.out_channels
        self._init_state(tuple(conv.weight.shape), conv.bias is not None)
        self.unary = "none"
        self.register_buffer("output_range", None)  # set: u8 output on this range's grid, else float output
        self.register_buffer("accum_range", None)   # set: forward(x, accum) adds u8 `accum` on this grid

    def fuse(self, relu: bool = False, output_range: tuple[float, float] | None = None,
             accum_range: tuple[float, float] | None = None) -> "StaticInt8Conv2d":
        """y = [ReLU](conv(x) [+ accum]), [u8 on output_range's grid]; the ranges are those the consumer's /
        the accumulated tensor's calibration saw (placeholders when the structure is built before a load)."""
        self.unary = "relu" if relu else "none"
        self.output_range = None if output_range is None else torch.tensor(output_range, dtype=torch.float32)
        self.accum_range = None if accum_range is None else torch.tensor(accum_range, dtype=torch.float32)
        return self

    def _prepack(self, w_scale, scale, zp, x):
        return torch.ops.onednn.qconv_prepack(self.weight_int8.contiguous(), w_scale, scale, zp, self.stride, self.padding,
                                              self.dilation, self.groups, list(x.shape))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x as u8 codes on this layer's input grid (a u8 x is taken to be on it already)."""
        if x.dtype == torch.uint8:
            return x
        scale, zp, qmax = self._pack(x)[:3]
        return quantize_u8(x.contiguous(memory_format=torch.channels_last), scale, zp, qmax)  # oneDNN's layout

    def _grid(self, r: torch.Tensor | None) -> tuple[float, int]:
        return (1.0, 0) if r is None else _qparams(*(float(v) for v in r.float()), cpu_quant_max())

    def forward(self, x: torch.Tensor, accum: torch.Tensor | None = None) -> torch.Tensor:
        """x float or u8 (on this layer's input grid); `accum` (u8 on accum_range's grid, overwritten with
        the result) only for a layer fused with a sum."""
        scale, zp, qmax, w, w_scale, w_zp, bias = self._pack(x)
        qx = self.quantize(x)
        out_scale, out_zp = self._grid(self.output_range)
        out_dtype = None if self.output_range is not None else self._packed[0][0]  # None: u8 (oneDNN's rule)
        args = (self.stride, self.padding, self.dilation, self.groups, out_scale, out_zp, out_dtype)
        if (accum is None) != (self.accum_range is None):
            raise ValueError("a static int8 conv fused with a sum takes its accumulated input (and only it does)")
        if accum is None:
            return torch.ops.onednn.qconv_pointwise(qx, scale, zp, w, w_scale, w_zp, bias, *args, self.unary, [], "")
        acc_scale, acc_zp = self._grid(self.accum_range)
        return torch.ops.onednn.qconv2d_pointwise.binary(qx, scale, zp, w, w_scale, w_zp, accum, bias, *args, acc_scale,
                                                         acc_zp, "sum", 1.0, self.unary, [], "")

    def extra_repr(self) -> str:
        fused = "".join(f", {k}" for k, on in (("+sum", self.accum_range is not None), ("relu", self.unary == "relu"),
                                                ("u8 out", self.output_range is not None)) if on)
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, "
                f"static int8{fused}")


class StaticInt8Linear(_StaticInt8):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_state(tuple(linear.weight.shape), linear.bias is not None)

    def _prepack(self, w_scale, scale, zp, x):
        return torch.ops.onednn.qlinear_prepack(self.weight_int8.contiguous(), [x.numel() // self.in_features, self.in_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp, qmax, w, w_scale, w_zp, bias = self._pack(x)
        return torch.ops.onednn.qlinear_pointwise(quantize_u8(x, scale, zp, qmax), scale, zp, w, w_scale, w_zp, bias,
                                                  1.0, 0, x.dtype, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, static int8"


def upsample_nearest(x: torch.Tensor, conv: nn.Module, **size) -> torch.Tensor:
    """`F.interpolate(x, mode="nearest", **size)` as the input of `conv`: when conv is a static int8 one, x is
    quantized first and its u8 codes are upsampled (nearest moves codes unchanged), so the quantize pass reads a
    quarter of the elements it would after the upsample (the int8 layer's time in `time_in_network` then leaves
    that smaller pass out)."""
    quantize = getattr(conv, "quantize", None)
    return torch.nn.functional.interpolate(x if quantize is None else quantize(x), mode="nearest", **size)


def _static_target(m: nn.Module) -> bool:
    if type(m) is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.groups == 1
    return type(m) is nn.Linear


def observe_inputs(model: nn.Module, run: Callable[[], None]) -> dict[str, dict]:
    """Run `run()` (the calibration: the model on held-out inputs) with every Conv2d / Linear input watched:
    -> name -> {"lo", "hi": the range seen, "rows": the fewest GEMM rows (tokens / pixels) in one call,
    "shape": the first input's shape}."""
    seen: dict[str, dict] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            rows = x.numel() // (x.shape[1] if x.dim() == 4 else x.shape[-1])
            s = seen.setdefault(name, {"lo": float("inf"), "hi": float("-inf"), "rows": rows, "shape": list(x.shape)})
            s["lo"], s["hi"] = min(s["lo"], float(x.min())), max(s["hi"], float(x.max()))
            s["rows"] = min(s["rows"], rows)
        return record

    _run_hooked([m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if _static_target(m)], run)
    return seen


def _run_hooked(handles: list, run: Callable[[], None]) -> None:
    """run() without gradients, then the hooks removed (also when it fails)."""
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


MIN_GAIN = 1.05  # measured selection: int8 (its quantize included) must beat the float layer by 5%
MAX_ERROR = 0.1  # a layer whose int8 output is further than 10% (relative L2) from the float one stays float


def keep_reason(name: str, module: nn.Module, stats: dict | None, min_rows: int = 16, min_k: int = 64,
                timing: tuple[float, float] | None = None) -> str | None:
    """Why a layer stays in float (None: it is quantized). `stats["error"]` (`measure_errors`): its int8
    output's distance from the float one, at most MAX_ERROR. `timing`: (float, int8) seconds of the layer's call
    in the network on this CPU (`time_in_network`); int8 must be MIN_GAIN times faster."""
    if stats is None:
        return "not reached during calibration"
    k = module.in_channels * module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) \
        else module.in_features
    if k < min_k:
        return f"reduction of {k} < {min_k}: too few input channels for int8 to pay (and the most sensitive layer)"
    if stats["rows"] < min_rows:
        return f"{stats['rows']} rows per call (< {min_rows}): memory-bound, int8 activations only add work"
    if stats.get("error", 0.0) > MAX_ERROR:
        return (f"int8 output {stats['error']:.1%} from the float layer's on the calibration prompt (relative L2, "
                f"> {MAX_ERROR:.0%}): its input range {stats['lo']:.4g} .. {stats['hi']:.4g} is too wide for one "
                f"u8 scale")
    if timing is not None and timing[1] * MIN_GAIN > timing[0]:
        return (f"measured in the network at {tuple(stats['shape'])}: int8 {timing[1] * 1e3:.2f} ms (with its "
                f"quantize) vs float {timing[0] * 1e3:.2f} ms, not {MIN_GAIN}x faster")
    return None


def _int8_twin(m: nn.Module, s: dict) -> _StaticInt8:
    cls = StaticInt8Conv2d if isinstance(m, nn.Conv2d) else StaticInt8Linear
    return cls(m).set_from(m, s["lo"], s["hi"])


def _candidates(model: nn.Module, stats: dict[str, dict]) -> dict[str, nn.Module]:
    """The Conv2d / Linear layers `keep_reason` would quantize (given what `stats` holds so far)."""
    return {n: m for n, m in model.named_modules() if _static_target(m) and keep_reason(n, m, stats.get(n)) is None}


def measure_errors(model: nn.Module, stats: dict[str, dict], run: Callable[[], None]) -> dict[str, float]:
    """Run `run()` (the float network on a calibration prompt) with each candidate layer's int8 twin computed
    on the same input beside it: `stats[name]["error"]` = the largest relative L2 distance of the twin's output
    from the layer's over the calls, which `keep_reason` holds to MAX_ERROR (a layer whose input has rare
    large values, such as an unnormalized residual stream, loses its small values to one u8 scale) -> the
    errors."""
    layers = _candidates(model, stats)
    twins = {n: _int8_twin(m, stats[n]) for n, m in layers.items()}
    errors = dict.fromkeys(layers, 0.0)

    def hook(name):
        def check(module, args, out):
            got, want = twins[name](args[0]).float(), out.float()
            errors[name] = max(errors[name], float((got - want).norm() / want.norm().clamp(min=1e-12)))
        return check

    _run_hooked([m.register_forward_hook(hook(n)) for n, m in layers.items()], run)
    for n, e in errors.items():
        stats[n]["error"] = e
    return errors


def time_in_network(model: nn.Module, stats: dict[str, dict], run: Callable[[], None],
                    rounds: int = 4) -> dict[str, tuple[float, float]]:
    """Per Conv2d / Linear layer `keep_reason` would quantize: the median seconds of its calls inside `run()`
    (the pipeline at its serving shape) as the pipeline runs it (oneDNN-prepacked in bf16, nn/onednn.py) and
    as its static int8 twin (its quantize included), every candidate swapped at once, the two sides
    alternating over `rounds` runs after a warm-up of each -> name -> (float, int8). In the network, not in
    isolation: a layer's weights arrive cold from memory and its input from the op before, which decides
    more than the kernel does (timed alone, the choice was slower than quantizing every layer: RESULTS); which
    side wins depends on the shape and the CPU (AMX bf16 beats int8 + its quantize pass at many shapes)."""
    import statistics
    import time

    from tessera.nn import onednn

    named = dict(model.named_modules())
    names = list(_candidates(model, stats))
    sides = ({n: named[n] for n in names}, {n: _int8_twin(named[n], stats[n]) for n in names})
    seconds: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    started: dict[int, float] = {}
    handles = []
    for side, layers in enumerate(sides):
        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: started.__setitem__(id(mod), time.perf_counter())))
            handles.append(m.register_forward_hook(lambda mod, args, out, n=n, side=side: seconds[n][side].append(
                time.perf_counter() - started[id(mod)])))

    def swap(side: int) -> None:
        for n in names:
            parent, _, child = n.rpartition(".")
            setattr(named[parent] if parent else model, child, sides[side][n])

    onednn.pack(model)
    try:
        with torch.no_grad():
            for r in range(rounds + 1):
                for side in (0, 1):
                    swap(side)
                    run()
                    if r == 0:  # the warm-up (oneDNN builds its primitives, int8 packs its weights)
                        for n in names:
                            seconds[n][side].clear()
    finally:
        swap(0)
        onednn.unpack(model)
        for h in handles:
            h.remove()
    return {n: (statistics.median(f), statistics.median(q)) for n, (f, q) in seconds.items() if f and q}


def quantize_static(model: nn.Module, stats: dict[str, dict], layers: list[str] | None = None,
                    timing: dict[str, tuple[float, float]] | None = None) -> dict:
    """Swap the observed Conv2d / Linear layers for static int8 ones (those `keep_reason` does not keep, given
    the measured `timing` when there is one; or exactly `layers` when given, e.g. from a stored report)
    -> {"quantized": [names], "kept": {name: why}}."""
    quantized, kept = [], {}
    named = dict(model.named_modules())
    for name, m in list(named.items()):
        if not _static_target(m):
            continue
        why = None if layers is None else (None if name in layers else "kept as stored")
        if layers is None:
            why = keep_reason(name, m, stats.get(name), timing=(timing or {}).get(name))
        if why:
            kept[name] = why
            continue
        cls = StaticInt8Conv2d if isinstance(m, nn.Conv2d) else StaticInt8Linear
        q = cls(m)  # structure only (its state loaded next) unless calibrated here
        if name in stats and m.weight.device.type != "meta":
            q.set_from(m, stats[name]["lo"], stats[name]["hi"])
        parent, _, child = name.rpartition(".")
        setattr(named[parent] if parent else model, child, q)
        quantized.append(name)
    return {"quantized": quantized, "kept": kept}


QUANT_FILE = "quantization.json"  # beside a component's weights: which layers are static int8
CHAINED = "u8-chained"  # its "plan" when the network's `quantize_int8` made them (u8 from layer to layer)


def apply_stored(model: nn.Module, folder) -> dict | None:
    """Give a network built on meta the int8 layers its folder's quantization.json names, before the strict
    load of its weights; -> the record, or None for a float network (no such file)."""
    import json
    from pathlib import Path

    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("plan") == CHAINED:  # the network's own int8 plan (e.g. TAESD's u8-chained decoder)
        if not hasattr(model, "quantize_int8"):
            raise ValueError(f"{path}: a {CHAINED!r} int8 plan, and {type(model).__name__} has none")
        got = model.quantize_int8(None)
        if got["quantized"] != record["quantized"]:
            raise ValueError(f"{path}: its int8 layers are not the ones {type(model).__name__}'s plan makes")
        return record
    got = quantize_static(model, {}, layers=record["quantized"])
    missing = sorted(set(record["quantized"]) - set(got["quantized"]))
    if missing:
        raise ValueError(f"{path}: names layers the network does not have as Conv2d / Linear: {missing[:3]}")
    return record
