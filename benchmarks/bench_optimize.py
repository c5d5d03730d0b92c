"""The model optimization pipeline's speed (issue 24), side by side in one process (alternating calls):

    int8     `tessera optimize DIR --int8 -o OUT` on the SD-Turbo-shaped folder of bench_sd_pipeline.py (random
             weights of the true shapes, 866 M U-Net, OpenCLIP-H-shaped text model, TAESD or with --vae kl
             sd-turbo's own AutoencoderKL; OUT: int8 U-Net and decoder): tessera.load(DIR)
             vs tessera.load(OUT), 512x512, 1 step, no guidance, in --dtype (default: auto, i.e. bf16 where the
             CPU has it, float32 elsewhere); whole call and U-Net call medians, and their ratios.
    distill  `tessera generate`'s generation stage (the PNG's seconds.generate) of --model unet-xs (20 DDIM steps,
             guidance 5) vs --model unet-xs-4step (its own 4 steps), alternating processes (each call a fresh
             process: a cold first call), then the same stage warm in one process (as a server runs it).
    prune    the same generation stage of --model masked-xxs vs its `tessera optimize --prune F` copies.
    int8-bundled  weight-only int8 of every linear layer of each bundled generator vs the model as loaded
             (warm, alternating, one process).
    sr       the distilled SR student vs Real-ESRGAN x4plus: x4 of a 256 px input (bf16, alternating), and the
             student's PSNR against x4plus's output on held-out photos.
    gate     the workflow's evaluation gate on two configs of ONE `tessera bench paradigms` run (the same held-out
             captions): metrics, the paired bootstrap's 95% intervals of worse_by (eval/bootstrap.py), decision.

    .venv/bin/python benchmarks/bench_optimize.py int8 [--calls 3] [--dtype float32|bfloat16] [--tuned-allocator]
                                                       [--vae taesd|kl]
    .venv/bin/python benchmarks/bench_optimize.py distill [--calls 5]
    .venv/bin/python benchmarks/bench_optimize.py prune --models DIR... [--calls 5]   (pruned masked-xxs folders)
    .venv/bin/python benchmarks/bench_optimize.py int8-bundled [--models ar-xs masked-xxs unet-xs] [--calls 5]
    .venv/bin/python benchmarks/bench_optimize.py sr [--student DIR --data data/photo256b --images 64]
    .venv/bin/python benchmarks/bench_optimize.py gate --run BENCH_DIR --candidate NAME --deployed NAME
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


def _timer(pipe, attr: str, bucket: list[float]) -> None:
    """Time every call of pipe.<attr> (the U-Net call `_unet`, the autoencoder's `decode`) into `bucket`."""
    fn = getattr(pipe, attr)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        bucket.append(time.perf_counter() - t0)
        return out
    setattr(pipe, attr, timed)


def bench_int8(folder: Path, out: Path, calls: int, dtype: str, vae: str) -> dict:
    import tessera
    from tessera.optimize.int8 import quantize_sd_folder

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_sd_pipeline import make_folder

    if not (folder / "model_index.json").is_file():
        make_folder("turbo", folder, vae)
    if not (out / "model_index.json").is_file():
        t0 = time.perf_counter()
        report = quantize_sd_folder(folder, out, size=512, steps=1, dtype=dtype)
        print(f"optimize --int8: U-Net {len(report['quantized'])} layers int8, {len(report['kept'])} kept float; "
              f"decoder {len(report.get('vae_quantized', []))} int8; {time.perf_counter() - t0:.0f} s", flush=True)
    sides = {name: tessera.load(str(path), dtype=dtype) for name, path in (("float", folder), ("int8", out))}
    times = {name: {"call": [], "unet": [], "decode": []} for name in sides}
    for name, pipe in sides.items():
        _timer(pipe, "_unet", times[name]["unet"])
        _timer(pipe, "decode", times[name]["decode"])
    images = {}
    for i in range(calls + 1):  # the first round is the warm-up (the int8 weights are packed at the first call)
        for name, pipe in sides.items():
            n = {k: len(v) for k, v in times[name].items()}
            t0 = time.perf_counter()
            images[name] = pipe("a lake between mountains at sunset", num_inference_steps=1, guidance_scale=0.0,
                                height=512, width=512, generator=torch.Generator().manual_seed(1),
                                output_type="pt").images
            if i:
                times[name]["call"].append(time.perf_counter() - t0)
            else:
                for k in ("unet", "decode"):
                    del times[name][k][n[k]:]
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    diff = (images["float"] - images["int8"]).abs()
    return {"dtype": str(sides["float"].placement.dtype), "vae": vae, "calls": calls,
            "float": med["float"], "int8": med["int8"],
            "call_ratio": med["float"]["call"] / med["int8"]["call"],
            "unet_ratio": med["float"]["unet"] / med["int8"]["unet"],
            "decode_ratio": med["float"]["decode"] / med["int8"]["decode"],
            "image_mean_abs_diff": float(diff.mean()), "threads": torch.get_num_threads()}


def bench_generation_stage(models: list[str], calls: int) -> dict:
    """`tessera generate`'s generation stage (the PNG's seconds.generate) per model, alternating processes;
    ratios against the first model."""
    from tessera.records import read_record

    exe = str(ROOT / ".venv" / "bin" / "tessera")
    seconds: dict[str, list[float]] = {m: [] for m in models}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(calls):
            for j, model in enumerate(models):
                png = Path(tmp) / f"{j}-{i}.png"
                subprocess.run([exe, "generate", "grinning face emoji", "--model", model, "--size", "0",
                                "--seed", str(i), "-o", str(png)], check=True, capture_output=True)
                seconds[model].append(float(read_record(png)["seconds"]["generate"]))
    med = {m: statistics.median(v) for m, v in seconds.items()}
    return {"calls": calls, "seconds_generate": med, "all": seconds,
            "ratio": {m: med[models[0]] / med[m] for m in models[1:]}}


def _alternate_warm(pipes: dict, calls: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The generation stage (text encoding + sampling) of each pipeline, warm, alternating: one warm-up call
    each, then `calls` rounds; -> (median seconds, each pipeline's last output)."""
    seconds: dict[str, list[float]] = {k: [] for k in pipes}
    out = {}
    for i in range(calls + 1):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            out[name] = pipe.generate(["grinning face emoji"], pipe.params(seed=i, n=1))
            if i:  # call 0 is the warm-up
                seconds[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in seconds.items()}, out


def bench_warm_generation(models: list[str], calls: int) -> dict:
    """The same generation stage warm, as a server runs it: every pipeline loaded once in this process."""
    from tessera.pipelines.folder import load_pipeline

    med, _ = _alternate_warm({m: load_pipeline(m) for m in models}, calls)
    return {"seconds_generate_warm": med, "ratio_warm": {m: med[models[0]] / med[m] for m in models[1:]}}


def bench_int8_bundled(models: list[str], calls: int) -> dict:
    """Weight-only int8 (nn/quant.Int8Linear: every nn.Linear of the generator) vs the pipeline as loaded
    (dtype auto), per bundled model: two copies in this process, warm, alternating; the generation stage's
    medians, their ratio, and how far the int8 copy's output moves (tokens differing / mean abs latent diff)."""
    from tessera.nn.quant import quantize_int8
    from tessera.pipelines.folder import load_pipeline

    out = {}
    for model in models:
        sides = {"float": load_pipeline(model), "int8": load_pipeline(model)}
        layers = quantize_int8(sides["int8"].generator)
        med, result = _alternate_warm(sides, calls)
        a, b = (result[k].float() for k in ("float", "int8"))
        moved = float((a != b).float().mean()) if result["float"].dtype == torch.long else float((a - b).abs().mean())
        out[model] = {"int8_layers": layers, "dtype": str(sides["float"].placement.dtype), **med,
                      "ratio": med["float"] / med["int8"], "output_moved": moved}
    return {"calls": calls, "threads": torch.get_num_threads(), "models": out}


def bench_sr(student: str, teacher: str, data: str, calls: int, images: int) -> dict:
    """The SR student vs its teacher: seconds per x4 upscale of a 256 px input (bf16 autocast where the CPU has it, alternating),
    and the student's PSNR against the teacher's output on `images` held-out photos of DATA (bicubic LR)."""
    from tessera.data.dataset import ShardImages
    from tessera.device import cpu_placement
    from tessera.eval.metrics import psnr
    from tessera.superres.cascade import load_sr_models
    from tessera.superres.degrade import bicubic_down, to_uint8
    from tessera.train.sr import teacher_outputs

    nets = {"teacher": load_sr_models(teacher)[4].eval(), "student": load_sr_models(student)[4].eval()}
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad(), cpu_placement("auto").autocast():  # bf16 where the CPU has it
        for i in range(calls + 1):
            for name, net in nets.items():
                t0 = time.perf_counter()
                net(x)
                if i:
                    seconds[name].append(time.perf_counter() - t0)
    val = ShardImages(data, "val")
    pick = [int(i) for i in torch.linspace(0, len(val) - 1, min(images, len(val))).round()]
    lr = torch.stack([to_uint8(bicubic_down(val.image(i), 4)) for i in pick])
    out = {k: teacher_outputs(net, lr, progress=False).float() / 127.5 - 1 for k, net in nets.items()}
    b = 4  # the border the SR validation ignores
    crop = (slice(None), slice(None), slice(b, -b), slice(b, -b))
    db = psnr(out["student"][crop], out["teacher"][crop])
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"seconds_256px_x4": med, "speedup": med["teacher"] / med["student"], "images": len(pick),
            "psnr_vs_teacher_mean": float(db.mean()), "psnr_vs_teacher_min": float(db.min()),
            "threads": torch.get_num_threads()}


def bench_gate(run: Path, candidate: str, deployed: str, tolerances: dict[str, float], replicates: int) -> dict:
    """The evaluation gate (eval/gate.py, with the paired bootstrap's 95% intervals of worse_by) on configs
    `candidate` and `deployed` of the bench run `run` (each config's folder holds its scores.npz; the run's
    real_features.npz is the reference set both are measured against)."""
    from tessera.eval.bootstrap import SCORES_FILE, load_scores, paired_intervals, sample_metrics
    from tessera.eval.gate import DIRECTIONS, gate

    scores = {who: load_scores(run / name / SCORES_FILE) for who, name in (("candidate", candidate),
                                                                           ("deployed", deployed))}
    if list(scores["candidate"]["prompts"]) != list(scores["deployed"]["prompts"]):
        raise SystemExit(f"{run}: {candidate} and {deployed} drew images for different captions (not paired)")
    real = load_scores(run / "real_features.npz")["feats"]
    metrics = {who: sample_metrics(s, real) for who, s in scores.items()}
    intervals = paired_intervals(scores["candidate"], scores["deployed"], real, DIRECTIONS, replicates=replicates)
    decision = gate(metrics["candidate"], metrics["deployed"], tolerances, intervals)
    return {"captions": len(scores["candidate"]["prompts"]), "metrics": metrics, "intervals": intervals,
            "promote": decision.promote, "reasons": decision.reasons,
            "psnr_to_deployed": _paired_psnr(run / candidate, run / deployed)}


def _paired_psnr(candidate: Path, deployed: Path) -> float | None:
    """Mean per-image PSNR (dB, eval/metrics.psnr) of the candidate's images against the deployed model's for
    the same caption and noise seed (how faithfully a student reproduces its teacher); None when they do not pair."""
    import numpy as np
    from PIL import Image

    from tessera.eval.metrics import psnr

    rows = [json.loads((d / "samples.json").read_text())["images"] for d in (candidate, deployed)]
    pairs = [[(r["file"], r["prompt"], r["seed"]) for r in side] for side in rows]
    if pairs[0] != pairs[1]:
        return None

    def images(d: Path) -> torch.Tensor:  # [n, 3, H, W] in [-1, 1]
        x = np.stack([np.asarray(Image.open(d / r["file"]).convert("RGB")) for r in rows[0]])
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1

    return float(psnr(images(candidate), images(deployed)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["int8", "distill", "prune", "sr", "gate", "int8-bundled"])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tuned-allocator", action="store_true",
                    help="call device.tune_cpu_allocator() first, as the tessera command does (both sides)")
    ap.add_argument("--vae", choices=["taesd", "kl"], default="taesd",
                    help="int8: the folder's autoencoder (kl: SD 2.1's own VAE, as sd-turbo ships)")
    ap.add_argument("--folder", type=Path, help="int8: the float folder (default: a temp folder per --vae)")
    ap.add_argument("--out", type=Path, help="int8: its int8 copy (default: FOLDER-int8)")
    ap.add_argument("--models", nargs="+", default=[], help="prune: the pruned model folders (vs masked-xxs); int8-bundled: the models")
    ap.add_argument("--student", default="models/sr-x4plus-student", help="sr: the distilled SR student")
    ap.add_argument("--data", default="data/photo256b", help="sr: a prepared photo folder (its val split)")
    ap.add_argument("--images", type=int, default=64, help="sr: held-out photos for the PSNR")
    ap.add_argument("--run", type=Path, help="gate: a `tessera bench paradigms -o` folder")
    ap.add_argument("--candidate", help="gate: the candidate's config name in that run")
    ap.add_argument("--deployed", help="gate: the deployed (reference) model's config name in that run")
    ap.add_argument("--replicates", type=int, default=1000, help="gate: paired bootstrap replicates")
    ap.add_argument("--tolerance", nargs=2, action="append", metavar=("METRIC", "VALUE"),
                    help="gate: how much worse a metric may be (default: fd 5, clipscore 0.5, r_precision 0.05, "
                         "tessera workflow's sample-gate example)")
    args = ap.parse_args()
    if args.tuned_allocator:
        from tessera.device import tune_cpu_allocator

        print(f"tuned allocator: {tune_cpu_allocator()}", flush=True)
    if args.case == "gate":
        if not (args.run and args.candidate and args.deployed):
            ap.error("gate needs --run, --candidate and --deployed")
        tolerances = ({m: float(v) for m, v in args.tolerance} if args.tolerance
                      else {"fd": 5.0, "clipscore": 0.5, "r_precision": 0.05})
        result = bench_gate(args.run, args.candidate, args.deployed, tolerances, args.replicates)
    elif args.case == "int8-bundled":
        result = bench_int8_bundled(args.models or ["ar-xs", "masked-xxs", "unet-xs"], args.calls)
    elif args.case == "int8":
        name = "tessera-bench-sd-turbo" + ("-kl" if args.vae == "kl" else "")
        folder = args.folder or Path(tempfile.gettempdir()) / name
        out = args.out or folder.with_name(folder.name + "-int8")
        result = bench_int8(folder, out, args.calls, args.dtype, args.vae)
    elif args.case == "sr":
        result = bench_sr(args.student, "x4plus", args.data, args.calls, args.images)
    else:
        models = ["unet-xs", "unet-xs-4step"] if args.case == "distill" else ["masked-xxs", *args.models]
        result = {**bench_generation_stage(models, args.calls), **bench_warm_generation(models, args.calls)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
