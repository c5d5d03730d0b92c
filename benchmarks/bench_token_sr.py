"""Muse's token super-resolution stage vs pixel super-resolution, on held-out captions (issue 22, section 4).

For each held-out caption of a prepared 256² folder, the base masked pipeline (default: the bundled
masked-xxs, 16x16 vq-f8 tokens = 128²) draws ONE token grid (seeded per caption); then three ways to 256²:

    token SR   the masked-sr model decodes the 32x32 grid from it and the caption (`--sr-steps` steps),
               the tokenizer decodes that at 256²
    fast SR    the tokenizer decodes the 16x16 grid at 128², the bundled perceptual x2 (sr-perceptual-x2) doubles it
    bicubic    the 128² decode, bicubic x2 (the floor)

measured against the held-out real images at 256² (Fréchet distance and KID in the open_nsfw feature
space, named in the output: not Inception), for alignment with the caption (CLIPScore and R-precision
under the bundled clip-xs), and in seconds per image for the upscaling part (after the shared base draw).

    .venv/bin/python benchmarks/bench_token_sr.py --data data/demo256 --sr models/masked-sr [--limit 64]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared folder of 256² images with captions")
    ap.add_argument("--sr", required=True, help="the masked-sr model folder")
    ap.add_argument("--base", default="masked", help="the base masked pipeline / generator (default: bundled)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--steps", type=int, default=12, help="base decoding steps")
    ap.add_argument("--sr-steps", type=int, default=8)
    ap.add_argument("--sr-cfg", type=float, default=1.0)
    ap.add_argument("--sr-temperature", type=float, default=1.0, help="the SR stage's sampling temperature")
    ap.add_argument("--sr-choice-temperature", type=float, default=4.5, help="its Gumbel noise on confidences")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from tessera.checkpoint import load_model
    from tessera.data.dataset import ShardImages
    from tessera.eval.clipscore import load_image_text_model
    from tessera.eval.frechet import OPEN_NSFW_SPACE, open_nsfw_pooled
    from tessera.eval.paradigms import _alignment, _distances
    from tessera.pipelines.base import to_images
    from tessera.pipelines.folder import load_pipeline
    from tessera.superres.cascade import load_sr_models, upscale
    from tessera.tokenizer.perceptual import load_open_nsfw

    ds = ShardImages(args.data, args.split)
    idx = [i for i, c in enumerate(ds.captions) if c.strip()][: args.limit]
    prompts, real = [ds.captions[i] for i in idx], [ds.image(i) for i in idx]
    pipe = load_pipeline(args.base, paradigm="masked")
    sr_model = load_model(args.sr)
    pipe.set_token_sr(sr_model)
    sr_models = load_sr_models("fast")
    size = sr_model.config.grid[0] * pipe.tokenizer.factor
    images: dict[str, list[Image.Image]] = {"token SR": [], "fast SR": [], "bicubic": []}
    seconds: dict[str, float] = {k: 0.0 for k in images}
    base_s = 0.0
    for s in range(0, len(prompts), args.batch):
        batch = prompts[s:s + args.batch]
        p = pipe.params(steps=args.steps, sr_steps=0, sr_cfg_scale=args.sr_cfg, n=len(batch), seed=s)
        t = time.perf_counter()
        low = pipe.generate(batch, p, generator=torch.Generator().manual_seed(s))  # (b, 16, 16)
        base_s += time.perf_counter() - t
        t = time.perf_counter()
        cond, mask = pipe.encode_prompt(batch)
        sr_p = pipe.params(sr_steps=args.sr_steps, sr_cfg_scale=args.sr_cfg, temperature=args.sr_temperature,
                           choice_temperature=args.sr_choice_temperature)
        high = pipe.upsample_tokens(low, cond, mask, sr_p, torch.Generator().manual_seed(10_000 + s))
        images["token SR"] += to_images(pipe.decode(high))
        seconds["token SR"] += time.perf_counter() - t
        t = time.perf_counter()
        small = to_images(pipe.decode(low))
        decode_s = time.perf_counter() - t
        t = time.perf_counter()
        images["fast SR"] += [upscale(im, (size, size), sr_models) for im in small]
        seconds["fast SR"] += decode_s + time.perf_counter() - t
        t = time.perf_counter()
        images["bicubic"] += [im.resize((size, size), Image.Resampling.BICUBIC) for im in small]
        seconds["bicubic"] += decode_s + time.perf_counter() - t
        print(f"{s + len(batch)}/{len(prompts)}", flush=True)
    net, scorer = load_open_nsfw(), load_image_text_model("clip-xs")
    real_feats = open_nsfw_pooled(real, net)
    rows = [{"method": "real held-out images", **_alignment(scorer, real, prompts)}]
    for name, ims in images.items():
        rows.append({"method": name, **_distances(real_feats, open_nsfw_pooled(ims, net)),
                     **_alignment(scorer, ims, prompts), "seconds_per_image": seconds[name] / len(prompts)})
    print(json.dumps({"images": len(prompts), "base_seconds_per_image": base_s / len(prompts),
                      "feature_space": OPEN_NSFW_SPACE, "alignment_model": scorer.space, "rows": rows}, indent=1))
    print(f"\n{len(prompts)} held-out captions of {args.data} ({args.split}); base {args.base} {args.steps} steps "
          f"({base_s / len(prompts):.3f} s / image, shared); token SR {args.sr_steps} steps, guidance {args.sr_cfg}, "
          f"temperature {args.sr_temperature}, choice temperature {args.sr_choice_temperature}")
    print("| 128² -> 256² | FD | KID | CLIPScore | R-precision | s / image (upscaling) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fd = f"{r['fd']:.1f} | {r['kid']:.4f}" if "fd" in r else "- | -"
        sec = f"{r['seconds_per_image']:.3f}" if "seconds_per_image" in r else "-"
        print(f"| {r['method']} | {fd} | {r['clipscore']:.2f} ± {r['clipscore_sem']:.2f} | {r['r_precision']:.3f} | "
              f"{sec} |")


if __name__ == "__main__":
    main()
