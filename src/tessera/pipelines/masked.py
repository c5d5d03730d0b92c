"""Text -> tokens -> image with the masked generator: prompt encoder, iterative parallel decoding with
CFG, tokenizer decode; inpainting / outpainting by fixing the tokens of the known image region."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from PIL import Image

from tessera.data.dataset import to_pil, to_tensor
from tessera.pipelines import prompt_batch
from tessera.sampling.masked import guided_logits_fn, sample


@dataclasses.dataclass
class MaskedSampleParams:
    seed: int = 0
    n: int = 1
    steps: int = 12
    temperature: float = 1.0
    choice_temperature: float = 4.5
    cfg_scale: float = 3.0
    bf16: bool = True


class MaskedPipeline:
    def __init__(self, generator, tokenizer, text_encoder=None):
        self.generator, self.tokenizer, self.text_encoder = generator.eval(), tokenizer.eval(), text_encoder
        cfg = generator.config
        if cfg.vocab_size != tokenizer.config.codebook_size:
            raise ValueError(f"generator vocabulary {cfg.vocab_size} != tokenizer codebook "
                             f"{tokenizer.config.codebook_size}")
        if cfg.conditional and (text_encoder is None or text_encoder.dim != cfg.cond_dim):
            raise ValueError(f"the generator expects a {cfg.cond_dim}-d prompt encoder")

    @torch.no_grad()
    def tokens(self, prompt: str | list[str], p: MaskedSampleParams, known: torch.Tensor | None = None,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """known [h,w] token ids with -1 where unknown (None: generate everything) -> [n,h,w]; a list of
        prompts draws one image per prompt."""
        cfg = self.generator.config
        prompts = prompt_batch(prompt, p.n)
        n = len(prompts)
        start = torch.full((n, cfg.num_tokens), cfg.mask_id, dtype=torch.long)
        if known is not None:
            flat = known.reshape(-1)
            start = torch.where(flat >= 0, flat, start)  # (n, N)
        cond = mask = None
        if cfg.conditional:
            enc = self.text_encoder.encode(prompts)
            cond, mask = enc.tokens, enc.mask
        fn = guided_logits_fn(self.generator, cond, mask, p.cfg_scale)

        def fp32_logits(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.bf16):
                return fn(x).float()

        g = torch.Generator().manual_seed(p.seed)
        out = sample(fp32_logits, start, cfg.mask_id, p.steps, g, p.temperature, p.choice_temperature, callback)
        return out.view(n, *cfg.grid)

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        with torch.no_grad():
            images = self.tokenizer.decode_tokens(tokens).float().clamp(-1, 1)
        return [to_pil(x) for x in images]

    def __call__(self, prompt: str | list[str], p: MaskedSampleParams, callback=None) -> list[Image.Image]:
        return self.decode(self.tokens(prompt, p, None, callback))

    def inpaint(self, image: Image.Image, region: Image.Image, prompt: str, p: MaskedSampleParams,
                callback=None) -> list[Image.Image]:
        """Regenerate the white part of `region` (a mask image, same size as `image`) and keep the rest:
        every token cell the region touches is unknown; outside it the input's pixels are kept exactly.
        Outpainting is the same call with the region covering the border."""
        h, w = self.generator.config.grid
        f = self.tokenizer.factor
        if image.size != (w * f, h * f):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]}; this generator works at {w * f}x{h * f}")
        if region.size != image.size:
            raise ValueError(f"mask is {region.size[0]}x{region.size[1]}, image {image.size[0]}x{image.size[1]}; "
                             f"they must match")
        pix = np.asarray(region.convert("L")) > 127  # (H, W) True = regenerate
        if not pix.any():
            raise ValueError("the mask is empty (no white pixels): nothing to inpaint")
        cells = torch.from_numpy(pix.reshape(h, f, w, f).any(axis=(1, 3)))  # (h, w)
        x = to_tensor(image.convert("RGB"))[None]
        with torch.no_grad():
            known = self.tokenizer.encode(x)[0]
        known = torch.where(cells, torch.full_like(known, -1), known)
        out = self.decode(self.tokens(prompt, p, known, callback))
        keep = Image.fromarray(((~pix) * 255).astype(np.uint8))  # original pixels outside the region
        return [Image.composite(image.convert("RGB"), o, keep) for o in out]
