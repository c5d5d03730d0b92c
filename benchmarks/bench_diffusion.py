"""Diffusion sampling latency, side by side in one run: our U-Net + DDIM vs diffusers'
UNet2DConditionModel + DDIMScheduler at a matched configuration (channels, blocks, heads, latent size,
text length, 20 steps, CFG in one batched forward), and our DiT vs diffusers' PixArtTransformer2DModel
(the peer with text cross-attention), each in fp32 and bf16 autocast.

    .venv/bin/python benchmarks/bench_diffusion.py [--unet unet-xs] [--dit dit-xs] [--batch 1] [--steps 20]
"""
from __future__ import annotations

import argparse
import json

import torch
from common import timed_pair

from tessera.registry import build
from tessera.sampling.diffusion import DiffusionConfig, Schedule, guided_denoiser, sample


def params(m) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def ours(model, batch: int, text: int, steps: int, cfg_scale: float, bf16: bool):
    c = model.config
    cond, mask = torch.randn(batch, text, c.cond_dim), torch.ones(batch, text, dtype=torch.bool)
    sched = Schedule(DiffusionConfig())
    fn = guided_denoiser(model, cond, mask, cfg_scale)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))
            sample(lambda x, t: fn(x, t).float(), sched, x, steps)
    return run


def peer_loop(net_fn, batch: int, channels: int, size: int, text: int, cond_dim: int, steps: int,
              cfg_scale: float, bf16: bool):
    """The diffusers pipelines' loop: [x; x] through the network, guidance, DDIMScheduler.step."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=True)
    ctx = torch.randn(2 * batch, text, cond_dim)

    def run():
        sched.set_timesteps(steps)
        x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for t in sched.timesteps:
                out = net_fn(torch.cat([x, x]), t, ctx).float()
                c, u = out.chunk(2)
                x = sched.step(u + cfg_scale * (c - u), t, x).prev_sample
    return run


def diffusers_unet(cfg):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attn_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attn_levels))
    chans = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    groups = max(g for g in range(1, 33) if all(ch % g == 0 and ch // g >= 4 for ch in chans))
    net = UNet2DConditionModel(sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                               down_block_types=down[:levels], up_block_types=up[:levels], block_out_channels=chans,
                               layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.cond_dim,
                               attention_head_dim=cfg.heads, norm_num_groups=groups,
                               use_linear_projection=True).eval()
    return net, lambda x, t, ctx: net(x, t, encoder_hidden_states=ctx).sample


def diffusers_pixart(cfg):
    from diffusers import PixArtTransformer2DModel

    net = PixArtTransformer2DModel(num_attention_heads=cfg.heads, attention_head_dim=cfg.dim // cfg.heads,
                                   in_channels=cfg.in_channels, out_channels=cfg.in_channels, num_layers=cfg.depth,
                                   cross_attention_dim=cfg.dim, caption_channels=cfg.cond_dim,
                                   sample_size=cfg.sample_size, patch_size=cfg.patch_size,
                                   use_additional_conditions=False).eval()
    return net, lambda x, t, ctx: net(x, encoder_hidden_states=ctx, timestep=t.expand(x.shape[0]),
                                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def compare(name, model, peer, args) -> dict:
    c = model.config
    net, fn = peer(c)
    row = {"ours": name, "ours_params_M": round(params(model), 2), "peer": type(net).__name__,
           "peer_params_M": round(params(net), 2)}
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        a, b = timed_pair(ours(model, args.batch, args.text, args.steps, args.cfg, bf16),
                          peer_loop(fn, args.batch, c.in_channels, c.sample_size, args.text, c.cond_dim, args.steps,
                                    args.cfg, bf16), args.repeats)
        row.update({f"ours_{tag}_s": round(a, 3), f"peer_{tag}_s": round(b, 3), f"ratio_{tag}": round(a / b, 3)})
    row["ours_bf16_speedup"] = round(row["ours_fp32_s"] / row["ours_bf16_s"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet", default="unet-xs")
    ap.add_argument("--dit", default="dit-xs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text", type=int, default=16, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [compare(args.unet, build(args.unet).eval(), diffusers_unet, args)]
    if args.dit:
        rows.append(compare(args.dit, build(args.dit).eval(), diffusers_pixart, args))
    print(json.dumps({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
