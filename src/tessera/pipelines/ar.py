"""Text -> tokens -> image with the AR generator: prompt encoder, KV-cached sampler with CFG, tokenizer decode."""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch
from PIL import Image, PngImagePlugin

from tessera.data.dataset import to_pil
from tessera.pipelines import prompt_batch
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
    bf16: bool = True


class ARPipeline:
    def __init__(self, generator, tokenizer, text_encoder=None):
        self.generator, self.tokenizer, self.text_encoder = generator.eval(), tokenizer.eval(), text_encoder
        if generator.config.vocab_size != tokenizer.config.codebook_size:
            raise ValueError(f"generator vocabulary {generator.config.vocab_size} != tokenizer codebook "
                             f"{tokenizer.config.codebook_size}: they were not trained together")
        if generator.config.conditional and text_encoder is None:
            raise ValueError("a text-conditioned generator needs a text encoder")
        if text_encoder is not None and generator.config.conditional and text_encoder.dim != generator.config.cond_dim:
            raise ValueError(f"text encoder is {text_encoder.dim}-d, generator expects {generator.config.cond_dim}")

    @torch.no_grad()
    def tokens(self, prompt: str | list[str], p: ARSampleParams,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """-> [n,h,w] token ids; a list of prompts draws one image per prompt."""
        cfg = self.generator.config
        prompts = prompt_batch(prompt, p.n)
        n = len(prompts)
        g = torch.Generator().manual_seed(p.seed)
        cond = mask = first = None
        guided = cfg.conditional and p.cfg_scale != 1.0
        if cfg.conditional:
            enc = self.text_encoder.encode(prompts)
            cond, mask = enc.tokens, enc.mask
        else:
            first = torch.randint(0, cfg.vocab_size, (n,), generator=g)  # seed 000: random first token
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.bf16):
            fn = cached_logits_fn(self.generator, n, cond, mask, guided)
            toks = sample(fn, n, cfg.num_tokens, generator=g, temperature=p.temperature, top_k=p.top_k,
                          top_p=p.top_p, cfg_scale=p.cfg_scale if guided else 1.0, cfg_interval=p.cfg_interval,
                          first_tokens=first, callback=callback)
        return toks.view(n, *cfg.grid)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], p: ARSampleParams, callback=None) -> list[Image.Image]:
        toks = self.tokens(prompt, p, callback)
        images = self.tokenizer.decode_tokens(toks).float().clamp(-1, 1)
        return [to_pil(x) for x in images]


def png_info(prompt: str, params: dict) -> PngImagePlugin.PngInfo:
    """A1111-style `parameters` text chunk + a JSON chunk with every parameter."""
    info = PngImagePlugin.PngInfo()
    kv = ", ".join(f"{k}: {v}" for k, v in params.items())
    info.add_text("parameters", f"{prompt}\n{kv}")
    info.add_text("tessera", json.dumps({"prompt": prompt, **params}))
    return info


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out
