"""`tessera generate`: prompt -> image at the size asked for, with the bundled defaults. The generator
(the bundled unet-xs latent diffusion model, or any denoiser folder) draws at its native 128 px, the
fast super-resolution cascade (sr-compact-x4 / -x2) enlarges to exactly `size`. The safety checks and
the other generator kinds join this pipeline in the serving issue."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

from PIL import Image

from tessera.pipelines.diffusion import DiffusionSampleParams, load_diffusion_pipeline


@dataclasses.dataclass
class GenerateParams:
    model: str = "unet-xs"
    size: int = 512                # output side; 0 = the generator's own size
    sr_model: str = "fast"
    sample: DiffusionSampleParams = dataclasses.field(default_factory=DiffusionSampleParams)


def generate(prompt: str, p: GenerateParams, callback: Callable[[int, int], None] | None = None
             ) -> tuple[Image.Image, dict]:
    """One image and a record of every setting plus per-stage seconds."""
    from tessera.superres.cascade import load_sr_models, upscale

    if p.size < 0:
        raise ValueError(f"size={p.size} must be >= 0 (0: the generator's own size)")
    t0 = time.perf_counter()
    pipe, tokenizer = load_diffusion_pipeline(p.model)
    t1 = time.perf_counter()
    image = pipe(prompt, dataclasses.replace(p.sample, n=1), callback)[0]
    t2 = time.perf_counter()
    if p.size and p.size != image.width:
        image = upscale(image, (p.size, p.size), load_sr_models(p.sr_model), bf16=p.sample.bf16)
    t3 = time.perf_counter()
    record = {"model": p.model, "tokenizer": tokenizer, "size": image.width, "sr_model": p.sr_model,
              **dataclasses.asdict(p.sample), "n": 1,
              "seconds": {"load": round(t1 - t0, 3), "generate": round(t2 - t1, 3), "upscale": round(t3 - t2, 3)}}
    return image, record
