"""The model optimization pipeline's speed (issue 24), side by side in one process (alternating calls):

    int8     `tessera optimize DIR --int8 -o OUT` on the SD-Turbo-shaped folder of bench_sd_pipeline.py (random
             weights of the true shapes, 866 M U-Net, OpenCLIP-H-shaped text model, TAESD): tessera.load(DIR)
             vs tessera.load(OUT), 512x512, 1 step, no guidance, in --dtype (default: auto, i.e. bf16 where the
             CPU has it, float32 elsewhere); whole call and U-Net call medians, and their ratios.
    distill  `tessera generate`'s generation stage (the PNG's seconds.generate) of --model unet-xs (20 DDIM steps,
             guidance 5) vs --model unet-xs-4step (4 steps, no guidance), alternating processes.

    .venv/bin/python benchmarks/bench_optimize.py int8 [--calls 3] [--dtype float32|bfloat16]
    .venv/bin/python benchmarks/bench_optimize.py distill [--calls 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _unet_timer(pipe, bucket: list[float]) -> None:
    fn = pipe._unet

    def timed(*a):
        t0 = time.perf_counter()
        out = fn(*a)
        bucket.append(time.perf_counter() - t0)
        return out
    pipe._unet = timed


def bench_int8(folder: Path, out: Path, calls: int, dtype: str) -> dict:
    import tessera
    from tessera.optimize.int8 import quantize_sd_folder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_sd_pipeline import make_folder

    if not (folder / "model_index.json").is_file():
        make_folder("turbo", folder)
    if not (out / "model_index.json").is_file():
        t0 = time.perf_counter()
        report = quantize_sd_folder(folder, out, size=512, steps=1, dtype=dtype)
        print(f"optimize --int8: {len(report['quantized'])} layers int8, {len(report['kept'])} kept float, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    sides = {name: tessera.load(str(path), dtype=dtype) for name, path in (("float", folder), ("int8", out))}
    times = {name: {"call": [], "unet": []} for name in sides}
    for name, pipe in sides.items():
        _unet_timer(pipe, times[name]["unet"])
    images = {}
    for i in range(calls + 1):  # the first round is the warm-up (the int8 weights are packed at the first call)
        for name, pipe in sides.items():
            n = len(times[name]["unet"])
            t0 = time.perf_counter()
            images[name] = pipe("a lake between mountains at sunset", num_inference_steps=1, guidance_scale=0.0,
                                height=512, width=512, generator=torch.Generator().manual_seed(1),
                                output_type="pt").images
            if i:
                times[name]["call"].append(time.perf_counter() - t0)
            else:
                del times[name]["unet"][n:]
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    diff = (images["float"] - images["int8"]).abs()
    return {"dtype": str(sides["float"].placement.dtype), "calls": calls, "float": med["float"], "int8": med["int8"],
            "call_ratio": med["float"]["call"] / med["int8"]["call"],
            "unet_ratio": med["float"]["unet"] / med["int8"]["unet"],
            "image_mean_abs_diff": float(diff.mean()), "threads": torch.get_num_threads()}


def bench_distill(calls: int) -> dict:
    exe = str(ROOT / ".venv" / "bin" / "tessera")
    seconds: dict[str, list[float]] = {"unet-xs": [], "unet-xs-4step": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(calls):
            for model in seconds:
                png = Path(tmp) / f"{model}-{i}.png"
                subprocess.run([exe, "generate", "grinning face emoji", "--model", model, "--size", "0",
                                "--seed", str(i), "-o", str(png)], check=True, capture_output=True)
                from tessera.records import read_record

                seconds[model].append(float(read_record(png)["seconds"]["generate"]))
    med = {m: statistics.median(v) for m, v in seconds.items()}
    return {"calls": calls, "seconds_generate": med, "all": seconds, "ratio": med["unet-xs"] / med["unet-xs-4step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["int8", "distill"])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-sd-turbo")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-sd-turbo-int8")
    args = ap.parse_args()
    result = bench_int8(args.folder, args.out, args.calls, args.dtype) if args.case == "int8" else bench_distill(args.calls)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
