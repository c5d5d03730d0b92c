"""Weight-only int8 for Tessera's own generators (`tessera optimize MODEL --int8 -o OUT`, MODEL a Tessera model
folder or bundled name): every nn.Linear of the generator becomes an `nn/quant.Int8Linear` (int8 weights, one
scale per output channel, bf16 activations: `torch._weight_int8pack_mm`), which halves the weight bytes a
memory-bound step reads (an AR model's KV-cached decode: one token per step).

Whether that pays is measured, not assumed: the generation stage of the float and the int8 pipeline, warm,
alternating in this process. With `--int8-layers speed` (the default) OUT is written only when int8 is
MIN_GAIN faster; `all` writes it regardless. Either way the ratio is in the report and in OUT's meta.json
(`quantization`), which the loader reads to rebuild the int8 layers before its strict load; the PNG record
and the model card say the model is quantized. Its held-out quality is for the workflow's gate
(`tessera bench paradigms` + `benchmarks/bench_optimize.py gate`).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from tessera.errors import InvalidInputError

SCHEME = "int8 weight-only"


def _generation_seconds(pipes: dict, calls: int, prompt: str = "a red bicycle leaning against a brick wall") -> dict:
    """Median seconds of each pipeline's generation stage (text encoding + sampling), warm, alternating."""
    seconds: dict[str, list[float]] = {k: [] for k in pipes}
    for i in range(calls + 1):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.generate([prompt], pipe.params(seed=i, n=1))
            if i:  # round 0 is the warm-up
                seconds[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in seconds.items()}


def quantize_model(src: str, out: str | Path, select: str = "speed", calls: int = 3) -> dict:
    """MODEL -> OUT with weight-only int8 linear layers; -> the report."""
    from tessera.checkpoint import export_model
    from tessera.nn.quant import MIN_GAIN, available, quantize_int8
    from tessera.pipelines.folder import load_pipeline
    from tessera.registry import resolve

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"-o {out}: not empty (an optimized folder is never written over another)")
    if not available():
        raise InvalidInputError("this torch build has no int8 weight-only matmul (torch._weight_int8pack_mm)")
    folder = resolve(src)
    sides = {"float": load_pipeline(str(folder)), "int8": load_pipeline(str(folder))}
    meta = sides["float"].generator.meta
    if meta is not None and meta.extra.get("quantization"):
        raise InvalidInputError(f"{src}: already {meta.extra['quantization']['scheme']}")
    names = [n for n, m in sides["int8"].generator.named_modules() if type(m) is torch.nn.Linear]
    if not names or quantize_int8(sides["int8"].generator) != len(names):
        raise InvalidInputError(f"{src}: its generator has no linear layers to quantize")
    med = _generation_seconds(sides, calls)
    ratio = med["float"] / med["int8"]
    record = {"scheme": f"{SCHEME}: s8 weights, one scale per output channel, bf16 activations "
                        f"(torch._weight_int8pack_mm)", "layers": names, "source": str(src),
              "generation_seconds": {k: round(v, 4) for k, v in med.items()}, "speed_ratio": round(ratio, 3),
              "threads": torch.get_num_threads(), "dtype": str(sides["float"].placement.dtype)}
    if select == "speed" and ratio < MIN_GAIN:
        raise InvalidInputError(f"{src}: weight-only int8 measured {ratio:.2f}x its float generation stage here "
                                f"({med['float']:.3f} s vs {med['int8']:.3f} s): not faster, nothing written "
                                f"(--int8-layers all writes it anyway)")
    kept = {k: v for k, v in (meta.to_dict() if meta else {}).items()
            if k in ("preset", "task", "train", "trained_steps", "pruned")}
    stored = getattr(torch, meta.stored_dtype, None) if meta and meta.stored_dtype else None
    export_model(sides["int8"].generator, out, {**kept, "quantization": record},
                 dtype=stored if isinstance(stored, torch.dtype) and stored.is_floating_point else None)
    (out / "README.md").write_text(_card(record))
    return {"out": str(out), "layers": len(names), "speed_ratio": record["speed_ratio"],
            "generation_seconds": record["generation_seconds"]}


def _card(record: dict) -> str:
    return (f"# Optimized: {SCHEME}\n\nMade by `tessera optimize --int8` from `{record['source']}`: "
            f"{len(record['layers'])} linear layers of its generator hold int8 weights ({record['scheme']}).\n\n"
            f"Generation stage, warm, alternating, {record['threads']} threads: float "
            f"{record['generation_seconds']['float']} s, int8 {record['generation_seconds']['int8']} s "
            f"({record['speed_ratio']}x). Lossy: its held-out quality is measured by `tessera bench paradigms` and "
            f"gated by `benchmarks/bench_optimize.py gate` (benchmarks/RESULTS.md).\n")
