"""Text -> latents -> image with a diffusion denoiser: prompt encoder, DDIM/DDPM with CFG (optionally
against a negative prompt), latents unscaled and decoded by the tokenizer (or pixels directly)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from PIL import Image

from tessera.data.dataset import to_pil
from tessera.pipelines import prompt_batch
from tessera.sampling.diffusion import DiffusionConfig, Schedule, guided_denoiser, sample


@dataclasses.dataclass
class DiffusionSampleParams:
    seed: int = 0
    n: int = 1
    steps: int = 20
    cfg_scale: float = 5.0
    method: str = "ddim"          # ddim | ddpm
    eta: float = 0.0
    negative_prompt: str = ""
    bf16: bool = True
    noise_seeds: list | None = None  # [[seed, rows], ...]: x_T drawn per block (requests batched together)


class DiffusionPipeline:
    """`denoiser` is an exported diffusion network; its meta.json `task` holds the process (schedule,
    prediction), the space (latent | pixel) and the latent scale it was trained with."""

    def __init__(self, denoiser, tokenizer=None, text_encoder=None):
        task = getattr(denoiser, "meta", {}).get("task")
        if task is None:
            raise ValueError("the denoiser has no training metadata (meta.json 'task'); export it with `tessera export`")
        self.denoiser, self.text_encoder = denoiser.eval(), text_encoder
        self.schedule = Schedule(DiffusionConfig.from_dict(task["diffusion"]))
        self.space, self.scale = task["space"], float(task["latent_scale"])
        self.tokenizer = tokenizer.eval() if tokenizer is not None else None
        cfg = denoiser.config
        if self.space == "latent" and tokenizer is None:
            raise ValueError("a latent-space denoiser needs its tokenizer to decode")
        if cfg.conditional and (text_encoder is None or text_encoder.dim != cfg.cond_dim):
            raise ValueError(f"the denoiser expects a {cfg.cond_dim}-d prompt encoder")

    def _encode(self, prompts: list[str]):
        enc = self.text_encoder.encode(prompts)
        return enc.tokens, enc.mask

    def _noise(self, n: int, p: DiffusionSampleParams, g: torch.Generator) -> torch.Tensor:
        """x_T [n,C,H,W]: from `g`, or per [seed, rows] block of `p.noise_seeds` (each block equals what
        that seed draws alone, so a request batched with others starts from its own noise)."""
        cfg = self.denoiser.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if not p.noise_seeds:
            return torch.randn((n, *shape), generator=g)
        if sum(rows for _, rows in p.noise_seeds) != n:
            raise ValueError(f"noise_seeds={p.noise_seeds}: the rows must add up to the batch's {n} images")
        return torch.cat([torch.randn((rows, *shape), generator=torch.Generator().manual_seed(int(seed)))
                          for seed, rows in p.noise_seeds])

    @torch.no_grad()
    def latents(self, prompt: str | list[str], p: DiffusionSampleParams,
                callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """-> x_0 [n,C,H,W]; a list of prompts draws one image per prompt."""
        cfg = self.denoiser.config
        prompts = prompt_batch(prompt, p.n)
        n = len(prompts)
        g = torch.Generator().manual_seed(p.seed)
        x_T = self._noise(n, p, g)
        cond = mask = neg = neg_mask = None
        if cfg.conditional:
            cond, mask = self._encode(prompts)
            if p.negative_prompt:
                neg, neg_mask = self._encode([p.negative_prompt] * n)
        fn = guided_denoiser(self.denoiser, cond, mask, p.cfg_scale, neg, neg_mask)

        def fp32_out(x, t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.bf16):
                return fn(x, t).float()

        return sample(fp32_out, self.schedule, x_T, p.steps, p.method, p.eta, generator=g, callback=callback)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], p: DiffusionSampleParams, callback=None) -> list[Image.Image]:
        x0 = self.latents(prompt, p, callback)
        if self.space == "latent":
            images = self.tokenizer.decode_latents(x0 / self.scale, quantize=True)
        else:
            images = x0
        return [to_pil(x) for x in images.float().clamp(-1, 1)]


def load_diffusion_pipeline(model: str, tokenizer: str | None = None, text_encoder: str = "minilm"):
    """A pipeline for an exported denoiser (folder or bundled preset), with the tokenizer it was trained
    with unless another is named. Returns (pipeline, tokenizer name or None in pixel space)."""
    from tessera.pipelines.load import load_pipeline

    loaded = load_pipeline(model, tokenizer, text_encoder)
    if loaded.kind != "diffusion":
        raise ValueError(f"{model} is a {loaded.kind} generator, not a diffusion denoiser")
    return loaded.pipe, loaded.models.get("tokenizer", {}).get("name")
