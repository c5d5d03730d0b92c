"""aMUSEd-256 end to end at the real size: Tessera's pipeline vs diffusers' AmusedPipeline, both loaded in one
process from the same diffusers folder, calls alternating (a ratio, since this machine is noisy).

The folder holds random weights of the true shapes (speed does not depend on the values), stored in bf16:
the 603.5 M U-ViT (UVit2DModel defaults, sample_size 16: 16x16 tokens), the 146 M VQ model (f16, 8192 codes,
REFERENCE 2.4), a CLIP-L-shaped CLIPTextModelWithProjection and AmusedScheduler; 256x256, 12 steps,
guidance 10 (the pipeline defaults). Each side loads it in bf16 (diffusers: torch_dtype=bfloat16, its best CPU
setting; Tessera: tessera.load(DIR, dtype="bfloat16")) and times per call: the text encoder, every
transformer call, the VQ decode and the whole call (median of --calls after a warm-up call).

    .venv/bin/python benchmarks/bench_amused.py [--calls 3] [--folder DIR] [--steps 12]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sd_pipeline import _timer  # noqa: E402


def make_folder(out: Path) -> None:
    import diffusers
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # a byte-level CLIP vocabulary (the real one is not here)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=768,
                                                      intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, projection_dim=768))
    uvit = diffusers.UVit2DModel(sample_size=16)
    vq = diffusers.VQModel(block_out_channels=(128, 256, 256, 512, 768), down_block_types=("DownEncoderBlock2D",) * 5,
                           up_block_types=("UpDecoderBlock2D",) * 5, latent_channels=64, num_vq_embeddings=8192,
                           vq_embed_dim=64, layers_per_block=2, norm_num_groups=32, mid_block_add_attention=False,
                           lookup_from_codebook=True, force_upcast=False)
    pipe = diffusers.AmusedPipeline(vqvae=vq, tokenizer=tokenizer, text_encoder=text, transformer=uvit,
                                    scheduler=diffusers.AmusedScheduler(mask_token_id=8255))
    pipe.to(torch.bfloat16).save_pretrained(out)


def load_side(side: str, folder: Path):
    """-> (pipe, {stage: bucket}) with the stage timers in place."""
    buckets = {"text": [], "transformer": [], "decode": []}
    if side == "diffusers":
        import diffusers

        pipe = diffusers.AmusedPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        _timer(pipe.text_encoder, "forward", buckets["text"])
        _timer(pipe.transformer, "forward", buckets["transformer"])
        _timer(pipe.vqvae, "decode", buckets["decode"])
    else:
        import tessera

        pipe = tessera.load(str(folder), dtype="bfloat16")
        _timer(pipe.text_encoder.model, "forward", buckets["text"])
        _timer(pipe.generator, "forward", buckets["transformer"])
        _timer(pipe.tokenizer, "decode_tokens", buckets["decode"])
    return pipe, buckets


def timed_call(pipe, buckets: dict, steps: int) -> dict:
    for b in buckets.values():
        b.clear()
    t = time.perf_counter()
    with torch.no_grad():
        pipe("a lake between mountains at sunset", num_inference_steps=steps, guidance_scale=10.0,
             generator=torch.Generator("cpu").manual_seed(11), height=256, width=256)
    return {"total": time.perf_counter() - t, **{k: sum(v) for k, v in buckets.items()},
            "calls": len(buckets["transformer"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, default=Path("/tmp/tessera-bench-amused256"))
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    if not (args.folder / "model_index.json").is_file():
        t0 = time.perf_counter()
        make_folder(args.folder)
        print(f"made {args.folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    torch.set_num_threads(2)
    sides = {side: load_side(side, args.folder) for side in ("diffusers", "tessera")}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.calls + 1):  # the first round warms up both
        for side, (pipe, buckets) in sides.items():
            run = timed_call(pipe, buckets, args.steps)
            if i:
                runs[side].append(run)
    print(f"aMUSEd-256: 256x256, {args.steps} steps, guidance 10, bf16, 2 threads, one process, alternating; "
          f"median of {args.calls} call(s) each after a warm-up")
    print("| stage | diffusers s | Tessera s | diffusers / Tessera |")
    print("| --- | --- | --- | --- |")
    for key in ("text", "transformer", "decode", "total"):
        r, o = (statistics.median(x[key] for x in runs[s]) for s in ("diffusers", "tessera"))
        label = f"transformer ({runs['tessera'][0]['calls']} calls)" if key == "transformer" else key
        print(f"| {label} | {r:.3f} | {o:.3f} | {r / o:.2f}x |")


if __name__ == "__main__":
    main()
