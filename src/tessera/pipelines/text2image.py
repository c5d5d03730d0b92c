"""The inference pipeline (seed 004 Figure 20; seed 000 Figure 16): one object, one `__call__`.

    request -> validate -> prompt safety -> enhancement (+ fairness) -> text encoding + generation
            -> decoding -> harm detection -> super-resolution to the requested size -> Result

Each stage is a plain callable over typed values, timed separately; an unsafe prompt stops the request
before any generation work (UnsafePromptError carries the verdict); a flagged image is withheld and
listed with its category, never returned and never upscaled. The generators are loaded once per
paradigm and kept."""
from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Callable

import torch
from PIL import Image

from tessera.data.dataset import to_pil
from tessera.safety import UnsafePromptError, Verdict
from tessera.text import check_prompts

PARADIGMS = ("ar", "masked", "diffusion")
DEFAULT_MODELS = {"ar": "ar-xs", "masked": "masked-xxs", "diffusion": "unet-xs"}
MAX_SIZE, MAX_N, MAX_STEPS = 2048, 8, 1000


@dataclasses.dataclass
class Request:
    prompt: str
    paradigm: str = "diffusion"
    size: int = 1024                 # output side in pixels; 0 = the generator's own (128)
    n: int = 1
    seed: int = -1                   # -1: a random seed, echoed back in the result
    steps: int | None = None         # masked / diffusion; the paradigm's default when None
    cfg_scale: float | None = None
    temperature: float | None = None  # ar / masked
    top_k: int | None = None          # ar
    top_p: float | None = None        # ar
    negative_prompt: str = ""         # diffusion
    enhance: bool = True
    diversify: bool = False

    def validate(self) -> None:
        """Every rule up front, with the field and the rule in the message."""
        def bad(field, rule):
            raise ValueError(f"{field}={getattr(self, field)!r}: {rule}")

        check_prompts([self.prompt, self.negative_prompt])
        if not self.prompt.strip():
            bad("prompt", "must not be empty")
        if self.paradigm not in PARADIGMS:
            bad("paradigm", f"must be one of {PARADIGMS}")
        if not (self.size == 0 or 64 <= self.size <= MAX_SIZE):
            bad("size", f"must be 0 (native) or between 64 and {MAX_SIZE}")
        if not 1 <= self.n <= MAX_N:
            bad("n", f"must be between 1 and {MAX_N}")
        if not -1 <= self.seed < 2**63:
            bad("seed", "must be -1 (random) or a non-negative integer")
        if self.steps is not None and (self.paradigm == "ar" or not 1 <= self.steps <= MAX_STEPS):
            bad("steps", "the AR paradigm draws one step per token" if self.paradigm == "ar"
                else f"must be between 1 and {MAX_STEPS}")
        if self.cfg_scale is not None and not 0 <= self.cfg_scale <= 30:
            bad("cfg_scale", "must be between 0 and 30")
        if self.temperature is not None and (self.paradigm == "diffusion" or not 0 < self.temperature <= 5):
            bad("temperature", "applies to ar / masked only, in (0, 5]")
        if self.top_k is not None and (self.paradigm != "ar" or self.top_k < 0):
            bad("top_k", "applies to ar only, >= 0 (0: off)")
        if self.top_p is not None and (self.paradigm != "ar" or not 0 < self.top_p <= 1):
            bad("top_p", "applies to ar only, in (0, 1]")
        if self.negative_prompt and self.paradigm != "diffusion":
            bad("negative_prompt", "applies to diffusion only")


@dataclasses.dataclass
class Result:
    images: list[Image.Image]        # the images that passed harm detection, at the requested size
    revised_prompt: str
    prompts: list[str]               # per image, after enhancement and diversification
    changes: list[str]               # what enhancement / diversification changed
    seed: int
    timings: dict[str, float]        # seconds per stage
    prompt_verdict: Verdict
    image_verdicts: list[Verdict]    # one per generated image (withheld ones included)
    withheld: list[dict]             # [{"index", "category", "score"}]
    settings: dict


class TextToImage:
    def __init__(self, models: dict[str, str] | None = None, sr_model: str = "fast", prompt_safety=None,
                 image_safety=None, text_encoder: str = "minilm", bf16: bool = True):
        """`prompt_safety` / `image_safety`: checkers (safety.prompt.PromptSafety / safety.image.ImageSafety);
        None builds the defaults. Both are always on: there is no request field that turns them off."""
        from tessera.safety.image import ImageSafety
        from tessera.safety.prompt import PromptSafety

        self.models = {**DEFAULT_MODELS, **(models or {})}
        self.sr_model, self.text_encoder, self.bf16 = sr_model, text_encoder, bf16
        self.prompt_safety = prompt_safety or PromptSafety()
        self.image_safety = image_safety or ImageSafety()
        self._loaded: dict[str, object] = {}
        self._sr = None

    # -- stages -------------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str) -> Verdict:
        return self.prompt_safety.check([prompt])[0]

    def rewrite(self, req: Request, seed: int) -> tuple[str, list[str], list[str]]:
        from tessera.prompts import diversify, enhance

        revised, changes = req.prompt, []
        if req.enhance:
            e = enhance(req.prompt)
            revised, changes = e.prompt, list(e.changes)
        prompts = [revised] * req.n
        if req.diversify:
            pairs = diversify(revised, req.n, seed)
            prompts = [p for p, _ in pairs]
            changes += [f"image {i}: {c}" for i, (_, cs) in enumerate(pairs) for c in cs]
        return revised, prompts, changes

    def loaded(self, paradigm: str):
        if paradigm not in self._loaded:
            from tessera.pipelines.load import load_pipeline

            self._loaded[paradigm] = load_pipeline(self.models[paradigm], text_encoder=self.text_encoder)
        return self._loaded[paradigm]

    def generate(self, req: Request, prompts: list[str], seed: int, callback=None):
        """Text encoding + sampling -> (token grids [n,h,w] or latents [n,C,H,W], the sampling parameters)."""
        lp = self.loaded(req.paradigm)
        given = {"steps": req.steps, "cfg_scale": req.cfg_scale, "temperature": req.temperature,
                 "top_k": req.top_k, "top_p": req.top_p}
        settings = {k: v for k, v in given.items() if v is not None}
        if req.paradigm == "diffusion":
            settings["negative_prompt"] = req.negative_prompt
        params = lp.params(seed=seed, n=len(prompts), bf16=self.bf16, **settings)
        too_long = [r for r in lp.too_long(prompts) if r]
        if too_long:
            raise ValueError(f"prompt: {too_long[0]}")
        if req.paradigm == "diffusion":
            return lp.pipe.latents(prompts, params, callback), params
        return lp.pipe.tokens(prompts, params, callback=callback), params

    def decode(self, paradigm: str, out: torch.Tensor) -> list[Image.Image]:
        pipe = self.loaded(paradigm).pipe
        with torch.no_grad():
            if paradigm == "diffusion":
                x = pipe.tokenizer.decode_latents(out / pipe.scale, quantize=True) if pipe.space == "latent" else out
            else:
                x = pipe.tokenizer.decode_tokens(out)
        return [to_pil(im) for im in x.float().clamp(-1, 1)]

    def check_images(self, images: list[Image.Image]) -> list[Verdict]:
        return self.image_safety.check(images)

    def upscale(self, images: list[Image.Image], size: int) -> list[Image.Image]:
        from tessera.superres.cascade import load_sr_models, upscale

        if not size or all(im.size == (size, size) for im in images):
            return images
        if self._sr is None:
            self._sr = load_sr_models(self.sr_model)
        return [upscale(im, (size, size), self._sr, bf16=self.bf16) for im in images]

    # -- the request ----------------------------------------------------------------------------------------
    def __call__(self, req: Request, callback: Callable[[int, int], None] | None = None) -> Result:
        req.validate()
        seed = req.seed if req.seed >= 0 else secrets.randbelow(2**31)
        timings: dict[str, float] = {}

        def timed(name, fn, *args):
            t = time.perf_counter()
            out = fn(*args)
            timings[name] = round(time.perf_counter() - t, 4)
            return out

        verdict = timed("prompt_safety", self.check_prompt, req.prompt)
        if verdict.flagged:
            raise UnsafePromptError(0, verdict, timings)
        revised, prompts, changes = timed("enhance", self.rewrite, req, seed)
        if revised != req.prompt:
            extra = self.prompt_safety.check([revised])[0]  # what is generated must pass too
            if extra.flagged:
                raise UnsafePromptError(0, extra, timings)
        out, params = timed("generate", self.generate, req, prompts, seed, callback)
        images = timed("decode", self.decode, req.paradigm, out)
        verdicts = timed("image_safety", self.check_images, images)
        withheld = [{"index": i, "category": v.category, "score": round(v.score, 4)}
                    for i, v in enumerate(verdicts) if v.flagged]
        kept = [im for im, v in zip(images, verdicts) if not v.flagged]
        kept = timed("upscale", self.upscale, kept, req.size)
        timings["total"] = round(sum(timings.values()), 4)
        settings = {"paradigm": req.paradigm, "model": self.models[req.paradigm], "size": req.size or images[0].width,
                    "sr_model": self.sr_model, "enhance": req.enhance, "diversify": req.diversify,
                    **{k: v for k, v in dataclasses.asdict(params).items() if k != "n"}, "n": req.n}
        return Result(kept, revised, prompts, changes, seed, timings, verdict, verdicts, withheld, settings)
