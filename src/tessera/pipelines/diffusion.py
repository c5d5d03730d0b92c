"""Text -> latents -> image with a diffusion denoiser: prompt encoder, DDIM/DDPM with CFG (optionally
against a negative prompt), latents unscaled and decoded by the tokenizer (or pixels directly).

The noise schedule (the scheduler) and the latent scale belong to the pipeline (model_index.json /
scheduler/ of a pipeline folder), not to the denoiser: the same network can be sampled under another."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from tessera.errors import InvalidInputError, WrongModelError
from tessera.pipelines.base import Pipeline, check_limits
from tessera.sampling.diffusion import METHODS, DiffusionConfig, Schedule, guided_denoiser, sample


@dataclasses.dataclass
class DiffusionSampleParams:
    seed: int = 0
    n: int = 1
    steps: int = 20
    cfg_scale: float = 5.0
    method: str = "ddim"          # ddim | ddpm
    eta: float = 0.0
    negative_prompt: str = ""
    noise_seeds: list | None = None  # [[seed, rows], ...]: x_T drawn per block (requests batched together)

    def validate(self) -> None:
        check_limits(self)
        if self.method not in METHODS:
            raise InvalidInputError(f"method={self.method!r}: must be one of {METHODS}")


def initial_noise(shape: tuple[int, ...], p: DiffusionSampleParams, g: torch.Generator) -> torch.Tensor:
    """x_T of `shape` [n,C,H,W]: from `g`, or per [seed, rows] block of `p.noise_seeds` (each block equals what
    that seed draws alone, so a request batched with others starts from its own noise)."""
    if not p.noise_seeds:
        return torch.randn(shape, generator=g)
    if sum(rows for _, rows in p.noise_seeds) != shape[0]:
        raise InvalidInputError(f"noise_seeds={p.noise_seeds}: the rows must add up to the batch's {shape[0]} images")
    return torch.cat([torch.randn((rows, *shape[1:]), generator=torch.Generator().manual_seed(int(seed)))
                      for seed, rows in p.noise_seeds])


class DiffusionPipeline(Pipeline):
    paradigm = "diffusion"
    Params = DiffusionSampleParams
    CALL_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "negative_prompt": "negative_prompt"}

    def __init__(self, denoiser, tokenizer=None, text_encoder=None, *, scheduler: DiffusionConfig,
                 latent_scale: float = 1.0, space: str = "latent", **kw):
        cfg = denoiser.config
        if space not in ("latent", "pixel"):
            raise InvalidInputError(f"space={space!r}: must be 'latent' or 'pixel'")
        if space == "latent" and tokenizer is None:
            raise InvalidInputError("a latent-space denoiser needs its tokenizer to decode")
        if cfg.conditional and (text_encoder is None or text_encoder.dim != cfg.cond_dim):
            raise WrongModelError(f"the denoiser expects a {cfg.cond_dim}-d prompt encoder")
        self.scheduler, self.space, self.scale = scheduler, space, float(latent_scale)
        self.schedule = Schedule(scheduler)
        super().__init__(denoiser, tokenizer if space == "latent" else None, text_encoder, **kw)

    @property
    def denoiser(self):
        return self.generator

    @property
    def native_size(self) -> int:
        factor = self.tokenizer.factor if self.space == "latent" else 1
        return self.generator.config.sample_size * factor

    def _noise(self, n: int, p: DiffusionSampleParams, g: torch.Generator) -> torch.Tensor:
        cfg = self.generator.config
        return initial_noise((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), p, g)

    @torch.no_grad()
    def generate(self, prompts: list[str], p: DiffusionSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """-> x_0 [n,C,H,W], one per prompt; `latents` is x_T (default: drawn from the generator / seed)."""
        p.validate()
        n = len(prompts)
        g = generator or torch.Generator().manual_seed(p.seed)
        x_T = self._noise(n, p, g) if latents is None else latents.float().cpu()
        if x_T.shape[0] != n:
            raise InvalidInputError(f"latents: {x_T.shape[0]} rows for {n} images")
        cond, mask = self.encode_prompt(prompts)
        neg = neg_mask = None
        if cond is not None and p.negative_prompt:
            neg, neg_mask = self.encode_prompt([p.negative_prompt] * n)
        fn = guided_denoiser(self.generator, cond, mask, p.cfg_scale, neg, neg_mask)

        def fp32_out(x, t):
            with self.placement.autocast():
                return fn(x.to(self.device), t.to(self.device)).float().cpu()

        return sample(fp32_out, self.schedule, x_T, p.steps, p.method, p.eta, generator=g, callback=callback)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        if self.space == "pixel":
            return x0.float().clamp(-1, 1)
        with self.placement.autocast():
            return self.tokenizer.decode_latents(x0.to(self.device) / self.scale).float().clamp(-1, 1)
