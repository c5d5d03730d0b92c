"""Pipeline folders (the diffusers convention) and the one loader of inference pipelines.

    DIR/model_index.json     {"_class_name": "MaskedPipeline", "_tessera_version", "paradigm": "masked",
                              "generator": ["tessera", "MaskedTransformer"], "tokenizer": ["tessera", "VQModel"],
                              "text_encoder": ["tessera", "TextEncoder"], "scheduler": [...] (diffusion),
                              "sampler": {default sampling parameters}, "latent_scale", "space" (diffusion)}
    DIR/generator/           a model folder (config.json + model.safetensors + meta.json)
    DIR/tokenizer/           a model folder (absent for a pixel-space denoiser)
    DIR/text_encoder/        text_encoder.json {"name": "minilm" | a Hugging Face name or path}: the
                             weights come from their installed package, never copied here; or, for a
                             checkpoint's own CLIP (Stable Diffusion), {"format": "transformers-clip",
                             "clip_skip"} beside that model's and tokenizer's files (save_pretrained)
    DIR/scheduler/           scheduler_config.json (diffusion: the noise schedule)
    DIR/token_sr/            a masked pipeline's token super-resolution stage (model folder; optional)

A Stable Diffusion pipeline's folder ("_class_name": "StableDiffusionPipeline") has the same layout: the
`sd-unet` generator, the `kl` or `taesd` autoencoder as tokenizer/, its CLIP in text_encoder/.

`load_pipeline(spec)` takes a pipeline folder, a generator's model folder or bundled preset (its pipeline
is assembled from the training record: tokenizer, schedule, latent scale), or a paradigm name for the
bundled default pipeline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch

from tessera.checkpoint import atomic_write_bytes, export_model, is_model_folder, read_meta
from tessera.device import Placement, placement
from tessera.errors import InvalidInputError, ModelNotFoundError, WrongModelError
from tessera.registry import _import, default_model, family, paradigms, resolve

INDEX = "model_index.json"
TEXT_ENCODER_JSON = "text_encoder.json"
SCHEDULER_JSON = "scheduler_config.json"


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def _pipeline_class(kind: str):
    fam = family(kind)
    if fam.role != "generator" or not fam.pipeline:
        raise WrongModelError(f"a {kind!r} model is not a generator (generators: "
                              f"{', '.join(k for k, f in _generator_families())})")
    return _import(fam.pipeline)


def _generator_families():
    from tessera.registry import families

    return [(k, f) for k, f in families().items() if f.role == "generator"]


def _identity(name: str, model) -> dict:
    meta = model.meta
    return {"name": name, "kind": model.kind, "sha256": meta.sha256 if meta else None,
            "trained_steps": meta.trained_steps if meta else None}


def _load_model(spec: str | Path, role: str, device: torch.device):
    """A component by folder or bundled preset name, checked for its role."""
    from tessera.checkpoint import load_model

    model = load_model(resolve(spec))
    if family(model.kind).role != role:
        raise WrongModelError(f"{spec} is a {model.kind!r} model, not a {role}")
    return model.to(device)


def _text_encoder(name: str | None, conditional: bool):
    if not conditional:
        return None
    from tessera.text import load_text_encoder

    return load_text_encoder(name or "minilm")


def assemble(generator, generator_name: str, tokenizer: str | None = None, text_encoder: str | None = None,
             device: Placement | None = None, **pipeline_kw):
    """The pipeline of a loaded generator. What the caller does not give comes from the generator's
    training record: the tokenizer it was trained with, and for diffusion its schedule and latent scale."""
    device = device or Placement()
    cls = _pipeline_class(generator.kind)
    task = (generator.meta.task if generator.meta else None) or {}
    kw = dict(pipeline_kw)
    if cls.paradigm == "diffusion":
        from tessera.sampling.diffusion import DiffusionConfig

        kw.setdefault("space", task.get("space", "latent"))
        kw.setdefault("scheduler", DiffusionConfig.from_dict(task.get("diffusion", {})))
        kw.setdefault("latent_scale", float(task.get("latent_scale", 1.0)))
        sampler = task.get("sampler") or (  # a distilled student samples as it was distilled
            {"steps": task["student_steps"], "cfg_scale": float(task.get("student_cfg", 1.0)),
             "method": task.get("student_method", "ddim")}
            if task.get("teacher") else None)
        if sampler:
            kw.setdefault("sampler", dict(sampler))
    needs_tokenizer = cls.paradigm != "diffusion" or kw.get("space") == "latent"
    tok_name = tokenizer or task.get("tokenizer") or default_model("tokenizer")
    tok = _load_model(tok_name, "tokenizer", device.device) if needs_tokenizer else None
    enc = _text_encoder(text_encoder, generator.config.conditional)
    pipe = cls(generator, tok, enc, text_encoder_name=text_encoder or ("minilm" if enc else None), device=device, **kw)
    pipe.models = {"generator": _identity(generator_name, generator)}
    quant = generator.meta.extra.get("quantization") if generator.meta else None
    if quant:  # an int8 generator (tessera optimize MODEL --int8): the record says so
        pipe.models["generator"]["quantization"] = f"{quant['scheme'].split(':')[0]}, {len(quant['layers'])} layers"
    if task.get("teacher"):  # a few-step student (tessera optimize --distill-steps): the record says so
        guided = f", guidance {task['student_cfg']:g}" if task.get("student_cfg", 1.0) != 1.0 else ""
        pipe.models["generator"]["distilled"] = f"{task['student_steps']}-step student of {task['teacher']}{guided}"
    if tok is not None:
        pipe.models["tokenizer"] = _identity(str(tok_name), tok)
    if enc is not None:
        pipe.models["text_encoder"] = {"name": pipe.text_encoder_name}
    return pipe


def load_pipeline(spec: str | Path | None = None, tokenizer: str | None = None, text_encoder: str | None = None,
                  device: str | None = None, dtype: str | None = None, paradigm: str | None = None):
    """A pipeline from a pipeline folder, a generator (folder or bundled preset) or a paradigm name
    ("ar" | "masked" | "diffusion": the bundled default). `paradigm` checks what was found."""
    from tessera.checkpoint import load_model

    place = device if isinstance(device, Placement) else placement(device, dtype)
    spec = spec if spec is not None else paradigm
    if spec is None:
        raise InvalidInputError("give a pipeline folder, a generator or a paradigm")
    found = paradigm_of(spec)  # reads records only: a model of the wrong kind fails before anything loads
    if paradigm is not None and found != paradigm:
        raise WrongModelError(f"{spec} is a {found} model, not {paradigm}; pass a {paradigm} pipeline or generator "
                              f"(the bundled one: {default_model(paradigm)})")
    if str(spec) in paradigms():
        spec = default_model(str(spec))
    from tessera.pipelines.stable_diffusion import is_diffusers_folder, load_diffusers_folder

    if is_pipeline_folder(spec) and tokenizer is not None:
        raise InvalidInputError(f"--tokenizer: {spec} is a pipeline folder, which holds its own tokenizer")
    from tessera.pipelines.amused import is_amused_folder, load_amused_folder

    release = load_release_pipeline(spec, place)
    if release is not None:
        pipe = release
    elif is_amused_folder(spec):
        pipe = load_amused_folder(spec, place)
    elif is_diffusers_folder(spec):
        pipe = load_diffusers_folder(spec, place)
    elif is_pipeline_folder(spec):
        pipe = load_pipeline_folder(spec, place, text_encoder)
    else:
        generator = load_model(resolve(spec)).to(place.device)
        pipe = assemble(generator, str(spec), tokenizer, text_encoder, place)
    return pipe


def load_release_pipeline(spec: str | Path, device: Placement):
    """The pipeline of a LlamaGen (c2i / t2i) release or a taming-transformers Net2Net release folder (weights
    in the compute dtype), or None when `spec` is neither."""
    from tessera.pipelines.llamagen import LlamaGenPipeline, release_files

    if release_files(spec):
        pipe = LlamaGenPipeline.from_folder(spec, device.dtype, device)
    elif is_release_pipeline(spec):
        from tessera.pipelines.taming import TamingPipeline

        pipe = TamingPipeline.from_release(spec, device.dtype, device=device)
    else:
        return None
    pipe.source = str(spec)
    pipe.models = {"generator": {"name": str(spec), "kind": pipe.generator.kind},
                   "tokenizer": {"name": str(spec), "kind": pipe.tokenizer.kind}}
    return pipe


def is_release_pipeline(spec: str | Path) -> bool:
    """A LlamaGen (c2i / t2i) release or a taming-transformers Net2Net (transformer + VQGAN) release folder."""
    from tessera.pipelines.llamagen import release_files
    from tessera.tokenizer.taming import is_release_folder, release_model

    return bool(release_files(spec)) or (is_release_folder(spec) and str(
        release_model(spec).get("target", "")).endswith("Net2NetTransformer"))


def load_pipeline_folder(folder: str | Path, device: Placement | None = None, text_encoder: str | None = None):
    """Rebuild the pipeline a folder describes (every component strict, by its own model folder)."""
    from tessera.checkpoint import load_model

    folder = Path(folder)
    device = device or Placement()
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{folder / INDEX}: not a readable pipeline index ({e})") from None
    for comp in ("generator",) + tuple(c for c in ("tokenizer", "token_sr") if c in index):
        if not is_model_folder(folder / comp):
            raise ModelNotFoundError(f"{folder}: the {comp} component is missing ({folder / comp} is not a model folder)")
    from tessera.pipelines.stable_diffusion import is_tessera_sd_folder

    if is_tessera_sd_folder(folder):
        return _load_sd_folder(folder, index, device)
    generator = load_model(folder / "generator").to(device.device)
    cls = _pipeline_class(generator.kind)
    if index.get("paradigm") != cls.paradigm:
        raise WrongModelError(f"{folder / INDEX}: paradigm {index.get('paradigm')!r}, but its generator is a "
                              f"{generator.kind!r} model ({cls.paradigm})")
    kw = {}
    if cls.paradigm == "diffusion":
        from tessera.sampling.diffusion import DiffusionConfig

        sched = json.loads((folder / "scheduler" / SCHEDULER_JSON).read_text())
        kw = {"scheduler": DiffusionConfig.from_dict(sched), "latent_scale": float(index["latent_scale"]),
              "space": index.get("space", "latent")}
    enc_name = text_encoder
    if enc_name is None and (folder / "text_encoder" / TEXT_ENCODER_JSON).is_file():
        enc_name = json.loads((folder / "text_encoder" / TEXT_ENCODER_JSON).read_text())["name"]
    tok = load_model(folder / "tokenizer").to(device.device) if "tokenizer" in index else None
    if "token_sr" in index:  # a masked pipeline's token super-resolution stage
        kw["token_sr"] = load_model(folder / "token_sr")
    enc = _text_encoder(enc_name, generator.config.conditional)
    pipe = cls(generator, tok, enc, text_encoder_name=enc_name, sampler=index.get("sampler"), device=device, **kw)
    pipe.models = {"generator": _identity(str(folder / "generator"), generator)}
    if tok is not None:
        pipe.models["tokenizer"] = _identity(str(folder / "tokenizer"), tok)
    if enc is not None:
        pipe.models["text_encoder"] = {"name": enc_name}
    if kw.get("token_sr") is not None:
        pipe.models["token_sr"] = _identity(str(folder / "token_sr"), kw["token_sr"])
    pipe.source = str(folder)
    return pipe


def _load_sd_folder(folder: Path, index: dict, device: Placement):
    """A Stable Diffusion pipeline folder: every network read once, in its compute dtype."""
    from tessera.checkpoint import load_model
    from tessera.pipelines.stable_diffusion import StableDiffusionPipeline, _vae_dtype
    from tessera.sampling.diffusion import DiffusionConfig
    from tessera.text.clip import CLIPPromptEncoder

    record = json.loads((folder / "text_encoder" / TEXT_ENCODER_JSON).read_text())
    if record.get("format") != "transformers-clip":
        raise WrongModelError(f"{folder / 'text_encoder'}: a Stable Diffusion pipeline needs its own CLIP text encoder")
    text = CLIPPromptEncoder.from_folders(folder / "text_encoder", folder / "text_encoder", record.get("clip_skip"),
                                          device.dtype)
    text.name = record.get("name") or text.name
    unet = load_model(folder / "generator", dtype=device.dtype)
    vae_cfg = json.loads((folder / "tokenizer" / "config.json").read_text())
    vae = load_model(folder / "tokenizer", dtype=_vae_dtype(vae_cfg, device.dtype))
    sched = DiffusionConfig.from_dict(json.loads((folder / "scheduler" / SCHEDULER_JSON).read_text()))
    pipe = StableDiffusionPipeline(unet, vae, text, scheduler=sched, sampler=index.get("sampler"), device=device)
    pipe.models = {"generator": _identity(str(folder / "generator"), unet),
                   "tokenizer": _identity(str(folder / "tokenizer"), vae), "text_encoder": {"name": text.name}}
    pipe.source = str(folder)
    return pipe


def _export_component(model, out: Path) -> None:
    meta = model.meta.to_dict() if model.meta else {}
    keep = {k: v for k, v in meta.items() if k not in ("kind", "sha256", "tessera_version", "stored_dtype", "created")}
    stored = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(meta.get("stored_dtype"))
    export_model(model, out, keep, dtype=stored)


def save_pipeline(pipe, folder: str | Path, overwrite: bool = False) -> Path:
    """Write `pipe` as a pipeline folder (built beside it, then moved into place: nothing half-written)."""
    from tessera.paths import check_new_folder

    folder = Path(folder) if overwrite else check_new_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with getattr(pipe, "unpacked", contextlib.nullcontext)():  # plain weights to write (nn/onednn.py)
            _write_pipeline(pipe, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_pipeline(pipe, out: Path) -> None:
    import tessera

    index = {"_class_name": type(pipe).__name__, "_tessera_version": tessera.__version__, "paradigm": pipe.paradigm,
             "generator": ["tessera", type(pipe.generator).__name__]}
    _export_component(pipe.generator, out / "generator")
    if pipe.tokenizer is not None:
        index["tokenizer"] = ["tessera", type(pipe.tokenizer).__name__]
        _export_component(pipe.tokenizer, out / "tokenizer")
    if getattr(pipe, "token_sr", None) is not None:
        index["token_sr"] = ["tessera", type(pipe.token_sr).__name__]
        _export_component(pipe.token_sr, out / "token_sr")
    if pipe.text_encoder is not None:
        index["text_encoder"] = ["tessera", type(pipe.text_encoder).__name__]
        record = pipe.text_encoder.save(out / "text_encoder") if hasattr(pipe.text_encoder, "save") else \
            {"name": pipe.text_encoder_name}  # an installed encoder: its name only
        atomic_write_bytes(out / "text_encoder" / TEXT_ENCODER_JSON, (json.dumps(record, indent=2) + "\n").encode())
    if pipe.paradigm == "diffusion":
        index["scheduler"] = ["tessera", "DiffusionConfig"]
        if hasattr(pipe, "space"):  # Tessera's own diffusion pipelines (SD's latent scale is its VAE's)
            index.update(latent_scale=pipe.scale, space=pipe.space)
        atomic_write_bytes(out / "scheduler" / SCHEDULER_JSON, (pipe.scheduler.to_json() + "\n").encode())
    index["sampler"] = {k: v for k, v in dataclasses.asdict(pipe.sampler).items() if k not in ("n", "noise_seeds")}
    atomic_write_bytes(out / INDEX, (json.dumps(index, indent=2) + "\n").encode())


def save_default_pipeline(paradigm: str, out: str | Path, generator: str | None = None, tokenizer: str | None = None,
                          text_encoder: str | None = None, token_sr: str | None = None) -> Path:
    """`tessera pipeline save`: the bundled default of `paradigm`, or the given components, as a folder
    (`token_sr`: a masked pipeline's token super-resolution stage, a masked-sr model folder)."""
    if paradigm not in paradigms():
        raise InvalidInputError(f"--paradigm {paradigm}: must be one of {paradigms()}")
    pipe = load_pipeline(generator or paradigm, tokenizer, text_encoder, device="cpu", dtype="float32",
                         paradigm=paradigm)
    if token_sr is not None:
        from tessera.checkpoint import load_model

        if not hasattr(pipe, "set_token_sr"):
            raise InvalidInputError(f"--token-sr: the {paradigm} paradigm has no token super-resolution stage (masked)")
        pipe.set_token_sr(load_model(resolve(token_sr)))
    return save_pipeline(pipe, out)


def paradigm_of(spec: str | Path) -> str:
    """The paradigm a pipeline folder, generator (folder or preset) or paradigm name generates in."""
    if str(spec) in paradigms():
        return str(spec)
    from tessera.pipelines.amused import is_amused_folder
    from tessera.pipelines.stable_diffusion import is_diffusers_folder

    if is_amused_folder(spec):  # a diffusers aMUSEd folder
        return "masked"
    if is_release_pipeline(spec):  # LlamaGen / taming-transformers
        return "ar"
    if is_diffusers_folder(spec):  # a diffusers Stable Diffusion folder
        return "diffusion"
    if is_pipeline_folder(spec):
        try:
            return json.loads((Path(spec) / INDEX).read_text())["paradigm"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelNotFoundError(f"{Path(spec) / INDEX}: not a readable pipeline index ({e})") from None
    kind = read_meta(resolve(spec)).kind
    paradigm = family(kind).paradigm
    if paradigm is None:
        raise WrongModelError(f"{spec} is a {kind!r} model, not a generator")
    return paradigm


def models_by_paradigm(specs) -> dict[str, str]:
    """['DIR', 'ar-xs', ...] -> {paradigm: spec}; two for one paradigm is an error."""
    out: dict[str, str] = {}
    for spec in specs:
        p = paradigm_of(spec)
        if p in out:
            raise InvalidInputError(f"--model {spec}: {out[p]} already serves the {p} paradigm")
        out[p] = str(spec)
    return out
