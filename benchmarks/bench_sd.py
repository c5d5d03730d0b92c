"""Stable Diffusion at the real size, Tessera's networks vs diffusers', side by side in one process.

Random weights of the true shapes (speed does not depend on the values): an SD-Turbo-shaped U-Net
(SD 2.1: 866 M parameters, linear projections, heads 5/10/20/20, 1024-d cross-attention) and TAESD, both
copied into Tessera's networks from the diffusers modules (so both sides compute the same function), bf16
weights, 512x512 (64x64 latents), batch 1, one step without guidance: the SD-Turbo case of issue 20.
Alternating repeats; the median per stage and the ratio Tessera / diffusers (<= 1.0: parity or better).

    .venv/bin/python benchmarks/bench_sd.py [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    from tessera.generators.sd_unet import SDUNet, SDUNetConfig
    from tessera.tokenizer.taesd import TinyAutoencoder, TinyAutoencoderConfig

    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                              use_linear_projection=True, sample_size=64).eval()
    ours_unet = SDUNet(SDUNetConfig.from_diffusers(dict(ref_unet.config))).eval()
    ours_unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ref_vae = diffusers.AutoencoderTiny().eval()
    ours_vae = TinyAutoencoder(TinyAutoencoderConfig.from_diffusers(dict(ref_vae.config))).eval()
    ours_vae.load_state_dict(ref_vae.state_dict(), strict=True)
    for m in (ref_unet, ours_unet, ref_vae, ours_vae):
        m.to(torch.bfloat16).to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in ours_unet.parameters()) / 1e6
    x = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    ctx = torch.randn(1, 77, 1024, dtype=torch.bfloat16)
    t = torch.tensor([999])
    stages = {
        "unet step": (lambda: ref_unet(x, t, encoder_hidden_states=ctx), lambda: ours_unet(x, t, ctx)),
        "TAESD decode 512": (lambda: ref_vae.decode(x), lambda: ours_vae.decode_latents(x)),
    }
    with torch.no_grad():  # same function on both sides (bf16 rounding aside)
        diff = (ref_unet(x, t, encoder_hidden_states=ctx).sample.float() - ours_unet(x, t, ctx).float()).abs().max()
    results = {}
    for name, (ref_fn, ours_fn) in stages.items():
        timed(ref_fn), timed(ours_fn)  # warm-up (oneDNN primitive creation)
        ref_t, ours_t = [], []
        for _ in range(args.repeats):
            ref_t.append(timed(ref_fn))
            ours_t.append(timed(ours_fn))
        results[name] = (statistics.median(ref_t), statistics.median(ours_t))
    print(f"U-Net {params:.1f} M parameters, bf16, 512x512, {args.threads} threads; max |diff| {float(diff):.3g}")
    print("| stage | diffusers s | Tessera s | ratio |")
    print("| --- | --- | --- | --- |")
    for name, (r, o) in results.items():
        print(f"| {name} | {r:.3f} | {o:.3f} | {o / r:.2f} |")
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM")).split()[1]
    print(f"peak RSS (both models in one process): {int(hwm) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
