"""`tessera generate` end to end on an SD pipeline folder (issue 21): the whole system — prompt safety,
CLIP-aware enhancement, generation, decoding, harm detection, the bundled fast SR cascade — at 1024² and
2048².

    warm   one process, TextToImage over the folder, models loaded: best of --repeats per size, with the
           per-stage timings of the best call and the process's VmHWM
    cold   `tessera generate` as a user runs it (a new process each): wall time and peak RSS (/usr/bin/time)

    .venv/bin/python benchmarks/bench_generate.py [--folder /tmp/tessera-bench-sd-turbo] [--repeats 3]
(the folder: made by benchmarks/bench_sd_pipeline.py --case turbo; 1 step, no guidance, TAESD)
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

PROMPT = "a lake between mountains at sunset"


def warm(folder: Path, repeats: int, sizes: tuple[int, ...]) -> None:
    import torch

    from tessera.pipelines.text2image import Request, TextToImage

    torch.set_num_threads(2)
    t2i = TextToImage({"diffusion": str(folder)})
    t2i(Request(PROMPT, size=sizes[0], steps=1, cfg_scale=0.0, seed=1))  # loads everything, warms oneDNN
    print("| size | best total s | its stages (s) |")
    print("| --- | --- | --- |")
    for size in sizes:
        runs = [t2i(Request(PROMPT, size=size, steps=1, cfg_scale=0.0, seed=1 + i)).timings for i in range(repeats)]
        best = min(runs, key=lambda r: r["total"])
        stages = ", ".join(f"{k} {v:.3f}" for k, v in best.items() if k != "total")
        print(f"| {size}² | {best['total']:.3f} | {stages} |")
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM")).split()[1]
    print(f"peak RSS of the warm process (all sizes): {int(hwm) / 1024:.0f} MiB")


def cold(folder: Path, sizes: tuple[int, ...]) -> None:
    tessera = Path(sys.executable).with_name("tessera")
    print("| size | process wall s | total after loading s | peak RSS MiB |")
    print("| --- | --- | --- | --- |")
    for size in sizes:
        cmd = ["/usr/bin/time", "-v", str(tessera), "generate", PROMPT, "--model", str(folder), "--size", str(size),
               "--steps", "1", "--cfg", "0", "--seed", "1", "-o", f"/tmp/bench-generate-{size}.png"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        timings = json.loads(out.stdout.strip().split("  ")[-1])
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\d+):([\d.]+)", out.stderr)
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)[1]) / 1024
        print(f"| {size}² | {int(wall[1]) * 60 + float(wall[2]):.1f} | {timings['total']:.3f} | {rss:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, default=Path("/tmp/tessera-bench-sd-turbo"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sizes = (1024, 2048)
    print("warm (models loaded, one process):")
    warm(args.folder, args.repeats, sizes)
    print("\ncold (`tessera generate`, a new process per size):")
    cold(args.folder, sizes)


if __name__ == "__main__":
    main()
