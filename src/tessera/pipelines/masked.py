"""Text -> tokens -> image with the masked generator: prompt encoder, iterative parallel decoding with
CFG, tokenizer decode; inpainting / outpainting by fixing the tokens of the known image region.

With a token super-resolution stage (`token_sr`: generators/masked_sr.py, Muse's section 3.3) the base
grid (16x16 for 128²) is decoded by that second masked transformer into the grid of twice the size
(32x32, 256²) before the tokenizer decodes it: `sr_steps` parallel-decoding steps of its own, guided by
the same prompt (`sr_cfg_scale`); `sr_steps=0` decodes the base grid as it is."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from PIL import Image

from tessera.data.dataset import to_tensor
from tessera.errors import InvalidInputError, WrongModelError
from tessera.pipelines.base import Pipeline, check_limits, prompt_batch, to_images
from tessera.sampling.masked import guided_logits_fn, sample


@dataclasses.dataclass
class MaskedSampleParams:
    seed: int = 0
    n: int = 1
    steps: int = 12
    temperature: float = 1.0
    choice_temperature: float = 4.5
    cfg_scale: float = 3.0
    sr_steps: int = 8          # the token super-resolution stage's steps (when the pipeline has one; 0: off)
    sr_cfg_scale: float = 1.0

    def validate(self) -> None:
        check_limits(self)
        if not 0 < self.temperature:
            raise InvalidInputError(f"temperature={self.temperature}: must be > 0")
        if not 0 <= self.sr_steps <= 64 or not 0 <= self.sr_cfg_scale <= 30:
            raise InvalidInputError(f"sr_steps={self.sr_steps}, sr_cfg_scale={self.sr_cfg_scale}: steps in [0, 64], "
                                    f"guidance in [0, 30]")


class MaskedPipeline(Pipeline):
    paradigm = "masked"
    Params = MaskedSampleParams

    def __init__(self, generator, tokenizer, text_encoder=None, token_sr=None, **kw):
        cfg = generator.config
        if cfg.vocab_size != tokenizer.config.codebook_size:
            raise WrongModelError(f"generator vocabulary {cfg.vocab_size} != tokenizer codebook "
                                  f"{tokenizer.config.codebook_size}")
        if cfg.conditional and (text_encoder is None or text_encoder.dim != cfg.cond_dim):
            raise WrongModelError(f"the generator expects a {cfg.cond_dim}-d prompt encoder")
        self.token_sr = None
        super().__init__(generator, tokenizer, text_encoder, **kw)
        if token_sr is not None:
            self.set_token_sr(token_sr)

    def set_token_sr(self, model) -> None:
        """Decode through `model` (a masked-sr model; None: without a token SR stage) from now on."""
        if model is not None:
            cfg, sr = self.generator.config, model.config
            if getattr(model, "kind", None) != "masked-sr":
                raise WrongModelError(f"a {getattr(model, 'kind', type(model).__name__)!r} model is not a token "
                                      f"super-resolution stage (masked-sr)")
            if sr.vocab_size != cfg.vocab_size or tuple(sr.low_grid) != tuple(cfg.grid) or sr.cond_dim != cfg.cond_dim:
                raise WrongModelError(f"the token SR stage reads {sr.low_grid} grids of {sr.vocab_size} codes with "
                                      f"{sr.cond_dim}-d prompts; the generator makes {cfg.grid} grids of "
                                      f"{cfg.vocab_size} codes with {cfg.cond_dim}-d prompts")
            model = model.eval().to(self.device)
        self.token_sr = model

    def to(self, device=None, dtype=None):
        super().to(device, dtype)
        if self.token_sr is not None:
            self.token_sr.to(self.device)
        return self

    @property
    def components(self) -> dict:
        return {**super().components, "token_sr": self.token_sr}

    @property
    def native_size(self) -> int:
        grid = (self.token_sr or self.generator).config.grid
        return grid[0] * self.tokenizer.factor

    @torch.no_grad()
    def generate(self, prompts: list[str], p: MaskedSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback: Callable[[int, int], None] | None = None,
                 known: torch.Tensor | None = None) -> torch.Tensor:
        """-> token grids [n,h,w], one per prompt. `known` [h,w] token ids with -1 where unknown (None:
        generate everything); `latents` [n,h,w] starting ids (mask_id where unknown) instead."""
        p.validate()
        cfg = self.generator.config
        n = len(prompts)
        start = torch.full((n, cfg.num_tokens), cfg.mask_id, dtype=torch.long)
        if latents is not None:
            if latents.shape[0] != n or latents[0].numel() != cfg.num_tokens:
                raise InvalidInputError(f"latents: expected {n} token grids of {cfg.grid}, got {tuple(latents.shape)}")
            start = latents.reshape(n, -1).long().cpu()
        if known is not None:
            flat = known.reshape(-1).cpu()
            start = torch.where(flat >= 0, flat, start)  # (n, N)
        cond, mask = self.encode_prompt(prompts)
        fn = guided_logits_fn(self.generator, cond, mask, p.cfg_scale)

        def fp32_logits(x):
            with self.placement.autocast():
                return fn(x.to(self.device)).float().cpu()

        g = generator or torch.Generator().manual_seed(p.seed)
        out = sample(fp32_logits, start, cfg.mask_id, p.steps, g, p.temperature, p.choice_temperature, callback)
        out = out.view(n, *cfg.grid)  # (n, h, w)
        if self.token_sr is None or p.sr_steps == 0:
            return out
        return self.upsample_tokens(out, cond, mask, p, g)

    @torch.no_grad()
    def upsample_tokens(self, low: torch.Tensor, cond, mask, p: MaskedSampleParams, g: torch.Generator) -> torch.Tensor:
        """Base grids [n,h,w] -> the token SR stage's grids [n,2h,2w] (Muse 3.3: every high-resolution token
        starts masked; `sr_steps` steps of parallel decoding given the low grid and the prompt)."""
        from tessera.generators.masked_sr import WithLow

        sr = self.token_sr.config
        fn = guided_logits_fn(WithLow(self.token_sr, low.to(self.device)), cond, mask, p.sr_cfg_scale)

        def fp32_logits(x):
            with self.placement.autocast():
                return fn(x.to(self.device)).float().cpu()

        start = torch.full((low.shape[0], sr.num_tokens), sr.mask_id, dtype=torch.long)
        out = sample(fp32_logits, start, sr.mask_id, p.sr_steps, g, p.temperature, p.choice_temperature)
        return out.view(low.shape[0], *sr.grid)  # (n, 2h, 2w)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.placement.autocast():
            return self.tokenizer.decode_tokens(tokens.to(self.device)).float().clamp(-1, 1)

    def inpaint(self, image: Image.Image, region: Image.Image, prompt: str, p: MaskedSampleParams,
                callback=None) -> list[Image.Image]:
        """Regenerate the white part of `region` (a mask image, same size as `image`) and keep the rest:
        every token cell the region touches is unknown; outside it the input's pixels are kept exactly.
        Outpainting is the same call with the region covering the border."""
        h, w = self.generator.config.grid
        f = self.tokenizer.factor
        p = dataclasses.replace(p, sr_steps=0)  # inpainting works on the base grid
        if image.size != (w * f, h * f):
            raise InvalidInputError(f"image is {image.size[0]}x{image.size[1]}; this generator works at {w * f}x{h * f}")
        if region.size != image.size:
            raise InvalidInputError(f"mask is {region.size[0]}x{region.size[1]}, image {image.size[0]}x{image.size[1]}; "
                             f"they must match")
        pix = np.asarray(region.convert("L")) > 127  # (H, W) True = regenerate
        if not pix.any():
            raise InvalidInputError("the mask is empty (no white pixels): nothing to inpaint")
        cells = torch.from_numpy(pix.reshape(h, f, w, f).any(axis=(1, 3)))  # (h, w)
        x = to_tensor(image.convert("RGB"))[None]
        with torch.no_grad():
            known = self.tokenizer.encode(x.to(self.device))[0].cpu()
        known = torch.where(cells, torch.full_like(known, -1), known)
        out = to_images(self.decode(self.generate(prompt_batch(prompt, p.n), p, callback=callback,
                                                  known=known)))
        keep = Image.fromarray(((~pix) * 255).astype(np.uint8))  # original pixels outside the region
        return [Image.composite(image.convert("RGB"), o, keep) for o in out]
