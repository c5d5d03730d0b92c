"""Stable Diffusion end to end at the real size: Tessera's pipeline vs diffusers', each side alone in its
own process (so each one's peak RSS is its own), alternating, from the same diffusers folder on disk.

The folder holds random weights of the true shapes (speed does not depend on the values), stored in bf16:
    turbo  SD-Turbo / SD 2.1: 866 M U-Net (linear projections, heads 5/10/20/20, 1024-d cross-attention),
           OpenCLIP-H-shaped CLIP text model (23 layers, 1024-d, the penultimate layer SD 2 uses), TAESD,
           Euler-ancestral with trailing spacing; 512x512, 1 step, no guidance.
    sd15   SD 1.5: 860 M U-Net (conv projections, 8 heads, 768-d cross-attention), CLIP-L-shaped text model,
           the full SD VAE (AutoencoderKL; bf16 on both sides), DDIM; 512x512, 20 steps, guidance 7.5.
Each side loads the folder in bf16 (diffusers: torch_dtype=bfloat16 and a channels-last U-Net and VAE, its
best CPU setting; Tessera: tessera.load(DIR, dtype="bfloat16")) and times: load, then per call the text encoder, every
U-Net call, the VAE decode and the whole call (median of --calls after a warm-up call). VmHWM at the end.

    .venv/bin/python benchmarks/bench_sd_pipeline.py --case turbo [--rounds 2] [--calls 2] [--folder DIR]
    .venv/bin/python benchmarks/bench_sd_pipeline.py --case sd15 --rounds 1 --calls 1
    .venv/bin/python benchmarks/bench_sd_pipeline.py --case turbo --one-process --calls 5 [--options tome=0.5]
    .venv/bin/python benchmarks/bench_sd_pipeline.py --case turbo --table --calls 3   (issue 21's option table)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tessera.config import parse_settings

CASES = {"turbo": dict(steps=1, guidance=0.0), "sd15": dict(steps=20, guidance=7.5)}


def sd_vae():
    """SD 1.x / 2.x's AutoencoderKL (REFERENCE 2.2), random weights."""
    import diffusers

    return diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512)


def make_folder(case: str, out: Path, vae: str | None = None) -> None:
    """A diffusers StableDiffusionPipeline folder of the true shapes, random weights, bf16 safetensors; `vae`
    "kl" gives the turbo case SD 2.1's own VAE (AutoencoderKL, as sd-turbo ships) instead of TAESD."""
    import diffusers
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # a byte-level CLIP vocabulary (the real one is not here)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_shape = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                      hidden_act="gelu") if case == "turbo" else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text_shape))
    if case == "turbo":
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                              use_linear_projection=True, sample_size=64)
        vae = sd_vae() if vae == "kl" else diffusers.AutoencoderTiny()
        scheduler = diffusers.EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
    else:
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = sd_vae()
        scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.to(torch.bfloat16).save_pretrained(out)


def _timer(obj, attr: str, bucket: list[float]) -> None:
    """Replace obj.attr by itself timed into `bucket` (an instance attribute: modules call self.forward)."""
    fn = getattr(obj, attr)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        bucket.append(time.perf_counter() - t0)
        return out
    setattr(obj, attr, timed)


def load_side(side: str, folder: Path, options: dict | None = None):
    """-> (pipe, {stage: bucket}) with the stage timers in place."""
    buckets = {"text": [], "unet": [], "decode": []}
    if side == "diffusers":
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, safety_checker=None,
                                                                 requires_safety_checker=False)
        pipe.unet.to(memory_format=torch.channels_last)  # as Tessera's (its CPU speed-up)
        pipe.vae.to(memory_format=torch.channels_last)
        _timer(pipe.text_encoder, "forward", buckets["text"])
        _timer(pipe.unet, "forward", buckets["unet"])
        _timer(pipe.vae, "decode", buckets["decode"])
    else:
        import tessera

        pipe = tessera.load(str(folder), dtype="bfloat16")
        if options:
            pipe.set_speed(**options)
        _timer(pipe.text_encoder.model, "forward", buckets["text"])
        _timer(pipe, "_unet", buckets["unet"])  # outside a compiled U-Net (a timer inside it would recompile it)
        _timer(pipe.tokenizer, "decode_latents", buckets["decode"])
    return pipe, buckets


def run_side(side: str, case: str, folder: Path, calls: int, options: dict | None = None) -> dict:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    pipe, buckets = load_side(side, folder, options)
    load_s = time.perf_counter() - t0
    timed_call(pipe, buckets, case, steps=1)  # warm-up: oneDNN primitives for every shape
    runs = [timed_call(pipe, buckets, case) for _ in range(calls)]
    with open("/proc/self/status") as f:
        hwm = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024
    stages = {k: statistics.median(r[k] for r in runs) for k in ("total_s", "text_s", "unet_s", "decode_s")}
    return {"side": side, "load_s": load_s, **stages, "unet_calls": runs[0]["unet_calls"],
            "unet_per_call_s": stages["unet_s"] / runs[0]["unet_calls"],
            "peak_rss_mib": hwm, "size": list(runs[0]["image"].size)}


def timed_call(pipe, buckets: dict, case: str, steps: int | None = None) -> dict:
    """One 512² call of `pipe` with the case's settings -> {"total_s", "text_s", "unet_s", "decode_s", "image"}."""
    for b in buckets.values():
        b.clear()
    t = time.perf_counter()
    with torch.no_grad():
        image = pipe("a lake between mountains at sunset", num_inference_steps=steps or CASES[case]["steps"],
                     guidance_scale=CASES[case]["guidance"], generator=torch.Generator("cpu").manual_seed(11),
                     height=512, width=512).images[0]
    return {"total_s": time.perf_counter() - t, **{f"{k}_s": sum(v) for k, v in buckets.items()},
            "unet_calls": len(buckets["unet"]), "image": image}


def one_process(case: str, folder: Path, calls: int, options: dict) -> None:
    """Both sides in this process, alternating calls (the issue-21 comparison): median per stage and ratio."""
    torch.set_num_threads(2)
    sides = {side: load_side(side, folder, options) for side in ("diffusers", "tessera")}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(calls + 1):  # the first round warms up both
        for side, (pipe, buckets) in sides.items():
            run = timed_call(pipe, buckets, case)
            if i:
                runs[side].append(run)
    print(f"case {case}: both sides in one process, alternating, {calls} call(s) each after a warm-up; "
          f"Tessera options {options or 'default'}")
    print("| stage | diffusers s | Tessera s | diffusers / Tessera |")
    print("| --- | --- | --- | --- |")
    for key in ("text_s", "unet_s", "decode_s", "total_s"):
        r, o = (statistics.median(x[key] for x in runs[s]) for s in ("diffusers", "tessera"))
        print(f"| {key.removesuffix('_s')} | {r:.3f} | {o:.3f} | {r / o:.2f}x |")


TABLE = (("plain (no prepacking)", dict(prepack=False)), ("prepacked weights (default)", dict(prepack=True)),
         ("attention gemm", dict(prepack=False, attention="gemm")),
         ("attention auto", dict(prepack=False, attention="auto")),
         ("ToMe 0.5", dict(prepack=False, attention="sdpa", tome=0.5)),
         ("prepacked + auto + ToMe 0.5", dict(prepack=True, attention="auto", tome=0.5)),
         ("compile (inductor, frozen)", dict(tome=0.0, attention="sdpa", compile=True)),
         ("compile + ToMe 0.5", dict(tome=0.5, compile=True)))


def option_table(case: str, folder: Path, calls: int, rows: list[str]) -> None:
    """Each speed option alone, then together: one process, the diffusers pipeline alternating with
    Tessera's under each setting (set_speed switches them on the same loaded pipeline)."""
    torch.set_num_threads(2)
    (ref, ref_b), (ours, ours_b) = load_side("diffusers", folder), load_side("tessera", folder)

    def call(pipe, buckets):
        run = timed_call(pipe, buckets, case)
        return run["total_s"], run["unet_s"]

    print(f"case {case}: one process, diffusers alternating with Tessera, {calls} call(s) each after a warm-up")
    print("| Tessera setting | first call s | diffusers s | Tessera s | Tessera U-Net s | diffusers / Tessera |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, options in TABLE:
        if rows and not any(r in name for r in rows):
            continue
        ours.set_speed(**options)
        first = call(ours, ours_b)[0]  # warm-up (a compile happens here)
        call(ref, ref_b)
        r, o = [], []
        for _ in range(calls):
            r.append(call(ref, ref_b))
            o.append(call(ours, ours_b))
        rt, ot = statistics.median(x[0] for x in r), statistics.median(x[0] for x in o)
        print(f"| {name} | {first:.2f} | {rt:.3f} | {ot:.3f} | {statistics.median(x[1] for x in o):.3f} | "
              f"{rt / ot:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), default="turbo")
    ap.add_argument("--folder", type=Path, help="default: /tmp/tessera-bench-sd-CASE (made when missing)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating diffusers / Tessera processes")
    ap.add_argument("--calls", type=int, default=2, help="timed calls per process")
    ap.add_argument("--one-process", action="store_true", help="both sides in one process, alternating calls")
    ap.add_argument("--table", action="store_true", help="each speed option alone and together (one process)")
    ap.add_argument("--rows", default="", help="--table: only the rows whose names contain one of these (a,b)")
    ap.add_argument("--options", default="", help="Tessera speed options, e.g. prepack=0,attention=gemm,tome=0.5")
    ap.add_argument("--side", choices=["diffusers", "tessera"], help=argparse.SUPPRESS)  # one side, in a child
    args = ap.parse_args()
    folder = args.folder or Path(f"/tmp/tessera-bench-sd-{args.case}")
    options = parse_settings([kv for kv in args.options.split(",") if kv], "--options")
    if args.side:
        print(json.dumps(run_side(args.side, args.case, folder, args.calls, options)))
        return
    if not (folder / "model_index.json").is_file():
        t0 = time.perf_counter()
        make_folder(args.case, folder)
        print(f"made {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.table:
        return option_table(args.case, folder, args.calls, [r for r in args.rows.split(",") if r])
    if args.one_process:
        return one_process(args.case, folder, args.calls, options)
    results: dict[str, list[dict]] = {"diffusers": [], "tessera": []}
    for _ in range(args.rounds):
        for side in ("diffusers", "tessera"):
            out = subprocess.run([sys.executable, __file__, "--case", args.case, "--folder", str(folder),
                                  "--calls", str(args.calls), "--side", side, "--options", args.options],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{side}: {out.stderr[-2000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[side][-1]), file=sys.stderr)
    cfg = CASES[args.case]
    print(f"case {args.case}: 512x512, {cfg['steps']} step(s), guidance {cfg['guidance']}, bf16, 2 threads; "
          f"median over {args.rounds} process(es) per side x {args.calls} call(s)")
    print("| stage | diffusers | Tessera | ratio |")
    print("| --- | --- | --- | --- |")
    for key, label in (("load_s", "load s"), ("text_s", "text encoder s"), ("unet_per_call_s", "U-Net call s"),
                       ("decode_s", "VAE decode s"), ("total_s", "whole call s"), ("peak_rss_mib", "peak RSS MiB")):
        r, o = (statistics.median(x[key] for x in results[s]) for s in ("diffusers", "tessera"))
        print(f"| {label} | {r:.3f} | {o:.3f} | {o / r:.2f} |" if key != "peak_rss_mib" else
              f"| {label} | {r:.0f} | {o:.0f} | {o / r:.2f} |")


if __name__ == "__main__":
    main()
