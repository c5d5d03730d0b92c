"""LlamaGen class-to-image (Sun et al. 2024): a folder holding a released GPT (`c2i_{B,L,XL}_{256,384}.pt`) and
its VQ tokenizer (`vq_ds16_c2i.pt`), read as tensors only into Tessera's LlamaGenGPT and LlamaGenVQ, sampled by
sampling/ar.py with the KV cache and classifier-free guidance by batch duplication (the null class):

    pipe = tessera.load(DIR)        # or LlamaGenPipeline.from_release(gpt_file, vq_file)
    pipe(class_label=207, num_images_per_prompt=2, guidance_scale=4.0, top_k=2000,
         generator=torch.Generator().manual_seed(0)).images
    tessera generate "a dog" --model DIR --class-label 207   (the whole system; the prompt is not read)

Defaults are the release's (`sample_c2i.py`): guidance 4.0, top-k 2000, temperature 1.0.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from tessera.errors import InvalidInputError, ModelNotFoundError
from tessera.pipelines.base import Pipeline, check_limits, class_labels

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


@dataclasses.dataclass
class ClassSampleParams:
    """A class-to-image draw (the release's `sample_c2i.py` defaults: guidance 4.0, top-k 2000)."""

    seed: int = 0
    n: int = 1
    class_label: int | None = None
    cfg_scale: float = 4.0
    temperature: float = 1.0
    top_k: int = 2000
    top_p: float = 1.0
    cfg_interval: int = -1   # guide only the first K tokens (-1: all)

    def validate(self) -> None:
        check_limits(self)
        if not 0 < self.temperature <= 5:
            raise InvalidInputError(f"temperature={self.temperature}: must be in (0, 5]")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_k={self.top_k}, top_p={self.top_p}: top_k >= 0 (0: off), top_p in (0, 1]")


class LlamaGenPipeline(Pipeline):
    """The autoregressive paradigm's pipeline for a LlamaGen release: the class label (not the prompt)
    conditions it, so `tessera generate --model DIR --class-label N` and the HTTP `class_label` field."""

    paradigm = "ar"
    Params = ClassSampleParams

    def __init__(self, gpt, vq, **kw):
        self.grid = math.isqrt(gpt.config.block_size)
        super().__init__(gpt, vq, **kw)

    @property
    def gpt(self):
        return self.generator

    @property
    def vq(self):
        return self.tokenizer

    @property
    def native_size(self) -> int:
        return self.grid * self.vq.factor

    def too_long(self, prompts: list[str], batch: int = 64) -> list[str | None]:
        return [None] * len(prompts)  # the prompt is not read

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

    @torch.no_grad()
    def generate(self, prompts: list[str], p: ClassSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """-> token grids [n, grid, grid] of class `p.class_label`, guided by the null class when cfg != 1."""
        from tessera.sampling.ar import prefix_logits_fn, sample

        p.validate()
        if latents is not None:
            raise InvalidInputError("latents: an autoregressive draw starts from its condition alone")
        n = len(prompts)
        labels = class_labels(p.class_label, self.gpt.config.num_classes, n).to(self.device)
        null = torch.full_like(labels, self.gpt.null_class) if p.cfg_scale != 1.0 else None
        g = generator or torch.Generator().manual_seed(p.seed)
        tokens = sample(prefix_logits_fn(self.gpt, labels, null), n, self.grid * self.grid, generator=g,
                        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, cfg_scale=p.cfg_scale,
                        cfg_interval=p.cfg_interval, callback=callback)
        return tokens.reshape(n, self.grid, self.grid)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_tokens(tokens.to(self.device)).float().clamp(-1, 1)

    @classmethod
    def from_release(cls, gpt_file: str | Path, vq_file: str | Path, size: str = "B", image_size: int = 256,
                     dtype: torch.dtype = torch.float32, device=None, **gpt_config):
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
        return cls(gpt, vq, device=device)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device=None, **config):
        found = release_files(folder)
        if found is None:
            raise ModelNotFoundError(f"{folder}: not a LlamaGen release folder (one c2i_<size>_<256|384>.pt and "
                                     f"{VQ_FILE})")
        gpt, vq, size, image_size = found
        return cls.from_release(gpt, vq, size, image_size, dtype, device, **config)
