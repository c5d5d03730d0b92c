"""One pipeline protocol over the paradigms: encode the prompt, generate (tokens or latents), decode.

Every paradigm pipeline (ar.py, masked.py, diffusion.py) implements `generate(prompts, params, ...)` and
`decode(out)`; this base class gives them the diffusers-style call

    pipe(prompt, negative_prompt=None, num_inference_steps=None, guidance_scale=None, num_images_per_prompt=1,
         generator=None, height=None, width=None, latents=None, output_type="pil", callback_on_step_end=None,
         **paradigm_options) -> PipelineOutput(images=[PIL.Image, ...])   (output_type "pt" | "np" | "latent")

plus device placement, the one place images are decoded to PIL, and the pipeline folder (folder.py).
The system pipeline of `tessera generate` (text2image.py: safety, enhancement, harm detection, SR)
wraps a bare pipeline of this kind.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from PIL import Image

from tessera.data.dataset import to_pil
from tessera.device import Placement, placement
from tessera.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class Limits:
    """The request limits: the one source of truth for every command that draws images (generate, sample,
    inpaint), the bare pipelines, the system pipeline and the HTTP schemas."""

    max_size: int = 2048
    max_n: int = 8
    max_steps: int = 1000
    max_seed: int = 2**63 - 1
    max_cfg_scale: float = 30.0


LIMITS = Limits()


def check_limits(params) -> None:
    """The shared bounds on a paradigm's sampling parameters (steps, guidance, seed), before any work; the
    number of images of one prompt is bounded in `prompt_batch` (a serving batch is a list of prompts)."""
    def bad(name, rule):
        raise InvalidInputError(f"{name}={getattr(params, name)}: {rule}")
    if getattr(params, "steps", None) is not None and not 1 <= params.steps <= LIMITS.max_steps:
        bad("steps", f"must be between 1 and {LIMITS.max_steps}")
    if not 0 <= params.cfg_scale <= LIMITS.max_cfg_scale:
        bad("cfg_scale", f"must be between 0 and {LIMITS.max_cfg_scale:g}")
    if not 0 <= params.seed <= LIMITS.max_seed:
        bad("seed", f"must be between 0 and {LIMITS.max_seed}")


def class_labels(label: int | None, n_classes: int, n: int) -> torch.Tensor:
    """A class-conditional model's labels [n] for class `label` (the prompt does not choose one)."""
    if label is None or not 0 <= label < n_classes:
        raise InvalidInputError(f"class_label={label}: this model is class-conditional; give a class in "
                                f"[0, {n_classes}) (tessera generate --class-label N)")
    return torch.full((n,), int(label), dtype=torch.long)


@dataclasses.dataclass
class PipelineOutput:
    images: list[Image.Image] | torch.Tensor | np.ndarray
    parameters: dict = dataclasses.field(default_factory=dict)   # every setting used (seed included)


def prompt_batch(prompt: str | list[str], n: int) -> list[str]:
    """One prompt drawn `n` times (1 <= n <= LIMITS.max_n), or a list of prompts (one image each; `n` is
    then ignored)."""
    if isinstance(prompt, str):
        if not 1 <= n <= LIMITS.max_n:
            raise InvalidInputError(f"n={n}: must be between 1 and {LIMITS.max_n}")
        return [prompt] * n
    prompts = list(prompt)
    if not prompts:
        raise InvalidInputError("the prompt list is empty")
    return prompts


def to_images(x: torch.Tensor, output_type: str = "pil"):
    """Decoded images [n,3,H,W] in [-1,1] -> PIL list ("pil"), [n,3,H,W] in [0,1] ("pt"), [n,H,W,3] ("np")."""
    x = x.detach().float().clamp(-1, 1)
    if output_type == "pil":
        return [to_pil(im) for im in x]
    if output_type == "pt":
        return x.add(1).div(2).cpu()
    if output_type == "np":
        return x.add(1).div(2).permute(0, 2, 3, 1).cpu().numpy()
    raise InvalidInputError(f"output_type={output_type!r}: must be 'pil', 'pt' or 'np'")


class Pipeline:
    """Base of the paradigm pipelines. Subclasses set `paradigm`, `Params` (their sampling-parameter
    dataclass), `CALL_NAMES` (diffusers argument -> Params field) and implement `generate` / `decode`."""

    paradigm: ClassVar[str]
    Params: ClassVar[type]
    CALL_NAMES: ClassVar[dict[str, str]] = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale"}

    def __init__(self, generator, tokenizer=None, text_encoder=None, text_encoder_name: str | None = None,
                 sampler: dict | None = None, device: Placement | None = None):
        self.generator, self.text_encoder = generator.eval(), text_encoder
        self.tokenizer = tokenizer.eval() if tokenizer is not None else None
        self.text_encoder_name = text_encoder_name or getattr(text_encoder, "name", None)
        self.sampler = self.Params(**(sampler or {}))  # the defaults this pipeline samples with
        self.models: dict[str, dict] = {}   # role -> identity {"name", "kind", "sha256", ...} (set by the loader)
        self.source: str | None = None      # the pipeline folder it was loaded from
        self.placement = Placement()
        self.to(device or Placement())

    # -- components and devices --------------------------------------------------------------------------
    @property
    def components(self) -> dict[str, Any]:
        return {"generator": self.generator, "tokenizer": self.tokenizer, "text_encoder": self.text_encoder}

    def to(self, device: Placement | str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        """Move the networks to a device; the dtype is the autocast compute dtype (weights stay float32)."""
        p = device if isinstance(device, Placement) else placement(device, dtype)
        for m in (self.generator, self.tokenizer):
            if m is not None:
                m.to(p.device)
        self.placement = p
        return self

    @property
    def device(self) -> torch.device:
        return self.placement.device

    # -- the protocol --------------------------------------------------------------------------------------
    def params(self, **settings: Any):
        """Sampling parameters: this pipeline's defaults with `settings` applied; an unknown one is named."""
        names = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise InvalidInputError(f"unknown {self.paradigm} sampling setting(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self.sampler, **settings)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (token states [n,L,D], mask [n,L]) on the pipeline's device, or (None, None) when unconditional."""
        if not self.generator.config.conditional:
            return None, None
        enc = self.text_encoder.encode(prompts)
        return enc.tokens.to(self.device), enc.mask.to(self.device)

    def too_long(self, prompts: list[str], batch: int = 64) -> list[str | None]:
        """Per prompt: None if the generator takes it, else why not (prompts are never silently cut)."""
        cfg = self.generator.config
        if not cfg.conditional:
            return [None] * len(prompts)
        limit, out = cfg.max_text_tokens, []
        for s in range(0, len(prompts), batch):
            lengths = self.text_encoder.encode(prompts[s:s + batch]).mask.sum(1).tolist()
            out += [None if n <= limit else f"{n} prompt tokens; the generator takes at most {limit}"
                    for n in lengths]
        return out

    def generate(self, prompts: list[str], params, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback: Callable[[int, int], None] | None = None):
        raise NotImplementedError

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """Tokens / latents -> images [n,3,H,W] in [-1,1] (float32)."""
        raise NotImplementedError

    @property
    def native_size(self) -> int:
        raise NotImplementedError

    @torch.no_grad()
    def run(self, prompt: str | list[str], params, callback: Callable[[int, int], None] | None = None,
            output_type: str = "pil"):
        """Generation + decoding with explicit sampling parameters (the serving and evaluation path)."""
        return to_images(self.decode(self.generate(prompt_batch(prompt, params.n), params, callback=callback)),
                         output_type)

    # -- the diffusers-style call ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = "", negative_prompt: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable | None = None, **paradigm_options: Any) -> PipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidInputError("prompt: the prompt list is empty")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InvalidInputError(f"num_images_per_prompt={num_images_per_prompt!r}: must be an integer >= 1")
        size = self.call_size(height, width)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                 "negative_prompt": negative_prompt}
        settings = {}
        for name, value in given.items():
            if value is None:
                continue
            if name not in self.CALL_NAMES:
                raise InvalidInputError(f"{name}: the {self.paradigm} paradigm has no such setting")
            settings[self.CALL_NAMES[name]] = value
        params = self.params(n=len(prompts), **settings, **paradigm_options)
        step_cb = None
        if callback_on_step_end is not None:
            step_cb = lambda i, total: callback_on_step_end(self, i, total, {})  # noqa: E731
        out = self.generate(prompts, params, generator=generator, latents=latents, callback=step_cb, **size)
        record = {"paradigm": self.paradigm, **dataclasses.asdict(params)}
        if generator is not None:
            record["seed"] = generator.initial_seed()
        if output_type == "latent":  # diffusers' convention: what the decoder would take (tokens / latents)
            return PipelineOutput(out, record)
        return PipelineOutput(to_images(self.decode(out), output_type), record)

    def call_size(self, height: int | None, width: int | None) -> dict:
        """The `generate` keywords for a call's height / width: Tessera's own generators draw their native size
        only (a token grid or latent of the size they were trained on)."""
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != self.native_size:
                raise InvalidInputError(f"{name}={value}: this pipeline generates {self.native_size} px images "
                                        f"(upscale with tessera.superres or `tessera generate --size`)")
        return {}

    def any_size(self, height: int | None, width: int | None, step: int) -> dict:
        """`call_size` for networks that draw any size: height / width multiples of `step` up to the limit
        (default: the native size); -> {"size": (h, w)} for `generate`, {} at the native size."""
        if height is None and width is None:
            return {}
        h, w = height or self.native_size, width or self.native_size
        for name, value in (("height", h), ("width", w)):
            if not (step <= value <= LIMITS.max_size and value % step == 0):
                raise InvalidInputError(f"{name}={value}: must be a multiple of {step} between {step} and "
                                        f"{LIMITS.max_size}")
        return {} if (h, w) == (self.native_size,) * 2 else {"size": (h, w)}

    def save_pretrained(self, folder, **kw):
        from tessera.pipelines.folder import save_pipeline

        return save_pipeline(self, folder, **kw)
