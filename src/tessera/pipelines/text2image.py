"""The inference pipeline (seed 004 Figure 20; seed 000 Figure 16): one object, one `__call__`.

    request -> validate -> prompt safety -> enhancement (+ fairness) -> text encoding + generation
            -> decoding -> harm detection -> super-resolution to the requested size -> Result

Each stage is a plain callable over typed values, timed separately; an unsafe prompt stops the request
before any generation work (UnsafePromptError carries the verdict); a flagged image is withheld and
listed with its category, never returned and never upscaled.

Generation, decoding and super-resolution (seed 000 Figure 16) live in a stages object with three
methods over plain values (`LocalStages`: in this process, models loaded once per paradigm and kept);
the serving layer swaps in stages that call separately scaled services with the same signatures.
`run` takes several requests at once and draws compatible ones (`batch_key`) in one generation batch,
each with its own seed's noise, so a batched request gives the images it would give alone."""
from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Callable

import torch
from PIL import Image

from tessera.errors import InvalidInputError
from tessera.pipelines.base import LIMITS, Limits  # noqa: F401  (re-exported: the HTTP schemas read them here)
from tessera.registry import default_model, paradigms
from tessera.safety import UnsafePromptError, Verdict, withheld_of
from tessera.text import check_prompts

PARADIGMS = paradigms()
DEFAULT_MODELS = {p: default_model(p) for p in PARADIGMS}


MAX_SIZE, MAX_N, MAX_STEPS = LIMITS.max_size, LIMITS.max_n, LIMITS.max_steps


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
    class_label: int | None = None    # class-conditional models (LlamaGen / taming c2i): the class drawn

    def validate(self) -> None:
        """Every rule up front, with the field and the rule in the message."""
        def bad(field, rule):
            raise InvalidInputError(f"{field}={getattr(self, field)!r}: {rule}")

        check_prompts([self.prompt, self.negative_prompt])
        if not self.prompt.strip():
            bad("prompt", "must not be empty")
        if self.paradigm not in PARADIGMS:
            bad("paradigm", f"must be one of {PARADIGMS}")
        if not (self.size == 0 or 64 <= self.size <= MAX_SIZE):
            bad("size", f"must be 0 (native) or between 64 and {MAX_SIZE}")
        if not 1 <= self.n <= MAX_N:
            bad("n", f"must be between 1 and {MAX_N}")
        if not -1 <= self.seed <= LIMITS.max_seed:
            bad("seed", "must be -1 (random) or a non-negative integer")
        if self.steps is not None and (self.paradigm == "ar" or not 1 <= self.steps <= MAX_STEPS):
            bad("steps", "the AR paradigm draws one step per token" if self.paradigm == "ar"
                else f"must be between 1 and {MAX_STEPS}")
        if self.cfg_scale is not None and not 0 <= self.cfg_scale <= LIMITS.max_cfg_scale:
            bad("cfg_scale", f"must be between 0 and {LIMITS.max_cfg_scale:g}")
        if self.temperature is not None and (self.paradigm == "diffusion" or not 0 < self.temperature <= 5):
            bad("temperature", "applies to ar / masked only, in (0, 5]")
        if self.top_k is not None and (self.paradigm != "ar" or self.top_k < 0):
            bad("top_k", "applies to ar only, >= 0 (0: off)")
        if self.top_p is not None and (self.paradigm != "ar" or not 0 < self.top_p <= 1):
            bad("top_p", "applies to ar only, in (0, 1]")
        if self.negative_prompt and self.paradigm != "diffusion":
            bad("negative_prompt", "applies to diffusion only")
        if self.class_label is not None and self.class_label < 0:
            bad("class_label", "must be a class index >= 0")


@dataclasses.dataclass
class Result:
    images: list[Image.Image]        # the images that passed harm detection, at the requested size
    revised_prompt: str
    prompts: list[str]               # per image, after enhancement and diversification
    changes: list[str]               # what enhancement / diversification changed
    seed: int
    timings: dict[str, float]        # seconds per stage (generate / decode / image_safety: the whole batch's)
    prompt_verdict: Verdict
    image_verdicts: list[Verdict]    # one per generated image (withheld ones included)
    withheld: list[dict]             # [{"index", "category", "score"}]
    settings: dict
    batch: int = 1                   # requests drawn in the same generation batch


def batch_key(req: Request) -> tuple | None:
    """Requests with equal keys can share one generation batch; None: this request runs alone.
    Only deterministic DDIM diffusion batches: its only randomness is the initial noise, drawn per
    request from the request's own seed. AR / masked sampling draws every step from one generator
    shared by the batch's rows, so a companion would change a request's images."""
    if req.paradigm != "diffusion":
        return None
    return (req.paradigm, req.steps, req.cfg_scale, req.negative_prompt)


def sampling_settings(req: Request) -> dict:
    given = {"steps": req.steps, "cfg_scale": req.cfg_scale, "temperature": req.temperature,
             "top_k": req.top_k, "top_p": req.top_p}
    settings = {k: v for k, v in given.items() if v is not None}
    if req.class_label is not None:  # a model without classes names it as an unknown setting
        settings["class_label"] = req.class_label
    if req.paradigm == "diffusion":
        settings["negative_prompt"] = req.negative_prompt
    return settings


class LocalStages:
    """Generation, decoding and super-resolution in this process (seed 000 Figure 16's three services).
    `serve.services` puts each method behind its own HTTP API; `serve.remote` calls them by URL.
    `models`: per paradigm a pipeline folder, a generator folder or bundled preset (default: the bundled one)."""

    def __init__(self, models: dict[str, str] | None = None, sr_model: str = "perceptual", text_encoder: str | None = None,
                 device: str | None = None, dtype: str | None = None, loras: dict[str, list[str]] | None = None,
                 speed: dict | None = None):
        """`loras`: per paradigm 'FILE[:SCALE]' LoRA files merged into its (Stable Diffusion) pipeline on load;
        `speed`: the SD pipelines' speed options (StableDiffusionPipeline.set_speed: attention, tome, compile),
        applied on load; with compile, one warm-up call at load compiles the U-Net before any request."""
        from tessera.device import placement

        self.models = {**DEFAULT_MODELS, **{k: str(v) for k, v in (models or {}).items() if v}}
        unknown = sorted(set(self.models) - set(PARADIGMS))
        if unknown:
            raise InvalidInputError(f"models: unknown paradigm(s) {unknown}; known: {PARADIGMS}")
        self.sr_model, self.text_encoder = sr_model, text_encoder
        self.loras = {k: list(v) for k, v in (loras or {}).items() if v}
        self.speed = {k: v for k, v in (speed or {}).items() if v is not None}
        self.placement = placement(device, dtype)
        self._loaded: dict[str, object] = {}
        self._sr = None

    def loaded(self, paradigm: str):
        if paradigm not in self._loaded:
            from tessera.pipelines.folder import load_pipeline

            pipe = load_pipeline(self.models[paradigm], text_encoder=self.text_encoder, device=self.placement,
                                 paradigm=paradigm)
            for spec in self.loras.get(paradigm, ()):
                from tessera.pipelines.lora import parse_spec

                if not hasattr(pipe, "load_lora"):
                    raise InvalidInputError(f"--lora {spec}: {self.models[paradigm]} is not a Stable Diffusion "
                                            f"pipeline (LoRA files apply to SD U-Nets and text encoders)")
                pipe.load_lora(*parse_spec(spec))
            if self.speed:
                self._speed_up(paradigm, pipe)
            self._loaded[paradigm] = pipe
        return self._loaded[paradigm]

    def _speed_up(self, paradigm: str, pipe) -> None:
        if not hasattr(pipe, "set_speed"):
            raise InvalidInputError(f"{', '.join('--' + k for k in self.speed)}: speed options apply to Stable "
                                    f"Diffusion pipelines; {self.models[paradigm]} is not one")
        pipe.set_speed(**self.speed)
        if self.speed.get("compile"):  # compile now (minutes), not on the first request
            pipe.generate(["warm-up"], pipe.params(steps=1, cfg_scale=pipe.sampler.cfg_scale))

    def generate(self, paradigm: str, prompts: list[str], settings: dict,
                 callback: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict]:
        """Text encoding + sampling -> (token grids [n,h,w] or latents [n,C,H,W], {"model", **sampling
        parameters}). `settings` are the paradigm's sampling parameters (seed included)."""
        pipe = self.loaded(paradigm)
        params = pipe.params(n=len(prompts), **settings)
        too_long = [r for r in pipe.too_long(prompts) if r]
        if too_long:
            raise InvalidInputError(f"prompt: {too_long[0]}")
        out = pipe.generate(prompts, params, callback=callback)
        extra = {"loras": self.loras[paradigm]} if paradigm in self.loras else {}
        if self.speed and hasattr(self.loaded(paradigm), "set_speed"):
            extra["speed"] = self.speed  # ToMe changes the image: the record says so
        models = getattr(pipe, "models", None) or {}
        optimized = {k: v for k, v in models.get("generator", {}).items() if k in ("quantization", "distilled")}
        if "quantization" in models.get("tokenizer", {}):
            optimized["autoencoder_quantization"] = models["tokenizer"]["quantization"]
        if optimized:
            extra["optimized"] = optimized  # an int8 / distilled generator or autoencoder: the record says so
        return out.cpu(), {"model": self.models[paradigm], **extra, **dataclasses.asdict(params)}

    def decode(self, paradigm: str, out: torch.Tensor) -> list[Image.Image]:
        from tessera.pipelines.base import to_images

        return to_images(self.loaded(paradigm).decode(out))

    def upscale(self, images: list[Image.Image], size: int) -> list[Image.Image]:
        from tessera.superres.cascade import load_sr_models, upscale

        if not size or all(im.size == (size, size) for im in images):
            return images
        if self._sr is None:
            self._sr = load_sr_models(self.sr_model)
        return [upscale(im, (size, size), self._sr, placement=self.placement) for im in images]


@dataclasses.dataclass
class _Prepared:
    req: Request
    seed: int
    revised: str
    prompts: list[str]
    changes: list[str]
    verdict: Verdict
    timings: dict[str, float]


def _timed(timings: dict, name: str, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    timings[name] = round(time.perf_counter() - t, 4)
    return out


class TextToImage:
    def __init__(self, models: dict[str, str] | None = None, sr_model: str = "perceptual", prompt_safety=None,
                 image_safety=None, text_encoder: str | None = None, device: str | None = None,
                 dtype: str | None = None, stages=None, loras: dict[str, list[str]] | None = None,
                 speed: dict | None = None):
        """`prompt_safety` / `image_safety`: checkers (safety.prompt.PromptSafety / safety.image.ImageSafety);
        None builds the defaults. Both are always on: there is no request field that turns them off.
        `stages`: generation / decoding / super-resolution (default: LocalStages over `models`)."""
        from tessera.safety.image import ImageSafety
        from tessera.safety.prompt import PromptSafety

        self.stages = stages or LocalStages(models, sr_model, text_encoder, device, dtype, loras, speed)
        self.prompt_safety = prompt_safety or PromptSafety()
        self.image_safety = image_safety or ImageSafety()

    @property
    def models(self) -> dict[str, str]:
        return self.stages.models

    # -- gateway-side stages --------------------------------------------------------------------------------
    def check_prompt(self, prompt: str) -> Verdict:
        return self.prompt_safety.check([prompt])[0]

    def rewrite(self, req: Request, seed: int) -> tuple[str, list[str], list[str]]:
        from tessera.pipelines.stable_diffusion import clip_budget
        from tessera.prompts import diversify, enhance

        revised, changes = req.prompt, []
        if req.enhance:  # in the vocabulary of the model that draws it: CLIP's for SD, the captions' otherwise
            e = enhance(req.prompt, clip_budget(self.models[req.paradigm]))
            revised, changes = e.prompt, list(e.changes)
        prompts = [revised] * req.n
        if req.diversify:
            pairs = diversify(revised, req.n, seed)
            prompts = [p for p, _ in pairs]
            changes += [f"image {i}: {c}" for i, (_, cs) in enumerate(pairs) for c in cs]
        return revised, prompts, changes

    def prepare(self, req: Request) -> _Prepared:
        """Validation, prompt safety and rewriting: everything before generation. Raises ValueError or
        UnsafePromptError (with the timings so far) — no generation stage has run."""
        req.validate()
        seed = req.seed if req.seed >= 0 else secrets.randbelow(2**31)
        timings: dict[str, float] = {}
        verdict = _timed(timings, "prompt_safety", self.check_prompt, req.prompt)
        if verdict.flagged:
            raise UnsafePromptError(0, verdict, timings)
        revised, prompts, changes = _timed(timings, "enhance", self.rewrite, req, seed)
        if revised != req.prompt:
            extra = self.prompt_safety.check([revised])[0]  # what is generated must pass too
            if extra.flagged:
                raise UnsafePromptError(0, extra, timings)
        return _Prepared(req, seed, revised, prompts, changes, verdict, timings)

    # -- requests -------------------------------------------------------------------------------------------
    def __call__(self, req: Request, callback: Callable[[int, int], None] | None = None) -> Result:
        out = self.run([req], callback)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def run(self, reqs: list[Request], callback: Callable[[int, int], None] | None = None,
            on_stage: Callable[[str], None] | None = None) -> list[Result | Exception]:
        """One Result, or the ValueError / UnsafePromptError that stopped it, per request, in order.
        Compatible requests share a generation batch; a batch that fails on its input (e.g. a prompt
        too long for the generator) is rerun one request at a time so that only the bad one fails.
        Any other error (a service down, a cancelled job) propagates to the caller."""
        stage = on_stage or (lambda name: None)
        results: list[Result | Exception | None] = [None] * len(reqs)
        prepared = []
        stage("prompt_safety")
        for i, req in enumerate(reqs):
            try:
                prepared.append((i, self.prepare(req)))
            except (ValueError, UnsafePromptError) as e:
                results[i] = e
        groups: dict[object, list] = {}
        for i, p in prepared:
            key = batch_key(p.req)
            groups.setdefault(("solo", i) if key is None else key, []).append((i, p))
        for group in groups.values():
            try:
                outs = self._draw([p for _, p in group], callback, stage)
            except ValueError as e:
                if len(group) == 1:
                    outs = [e]
                else:
                    outs = [self._draw_or_error(p, callback, stage) for _, p in group]
            for (i, _), r in zip(group, outs):
                results[i] = r
        return results

    def _draw_or_error(self, p: _Prepared, callback, stage) -> Result | Exception:
        try:
            return self._draw([p], callback, stage)[0]
        except ValueError as e:
            return e

    def _draw(self, preps: list[_Prepared], callback, stage) -> list[Result]:
        """Generation -> decoding -> harm detection for a batch, then super-resolution per request."""
        first, shared = preps[0].req, {}
        settings = {**sampling_settings(first), "seed": preps[0].seed}
        if len(preps) > 1:
            settings["noise_seeds"] = [[p.seed, len(p.prompts)] for p in preps]
        prompts = [s for p in preps for s in p.prompts]
        stage("generate")
        out, params = _timed(shared, "generate", self.stages.generate, first.paradigm, prompts, settings, callback)
        stage("decode")
        images = _timed(shared, "decode", self.stages.decode, first.paradigm, out)
        stage("image_safety")
        verdicts = _timed(shared, "image_safety", self.image_safety.check, images)
        results, at = [], 0
        stage("upscale")
        for p in preps:
            mine, mine_v = images[at:at + len(p.prompts)], verdicts[at:at + len(p.prompts)]
            at += len(p.prompts)
            results.append(self._result(p, mine, mine_v, params, shared, len(preps)))
        return results

    def _result(self, p: _Prepared, images, verdicts, params: dict, shared: dict, batch: int) -> Result:
        from tessera.superres.cascade import describe_sr

        timings = {**p.timings, **shared}
        withheld = withheld_of(verdicts)
        kept = [im for im, v in zip(images, verdicts) if not v.flagged]
        kept = _timed(timings, "upscale", self.stages.upscale, kept, p.req.size)
        timings["total"] = round(sum(timings.values()), 4)
        drop = {"n", "noise_seeds", "model"}
        settings = {"paradigm": p.req.paradigm, "model": params["model"], "size": p.req.size or images[0].width,
                    "sr_model": describe_sr(getattr(self.stages, "sr_model", None)), "enhance": p.req.enhance, "diversify": p.req.diversify,
                    **{k: v for k, v in params.items() if k not in drop}, "seed": p.seed, "n": p.req.n}
        return Result(kept, p.revised, p.prompts, p.changes, p.seed, timings, p.verdict, verdicts, withheld,
                      settings, batch)


@dataclasses.dataclass
class FileResult:
    path: str
    size: tuple[int, int]
    seed: int
    revised_prompt: str
    timings: dict
    withheld: list[dict]


def generate_file(prompt: str, out: str, paradigm: str | None = None, model: str | None = None, size: int = 1024,
                  n: int = 1, seed: int = -1, steps: int | None = None, cfg_scale: float | None = None,
                  temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  negative_prompt: str = "", no_enhance: bool = False, diversify: bool = False,
                  device: str | None = None, dtype: str | None = None, progress: bool = True,
                  loras: tuple[str, ...] = (), attention: str | None = None, tome: float | None = None,
                  compile: bool = False, class_label: int | None = None) -> tuple[str, FileResult]:
    """`tessera generate`: the system pipeline for one request, written as one PNG (a grid when n > 1)
    with its record. `model` (a pipeline folder, generator or preset) decides the paradigm unless given."""
    from tqdm import tqdm

    from tessera.paths import check_output_path
    from tessera.pipelines.folder import paradigm_of
    from tessera.pipelines.records import save_png

    paradigm = paradigm or (paradigm_of(model) if model else "diffusion")
    req = Request(prompt, paradigm, size, n, seed, steps, cfg_scale, temperature, top_k, top_p, negative_prompt,
                  not no_enhance, diversify, class_label)
    req.validate()
    check_output_path(out)
    pipe = TextToImage({paradigm: model} if model else None, device=device, dtype=dtype,
                       loras={paradigm: list(loras)}, speed=dict(attention=attention, tome=tome, compile=compile or None))
    pipe.stages.loaded(paradigm)  # a model of the wrong kind fails here, before any work
    bar = tqdm(desc=paradigm, unit="step", disable=not progress)
    try:
        result = pipe(req, callback=lambda i, total: (setattr(bar, "total", total), bar.update(1)))
    except UnsafePromptError as e:
        raise UnsafePromptError(0, e.verdict, e.timings, suffix=" — nothing was generated") from None
    finally:
        bar.close()
    if not result.images:
        raise InvalidInputError("every image was withheld by harm detection; nothing was written")
    record = {**result.settings, **pipe.stages.placement.to_dict(), "seed": result.seed,
              "revised_prompt": result.revised_prompt, "prompts": result.prompts, "changes": result.changes,
              "withheld": result.withheld, "seconds": result.timings}
    image = save_png(result.images, out, prompt, record)
    return out, FileResult(out, image.size, result.seed, result.revised_prompt, result.timings, result.withheld)
