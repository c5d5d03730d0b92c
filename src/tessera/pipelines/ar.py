"""Text -> tokens -> image with the AR generator: prompt encoder, KV-cached sampler with CFG, tokenizer decode."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from tessera.errors import InvalidInputError, WrongModelError
from tessera.pipelines.base import Pipeline, check_limits
from tessera.sampling.ar import cached_logits_fn, sample


@dataclasses.dataclass
class ARSampleParams:
    seed: int = 0
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 3.0
    cfg_interval: int = -1

    def validate(self) -> None:
        check_limits(self)
        if not 0 < self.temperature:
            raise InvalidInputError(f"temperature={self.temperature}: must be > 0")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k={self.top_k}: must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p={self.top_p}: must be in (0, 1] (1: off)")


class ARPipeline(Pipeline):
    paradigm = "ar"
    Params = ARSampleParams
    CALL_NAMES = {"guidance_scale": "cfg_scale"}  # one step per token: no num_inference_steps

    def __init__(self, generator, tokenizer, text_encoder=None, **kw):
        cfg = generator.config
        if cfg.vocab_size != tokenizer.config.codebook_size:
            raise WrongModelError(f"generator vocabulary {cfg.vocab_size} != tokenizer codebook "
                                  f"{tokenizer.config.codebook_size}: they were not trained together")
        if cfg.conditional and text_encoder is None:
            raise InvalidInputError("a text-conditioned generator needs a text encoder")
        if text_encoder is not None and cfg.conditional and text_encoder.dim != cfg.cond_dim:
            raise WrongModelError(f"text encoder is {text_encoder.dim}-d, generator expects {cfg.cond_dim}")
        super().__init__(generator, tokenizer, text_encoder, **kw)

    @property
    def native_size(self) -> int:
        return self.generator.config.grid[0] * self.tokenizer.factor

    @torch.no_grad()
    def generate(self, prompts: list[str], p: ARSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """-> token grids [n,h,w], one per prompt."""
        if latents is not None:
            raise InvalidInputError("latents: the AR paradigm draws its tokens one by one (no initial latents)")
        p.validate()
        cfg = self.generator.config
        n = len(prompts)
        g = generator or torch.Generator().manual_seed(p.seed)
        guided = cfg.conditional and p.cfg_scale != 1.0
        cond, mask = self.encode_prompt(prompts)
        first = None
        if not cfg.conditional:
            first = torch.randint(0, cfg.vocab_size, (n,), generator=g).to(self.device)  # seed 000: random first token
        with self.placement.autocast():
            fn = cached_logits_fn(self.generator, n, cond, mask, guided)
            toks = sample(fn, n, cfg.num_tokens, generator=g, temperature=p.temperature, top_k=p.top_k,
                          top_p=p.top_p, cfg_scale=p.cfg_scale if guided else 1.0, cfg_interval=p.cfg_interval,
                          first_tokens=first, callback=callback, device=self.device)
        return toks.view(n, *cfg.grid)  # (n, h, w)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.placement.autocast():
            return self.tokenizer.decode_tokens(tokens.to(self.device)).float().clamp(-1, 1)
