"""`tessera sample` / `tessera inpaint` as a library call: a bare pipeline draws N images for one prompt
into a PNG grid that carries every setting. No enhancement or SR (the research path; `tessera generate`
is the product path), but the same safety stages as `generate`: prompt safety before any work, harm
detection on every image (a flagged one is withheld and recorded)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from tessera.errors import InvalidInputError, WrongModelError
from tessera.paths import check_output_path
from tessera.pipelines.base import prompt_batch
from tessera.pipelines.folder import load_pipeline
from tessera.pipelines.records import save_png


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step")
    return bar, (lambda i, n: (setattr(bar, "total", n), bar.update(1)))


def sample_to_file(paradigm: str, prompt: str, out: str | Path, model: str | None = None, tokenizer: str | None = None,
                   text_encoder: str | None = None, device: str | None = None, dtype: str | None = None,
                   settings: dict | None = None, inpaint: tuple[str, str] | None = None) -> Path:
    """Sample with the `paradigm` pipeline of `model` (default: the bundled one) and write OUT."""
    from tessera.safety import screen_prompt, withheld_of
    from tessera.safety.image import ImageSafety
    from tessera.safety.prompt import PromptSafety
    from tessera.text import check_prompts

    check_prompts([prompt])
    check_output_path(out)
    if inpaint is not None and model is not None:  # a masked generator, or an SD inpainting folder (diffusion)
        from tessera.pipelines.folder import paradigm_of

        paradigm = paradigm_of(model)
    screen_prompt(PromptSafety(), prompt)
    pipe = load_pipeline(model or paradigm, tokenizer, text_encoder, device, dtype, paradigm=paradigm)
    params = pipe.params(**{k: v for k, v in (settings or {}).items() if v is not None})
    params.validate()  # before any progress bar or work
    prompt_batch(prompt, params.n)
    too_long = [r for r in pipe.too_long([prompt]) if r]
    if too_long:
        raise InvalidInputError(f"prompt: {too_long[0]}")
    bar, cb = _progress(getattr(params, "steps", 0), "steps")
    try:
        images = pipe.run(prompt, params, callback=cb) if inpaint is None else _inpaint(pipe, inpaint, prompt, params, cb)
    finally:
        bar.close()
    verdicts = ImageSafety().check(images)
    images = [im for im, v in zip(images, verdicts) if not v.flagged]
    if not images:
        raise InvalidInputError("every image was withheld by harm detection; nothing was written")
    record = {"paradigm": paradigm, "model": str(model or pipe.models["generator"]["name"]),
              "tokenizer": pipe.models.get("tokenizer", {}).get("name"), "text_encoder": pipe.text_encoder_name,
              **pipe.placement.to_dict(), **dataclasses.asdict(params),
              "withheld": withheld_of(verdicts)}
    save_png(images, out, prompt, record)
    return Path(out)


def _inpaint(pipe, paths: tuple[str, str], prompt: str, params, cb):
    from tessera.data.decode import Rejected, decode_image

    if not hasattr(pipe, "inpaint"):
        raise WrongModelError(f"inpainting needs a masked generator or an SD inpainting folder, not a {pipe.paradigm} "
                              f"generator")
    try:
        image, region = (decode_image(Path(p).read_bytes()) for p in paths)
    except Rejected as r:
        raise InvalidInputError(f"cannot read the image or mask: {r}") from None
    return pipe.inpaint(image, region, prompt, params, cb)
