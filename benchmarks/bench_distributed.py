"""Training throughput, 1 process vs 2 under torchrun (DDP and FSDP2), same global batch, same machine.

On a 2-core CPU the processes share the cores (1 process: 2 torch threads; 2 processes: 1 thread each),
so this measures the cost of the data-parallel machinery, not a speed-up; on a multi-GPU node the same
command lines scale out (docs/distributed.md).

    .venv/bin/python benchmarks/bench_distributed.py [--data data/demo128] [--preset ar-xs] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(data: str, preset: str, steps: int, batch: int, nproc: int, strategy: str, out: Path) -> dict:
    args = ["train", "ar", "--data", data, "--out", str(out), "--preset", preset, "--max-steps", str(steps),
            "--set", f"train.batch_size={batch // nproc}", "--set", f"train.strategy=\"{strategy}\"",
            "--set", "train.val_every=0", "--set", "train.log_every=5", "--set", f"train.ckpt_every={steps}"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={free_port()}"] if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
    t = time.time()
    r = subprocess.run(launcher + ["-m", "tessera.cli"] + args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = [row["it_s"] for row in log if row["step"] > 5]  # after warm-up
    it_s = sum(steady) / len(steady)
    return {"processes": nproc, "strategy": strategy if nproc > 1 else "-", "global_batch": batch,
            "it_s": round(it_s, 3), "images_s": round(it_s * batch, 2), "wall_s": round(time.time() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo128", help="a prepared folder with vq-f8 token + minilm caches")
    ap.add_argument("--preset", default="ar-xs")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (nproc, strategy) in enumerate([(1, "ddp"), (2, "ddp"), (2, "fsdp")]):
            rows.append(run(a.data, a.preset, a.steps, a.batch, nproc, strategy, Path(tmp) / f"run{i}"))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print("| processes | strategy | global batch | steps/s | images/s | vs 1 process |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['processes']} | {r['strategy']} | {r['global_batch']} | {r['it_s']} | {r['images_s']} | "
              f"{r['it_s'] / rows[0]['it_s']:.2f}x |")


if __name__ == "__main__":
    main()
