"""Load test of the gateway on loopback: N closed-loop clients for M minutes against `tessera serve`
(a separate process), once one-at-a-time (--max-batch 1) and once with dynamic batching, same load.

Each client submits an async job (Prefer: respond-async), follows its event stream to the end, and submits the next;
a 429 is counted and retried after min(Retry-After, 1 s). After the window every accepted job is
drained and checked: none lost (each accepted id ends succeeded), none duplicated (ids and image ids
unique, the server's own succeeded count equals the clients'). Also auto-complete latency over HTTP.

    .venv/bin/python benchmarks/bench_serve.py [--clients 12] [--minutes 2] [--max-queue 6] [--batches 1 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx

PROMPTS = ["grinning face emoji", "red apple", "snowman emoji", "a frog", "cat face emoji", "a house",
           "sunflower emoji", "rocket emoji", "a palm tree", "a dog", "strawberry", "blue car"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, max_queue: int, data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", "serve", "--port", str(port), "--data-dir", data_dir,
                             "--max-batch", str(max_batch), "--max-queue", str(max_queue)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 180
    while time.time() < end:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become ready")


async def follow(http: httpx.AsyncClient, job_id: str) -> dict:
    """Follow the job's event stream to its `done` event (the job, result included)."""
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "done":
                return json.loads(line[6:])
    raise RuntimeError(f"job {job_id}: the event stream ended without `done`")


async def client(http, size: str, stop_at: float, stats: dict, rng: random.Random) -> None:
    while time.time() < stop_at:
        t0 = time.time()
        body = {"prompt": rng.choice(PROMPTS), "size": size, "seed": rng.randrange(2**31)}
        r = await http.post("/v1/images/generations", json=body, headers={"Prefer": "respond-async"})
        if r.status_code == 429:
            stats["rejected_429"] += 1
            await asyncio.sleep(min(float(r.headers["retry-after"]), 1.0))
            continue
        if r.status_code != 202:
            stats["errors"].append(r.text[:200])
            continue
        stats["accepted"].append(r.json()["id"])
        job = await follow(http, r.json()["id"])
        stats["finished"].append({"id": job["id"], "status": job["status"], "t0": t0, "t1": time.time(),
                                  "images": (job["result"] or {}).get("tessera", {}).get("image_ids", []),
                                  "batch": (job["result"] or {}).get("tessera", {}).get("batch")})


async def load(url: str, clients: int, minutes: float, size: str) -> dict:
    stats = {"accepted": [], "finished": [], "rejected_429": 0, "errors": []}
    start = time.time()
    stop_at = start + minutes * 60
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*[client(http, size, stop_at, stats, random.Random(i)) for i in range(clients)])
        metrics = (await http.get("/v1/metrics")).json()
        complete = await complete_latency(http)
    return summarise(stats, start, stop_at, metrics, complete)


async def complete_latency(http, n: int = 300) -> dict:
    rng, times = random.Random(0), []
    for _ in range(n):
        p = rng.choice(PROMPTS)
        q = p[: rng.randrange(1, len(p) + 1)]
        t = time.perf_counter()
        r = await http.get("/v1/prompts/complete", params={"q": q})
        times.append(time.perf_counter() - t)
        assert r.status_code == 200
    times.sort()
    return {"n": n, "p50_ms": round(1000 * times[n // 2], 2), "p99_ms": round(1000 * times[int(n * 0.99)], 2)}


def summarise(stats: dict, start: float, stop_at: float, metrics: dict, complete: dict) -> dict:
    done = stats["finished"]
    in_window = [d for d in done if d["t1"] <= stop_at]
    lat = sorted(d["t1"] - d["t0"] for d in done)
    images = [i for d in done for i in d["images"]]
    ids = [d["id"] for d in done]
    return {
        "jobs_accepted": len(stats["accepted"]), "jobs_finished": len(done),
        "succeeded": sum(d["status"] == "succeeded" for d in done),
        "lost": len(set(stats["accepted"]) - {d["id"] for d in done if d["status"] == "succeeded"}),
        "duplicated": (len(ids) - len(set(ids))) + (len(images) - len(set(images))),
        "server_succeeded": metrics["jobs"]["succeeded"],
        "rejected_429": stats["rejected_429"], "errors": stats["errors"][:3],
        "throughput_img_s": round(sum(len(d["images"]) for d in in_window) / (stop_at - start), 3),
        "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None,
        "mean_batch": metrics["mean_batch"], "complete": complete,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--max-queue", type=int, default=6)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    rows = []
    for b in a.batches:
        with tempfile.TemporaryDirectory() as tmp:
            proc, url = start_server(b, a.max_queue, os.path.join(tmp, "serve"))
            try:
                rows.append({"max_batch": b, **asyncio.run(load(url, a.clients, a.minutes, a.size))})
            finally:
                proc.terminate()
                proc.wait(30)
        print(json.dumps(rows[-1]), file=sys.stderr)
    print("| max_batch | accepted | succeeded | lost | duplicated | 429s | images/s | p50 s | p99 s | mean batch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['max_batch']} | {r['jobs_accepted']} | {r['succeeded']} | {r['lost']} | {r['duplicated']} | "
              f"{r['rejected_429']} | {r['throughput_img_s']} | {r['p50_s']} | {r['p99_s']} | {r['mean_batch']} |")
    if len(rows) >= 2:
        print(f"\nthroughput ratio (max_batch {rows[-1]['max_batch']} / {rows[0]['max_batch']}): "
              f"{rows[-1]['throughput_img_s'] / rows[0]['throughput_img_s']:.2f}x")
    print(f"auto-complete over HTTP: {json.dumps([r['complete'] for r in rows])}")


if __name__ == "__main__":
    main()
