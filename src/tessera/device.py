"""Where models run and in which precision: the one place that decides it.

    --device cpu | cuda | cuda:N | auto     auto: CUDA when present, else the CPU
    --dtype  float32 | bfloat16 | float16 | auto
             auto: bfloat16 on CUDA; on a CPU, bfloat16 only where it has native bf16 (AVX-512 BF16 or
             AMX: emulated bf16 is ~12x slower than float32), float32 otherwise

Weights stay float32 on the device; the dtype is the autocast compute dtype of every forward pass. The
exception is a real-size checkpoint (Stable Diffusion: pipelines/stable_diffusion.py), whose weights are
read straight into the compute dtype: an 866 M U-Net in float32 would double the memory and re-cast every
weight at every step.
Random draws stay on a CPU `torch.Generator` (same seed, same image on any device)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch

from tessera.errors import DeviceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


@functools.cache
def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 dot products natively (avx512_bf16 or amx_bf16 in its flags)."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_vnni() -> bool:
    """True when the CPU has u8 x s8 dot products that do not saturate (AVX-512 VNNI, AVX-VNNI or AMX)."""
    flags = _cpu_flags()
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def tune_cpu_allocator(threshold: int = 1 << 30) -> bool:
    """Process-wide, for an application to call at its start (the `tessera` command does; importing or
    loading never does): glibc's malloc serves every block above its mmap threshold (adaptive, at most
    32 MiB) with a fresh mmap, which the kernel zero-fills page by page at first touch and unmaps at free.
    A 512² SD call allocates and frees dozens of 16-64 MiB activations (TAESD's 64-channel maps), so it
    spends much of its decode in page faults. mallopt(M_MMAP_THRESHOLD, 1 GiB) keeps freed blocks in the
    heap for the next tensor, and the trim / top-pad settings keep up to 1 GiB of freed heap mapped (what
    PyTorch's CPU tuning guide gets from jemalloc / tcmalloc); measured in
    benchmarks/RESULTS.md. TESSERA_CPU_ALLOCATOR=system leaves malloc as it is. -> whether it applied
    (False off glibc)."""
    import ctypes
    import os

    if os.environ.get("TESSERA_CPU_ALLOCATOR", "").strip().lower() == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    # big blocks from the heap; up to `threshold` of freed heap top kept (not trimmed), grown in 64 MiB steps
    return all([libc.mallopt(m_mmap_threshold, threshold), libc.mallopt(m_trim_threshold, threshold),
                libc.mallopt(m_top_pad, 64 << 20)])


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """'auto' / None -> CUDA when present, else CPU; an absent device is a DeviceError naming it."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"--device {spec}: not a device; use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"--device {spec}: Tessera runs on {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec}: this machine has no CUDA device (torch {torch.__version__}, "
                          f"{'CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' / None -> bfloat16 on CUDA, bfloat16 on a CPU with native bf16, float32 elsewhere."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DeviceError(f"--dtype {spec}: use one of {sorted(DTYPES)} or auto")
        return spec
    spec = (spec or "auto").strip().lower().removeprefix("torch.")
    if spec == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"--dtype {spec}: use one of {sorted(DTYPES)} or auto")
    return DTYPES[spec]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A resolved (device, compute dtype) pair."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to(self, obj: Any) -> Any:
        return move(obj, self.device)

    @property
    def name(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"

    def to_dict(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


def placement(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Placement:
    d = resolve_device(device)
    return Placement(d, resolve_dtype(dtype, d))


def cpu_placement(dtype: str | torch.dtype | None = "auto") -> Placement:
    return placement("cpu", dtype)


def move(obj: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists, tuples and dataclass-free containers) -> `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(move(v, device) for v in obj)
    return obj


def dist_backend(device: torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA tensors, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
