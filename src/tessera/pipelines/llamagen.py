"""LlamaGen class-to-image (Sun et al. 2024): a folder holding a released GPT (`c2i_{B,L,XL}_{256,384}.pt`) and
its VQ tokenizer (`vq_ds16_c2i.pt`), read as tensors only into Tessera's LlamaGenGPT and LlamaGenVQ, sampled by
sampling/ar.py with the KV cache and classifier-free guidance by batch duplication (the null class):

    pipe = tessera.load(DIR)        # or LlamaGenPipeline.from_release(gpt_file, vq_file)
    pipe(class_label=207, num_images_per_prompt=2, guidance_scale=4.0, top_k=2000,
         generator=torch.Generator().manual_seed(0)).images

Defaults are the release's (`sample_c2i.py`): guidance 4.0, top-k 2000, temperature 1.0.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from tessera.errors import InvalidInputError, ModelNotFoundError
from tessera.pipelines.base import LIMITS, PipelineOutput, to_images

SIZES = {"B": dict(n_layer=12, n_head=12, dim=768), "L": dict(n_layer=24, n_head=16, dim=1024),
         "XL": dict(n_layer=36, n_head=20, dim=1280), "XXL": dict(n_layer=48, n_head=24, dim=1536)}
GPT_FILE = re.compile(r"^c2i_(B|L|XL|XXL)_(256|384)\.pt$")
VQ_FILE = "vq_ds16_c2i.pt"


def release_files(folder: str | Path) -> tuple[Path, Path, str, int] | None:
    """(gpt file, vq file, size name, image size) when `folder` holds one LlamaGen c2i release, else None."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / VQ_FILE).is_file():
        return None
    found = [(f, GPT_FILE.match(f.name)) for f in sorted(folder.iterdir())]
    found = [(f, m) for f, m in found if m]
    if len(found) != 1:
        return None
    (gpt, m), = found
    return gpt, folder / VQ_FILE, m[1], int(m[2])


class LlamaGenPipeline:
    def __init__(self, gpt, vq):
        self.gpt, self.vq = gpt.eval(), vq.eval()
        self.grid = math.isqrt(gpt.config.block_size)

    @property
    def native_size(self) -> int:
        return self.grid * self.vq.factor

    def set_speed(self, int8: bool = False, compile: bool = False):
        """The decode-step options (benchmarks/bench_llamagen.py measures them): `int8` swaps the GPT's linear
        layers for int8 weight-only ones (nn/quant.py: half the weight bytes per token; lossy, so the tokens
        differ from bf16's; irreversible: reload to undo); `compile` compiles the one-token step."""
        if int8:
            from tessera.nn.quant import quantize_int8

            self.gpt.to(torch.bfloat16)  # the int8 kernel's input dtype
            quantize_int8(self.gpt)
        self.gpt.compile_step(compile)
        return self

    @classmethod
    def from_release(cls, gpt_file: str | Path, vq_file: str | Path, size: str = "B", image_size: int = 256,
                     dtype: torch.dtype = torch.float32, **gpt_config):
        from tessera.checkpoint import load_strict, on_meta, read_pickled_state
        from tessera.generators.llamagen import LlamaGenConfig, LlamaGenGPT
        from tessera.tokenizer.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

        if size not in SIZES:
            raise InvalidInputError(f"size={size!r}: LlamaGen's GPT sizes are {sorted(SIZES)}")
        vq_cfg = LlamaGenVQConfig(**gpt_config.pop("vq", {}))
        grid = image_size // vq_cfg.factor
        cfg = LlamaGenConfig(**{**SIZES[size], "block_size": grid * grid, **gpt_config})
        gpt = load_strict(LlamaGenGPT(cfg), read_pickled_state(gpt_file), Path(gpt_file), dtype)
        vq = load_strict(on_meta(lambda: LlamaGenVQ(vq_cfg)), read_pickled_state(vq_file), Path(vq_file), dtype)
        return cls(gpt, vq)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32, **config):
        found = release_files(folder)
        if found is None:
            raise ModelNotFoundError(f"{folder}: not a LlamaGen release folder (one c2i_<size>_<256|384>.pt and "
                                     f"{VQ_FILE})")
        gpt, vq, size, image_size = found
        return cls.from_release(gpt, vq, size, image_size, dtype, **config)

    @torch.no_grad()
    def __call__(self, class_label: int, num_images_per_prompt: int = 1, guidance_scale: float = 4.0,
                 top_k: int = 2000, top_p: float = 1.0, temperature: float = 1.0, cfg_interval: int = -1,
                 generator: torch.Generator | None = None, output_type: str = "pil", callback=None) -> PipelineOutput:
        from tessera.sampling.ar import prefix_logits_fn, sample

        n_classes = self.gpt.config.num_classes
        if not 0 <= class_label < n_classes:
            raise InvalidInputError(f"class_label={class_label}: must be in [0, {n_classes})")
        if not 1 <= num_images_per_prompt <= LIMITS.max_n:
            raise InvalidInputError(f"num_images_per_prompt={num_images_per_prompt}: must be 1 to {LIMITS.max_n}")
        if not 0 <= guidance_scale <= LIMITS.max_cfg_scale:
            raise InvalidInputError(f"guidance_scale={guidance_scale}: must be between 0 and {LIMITS.max_cfg_scale}")
        n = num_images_per_prompt
        labels = torch.full((n,), class_label, dtype=torch.long)
        null = torch.full((n,), self.gpt.null_class, dtype=torch.long) if guidance_scale != 1.0 else None
        g = generator or torch.Generator().manual_seed(0)
        tokens = sample(prefix_logits_fn(self.gpt, labels, null), n, self.grid * self.grid, generator=g,
                        temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=guidance_scale,
                        cfg_interval=cfg_interval, callback=callback)
        images = self.vq.decode_tokens(tokens.reshape(n, self.grid, self.grid)).float().clamp(-1, 1)
        return PipelineOutput(to_images(images, output_type), {
            "class_label": class_label, "guidance_scale": guidance_scale, "top_k": top_k, "top_p": top_p,
            "temperature": temperature, "seed": g.initial_seed(), "tokens": tokens})
