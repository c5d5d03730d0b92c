"""`tessera` command: thin argument parsing over the library (no model logic here)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


@click.group()
@click.version_option(package_name="tessera")
def main() -> None:
    """Tessera: curate data, train a tokenizer and generators, reconstruct, generate."""


# ---- data -------------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Data curation."""


@data.command("prepare")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--size", default=128, show_default=True, help="output side in pixels")
@click.option("--format", "image_format", default="png", type=click.Choice(["png", "jpg"]), show_default=True)
@click.option("--val-fraction", default=0.05, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--min-size", default=64, show_default=True, help="minimum shorter side")
@click.option("--phash-distance", default=6, show_default=True, help="near-duplicate Hamming threshold")
@click.option("--max-pixels", default=64_000_000, show_default=True, help="decompression-bomb cap")
@click.option("--scorer", "scorers", multiple=True, help="plug-in scorer 'module:factory' (repeatable)")
@click.option("--engine", default="local", type=click.Choice(["local", "ray"]), show_default=True,
              help="ray: Ray Data map_batches stages (the ray extra); same shards and catalog")
def data_prepare(sources, out, size, image_format, val_fraction, workers, min_size, phash_distance, max_pixels,
                 scorers, engine) -> None:
    """Decode, filter, deduplicate and shard SOURCES (folders, .tar shards, .parquet files) into OUT."""
    from tessera.data.filters import FilterConfig
    from tessera.data.prepare import PrepareConfig, prepare
    from tessera.data.sources import SourceError

    try:
        cfg = PrepareConfig(size=size, image_format=image_format, val_fraction=val_fraction, workers=workers,
                            max_pixels=max_pixels, scorers=tuple(scorers),
                            filters=FilterConfig(min_size=min_size, phash_distance=phash_distance))
        report = prepare(list(sources), out, cfg, engine=engine)
    except (SourceError, ValueError) as e:
        _fail(str(e))
    click.echo(json.dumps({k: report[k] for k in ("kept", "kept_by_split", "rejected", "rejected_by_reason",
                                                  "images_per_second")}, indent=2))


@data.command("from-serving")
@click.option("--serve-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="the --data-dir of `tessera serve`")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="source folder for `data prepare`")
@click.option("--min-rating", type=float, default=None, help="leave out images rated below this (mean of 1-5)")
@click.option("--rated-only", is_flag=True, help="leave out images nobody rated")
@click.option("--nsfw-threshold", type=float, default=0.8, show_default=True,
              help="open_nsfw score that leaves an image out")
def data_from_serving(serve_dir, out, min_rating, rated_only, nsfw_threshold) -> None:
    """The data flywheel: served images + their prompts (+ ratings) -> a folder `data prepare` takes."""
    from tessera.data.flywheel import export_from_serving
    from tessera.safety.image import ImageSafety

    try:
        report = export_from_serving(serve_dir, out, min_rating, not rated_only,
                                     image_safety=ImageSafety(nsfw_threshold))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps(report, indent=2))


# ---- training -----------------------------------------------------------------------------------------
@main.group()
def train() -> None:
    """Train a model (every trainer takes the same options)."""


def _train_options(f):
    f = click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))(f)
    f = click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False))(f)
    f = click.option("--preset", default=None, help="model preset name")(f)
    f = click.option("--max-steps", type=int, default=None)(f)
    f = click.option("--resume/--no-resume", default=False, help="continue from OUT/state.pt")(f)
    f = click.option("--set", "overrides", multiple=True,
                     help="config override KEY=JSON, e.g. train.lr=1e-4 or task.loss.disc_start=0")(f)
    return f


@train.command("tokenizer")
@_train_options
def train_tokenizer(data_dir, run_dir, preset, max_steps, resume, overrides) -> None:
    """Train the VQ tokenizer on a prepared folder."""
    from tessera.train.runs import run_training

    try:
        logs = run_training("tokenizer", data_dir, run_dir, preset, max_steps, resume, list(overrides))
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps(logs))


@train.command("ar")
@_train_options
@click.option("--tokenizer", default="vq-f8", show_default=True, help="tokenizer whose token cache to train on")
@click.option("--text-encoder", default="minilm", show_default=True, help="prompt encoder ('none': unconditional)")
def train_ar(data_dir, run_dir, preset, max_steps, resume, overrides, tokenizer, text_encoder) -> None:
    """Train the autoregressive generator on cached token grids (+ cached caption embeddings)."""
    _train_token_generator("ar", data_dir, run_dir, preset, max_steps, resume, overrides, tokenizer,
                           text_encoder)


@train.command("masked")
@_train_options
@click.option("--tokenizer", default="vq-f8", show_default=True, help="tokenizer whose token cache to train on")
@click.option("--text-encoder", default="minilm", show_default=True, help="prompt encoder ('none': unconditional)")
def train_masked(data_dir, run_dir, preset, max_steps, resume, overrides, tokenizer, text_encoder) -> None:
    """Train the masked generator (Muse / MaskGIT) on cached token grids (+ cached caption embeddings)."""
    _train_token_generator("masked", data_dir, run_dir, preset, max_steps, resume, overrides,
                           tokenizer, text_encoder)


def _train_token_generator(task, data_dir, run_dir, preset, max_steps, resume, overrides, tokenizer, text_encoder):
    from tessera.train.runs import prepare_inputs, run_training

    try:
        model_updates, task_updates = ({}, {}) if resume else prepare_inputs(task, data_dir, tokenizer, text_encoder)
        logs = run_training(task, data_dir, run_dir, preset, max_steps, resume, list(overrides),
                            model_updates, task_updates)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps(logs))


@train.command("diffusion")
@_train_options
@click.option("--arch", default="unet", type=click.Choice(["unet", "dit"]), show_default=True,
              help="denoiser architecture (default preset: unet-s / dit-s)")
@click.option("--tokenizer", default="vq-f8", show_default=True, help="tokenizer whose latents to diffuse")
@click.option("--space", default="latent", type=click.Choice(["latent", "pixel"]), show_default=True)
@click.option("--text-encoder", default="minilm", show_default=True, help="prompt encoder ('none': unconditional)")
def train_diffusion(data_dir, run_dir, preset, max_steps, resume, overrides, arch, tokenizer, space,
                    text_encoder) -> None:
    """Train a diffusion denoiser (DDPM objective) on cached latents (+ cached caption embeddings)."""
    from tessera.train.runs import prepare_inputs, run_training

    try:
        model_updates, task_updates = ({}, {}) if resume else prepare_inputs("diffusion", data_dir, tokenizer,
                                                                              text_encoder, space)
        logs = run_training("diffusion", data_dir, run_dir, preset or f"{arch}-s", max_steps, resume,
                            list(overrides), model_updates, task_updates)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps(logs))


@train.command("sr")
@_train_options
@click.option("--tokenizer", default="vq-f8", show_default=True,
              help="tokenizer whose round trip degrades half of the low-resolution inputs ('' = bicubic only)")
def train_sr(data_dir, run_dir, preset, max_steps, resume, overrides, tokenizer) -> None:
    """Train a super-resolution model (L1) on crops of a prepared high-resolution folder."""
    from tessera.train.runs import prepare_inputs, run_training

    try:
        model_updates, task_updates = prepare_inputs("sr", data_dir, tokenizer)
        logs = run_training("sr", data_dir, run_dir, preset, max_steps, resume, list(overrides),
                            model_updates, task_updates)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps(logs))


@train.command("contrastive")
@_train_options
@click.option("--text-encoder", default="minilm", show_default=True, help="the frozen prompt encoder")
def train_contrastive(data_dir, run_dir, preset, max_steps, resume, overrides, text_encoder) -> None:
    """Train the contrastive image-text model (offline CLIPScore) on a captioned prepared folder."""
    from tessera.train.runs import prepare_inputs, run_training

    try:
        model_updates, task_updates = prepare_inputs("contrastive", data_dir, text_encoder=text_encoder)
        logs = run_training("contrastive", data_dir, run_dir, preset, max_steps, resume,
                            list(overrides), model_updates, task_updates)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps(logs))


@train.command("safety")
@click.option("--prompts", "prompt_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="labelled TSV (text, label); default: the bundled policy prompt set")
@click.option("--text-encoder", default="minilm", show_default=True)
@click.option("--steps", default=400, show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="export folder")
def train_safety(prompt_file, text_encoder, steps, out) -> None:
    """Train the prompt-policy classifier (seconds) and export it with its held-out report."""
    from tessera.checkpoint import export_model
    from tessera.train.safety import POLICY_PROMPTS, train_prompt_safety

    try:
        model, report = train_prompt_safety(prompt_file or POLICY_PROMPTS, text_encoder, steps)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    export_model(model, "prompt-safety", out, {"report": report, "prompts": str(prompt_file or "policy_prompts.tsv")})
    click.echo(json.dumps(report, indent=2))


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--dtype", default="float32", type=click.Choice(["float32", "float16", "bfloat16"]), show_default=True,
              help="storage dtype of the weights (float16 halves the size)")
def export(run_dir, out, dtype) -> None:
    """Export a run's EMA weights as a model folder (config.json + model.safetensors + meta.json)."""
    from tessera.train.runs import export_run

    try:
        path = export_run(run_dir, out, dtype)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(str(path))


# ---- tokenizer tools -------------------------------------------------------------------------------------
@main.command("reconstruct")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="output file (one input) or folder")
@click.option("--model", default="vq-f8", show_default=True, help="model folder or bundled preset")
def reconstruct(inputs, out, model) -> None:
    """Round-trip images through the tokenizer at their own size; prints PSNR and SSIM."""
    from tessera.tokenizer.tools import reconstruct_files

    try:
        rows = reconstruct_files(list(inputs), out, model)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    for r in rows:
        click.echo(f"{r['input']} -> {r['output']}  {r['width']}x{r['height']}  {r['tokens']} tokens  "
                   f"PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}")


@data.command("embed-captions")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--encoder", default="minilm", show_default=True, help="minilm | tiny | HF name or path")
def data_embed_captions(data_dir, encoder) -> None:
    """Cache every kept image's caption embedding beside the shards (DATA/text/<encoder>/)."""
    from tessera.text import PromptError, load_text_encoder
    from tessera.text.cache import embed_captions

    try:
        out = embed_captions(data_dir, load_text_encoder(encoder), encoder)
    except (ValueError, FileNotFoundError, PromptError) as e:
        _fail(str(e))
    click.echo(str(out))


@main.command("tokenize")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--model", default="vq-f8", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
def tokenize(data_dir, model, batch_size) -> None:
    """Cache every kept image's token grid beside the shards (DATA/tokens/<model-sha>/)."""
    from tessera.tokenizer.tools import tokenize_dataset

    try:
        out = tokenize_dataset(data_dir, model, batch_size)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    click.echo(str(out))


@main.group("sample")
def sample_() -> None:
    """Sample images from a generator."""


def _save_grid(images, prompt: str, out: str, params, **names) -> None:
    """One PNG grid with an A1111-style `parameters` chunk and a JSON chunk of every setting."""
    from tessera.pipelines.ar import grid, png_info

    grid(images).save(out, pnginfo=png_info(prompt, {**names, **dataclasses.asdict(params)}))
    click.echo(out)


@sample_.command("ar")
@click.argument("prompt", default="")
@click.option("--model", required=True, help="AR generator folder or preset")
@click.option("--tokenizer", default="vq-f8", show_default=True)
@click.option("--text-encoder", default="minilm", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("-n", default=4, show_default=True, help="images for the prompt (batched)")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--cfg", "cfg_scale", default=3.0, show_default=True, help="classifier-free guidance scale")
@click.option("--cfg-interval", default=-1, show_default=True, help="guide only the first K tokens (-1: all)")
@click.option("--fp32", is_flag=True, help="disable bf16 autocast")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="grid PNG")
def sample_ar(prompt, model, tokenizer, text_encoder, seed, n, temperature, top_k, top_p, cfg_scale, cfg_interval,
              fp32, out) -> None:
    """Sample N images for PROMPT with the AR generator; writes a grid PNG with its parameters."""
    import tessera
    from tessera.pipelines.ar import ARPipeline, ARSampleParams
    from tessera.text import PromptError, load_text_encoder
    from tessera.tokenizer.tools import load_tokenizer

    from tqdm import tqdm

    params = ARSampleParams(seed, n, temperature, top_k, top_p, cfg_scale, cfg_interval, not fp32)
    try:
        gen = tessera.load(model)
        enc = load_text_encoder(text_encoder) if gen.config.conditional else None
        pipe = ARPipeline(gen, load_tokenizer(tokenizer), enc)
        bar = tqdm(total=gen.config.num_tokens, desc="tokens", unit="tok")
        images = pipe(prompt, params, callback=lambda i, total: bar.update(1))
        bar.close()
    except (ValueError, FileNotFoundError, RuntimeError, PromptError) as e:
        _fail(str(e))
    _save_grid(images, prompt, out, params, model=model, tokenizer=tokenizer, text_encoder=text_encoder)


def _masked_options(f):
    for opt in reversed([
        click.option("--model", required=True, help="masked generator folder or preset"),
        click.option("--tokenizer", default="vq-f8", show_default=True),
        click.option("--text-encoder", default="minilm", show_default=True),
        click.option("--seed", default=0, show_default=True),
        click.option("-n", default=4, show_default=True, help="images (batched)"),
        click.option("--steps", default=12, show_default=True, help="decoding steps (8-24)"),
        click.option("--temperature", default=1.0, show_default=True),
        click.option("--choice-temperature", default=4.5, show_default=True,
                     help="Gumbel noise on confidences, annealed to 0"),
        click.option("--cfg", "cfg_scale", default=3.0, show_default=True, help="classifier-free guidance scale"),
        click.option("--fp32", is_flag=True, help="disable bf16 autocast"),
        click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="grid PNG"),
    ]):
        f = opt(f)
    return f


def _masked_run(prompt, model, tokenizer, text_encoder, seed, n, steps, temperature, choice_temperature,
                cfg_scale, fp32, out, inpaint=None):
    import tessera
    from tessera.pipelines.masked import MaskedPipeline, MaskedSampleParams
    from tessera.text import PromptError, load_text_encoder
    from tessera.tokenizer.tools import load_tokenizer

    from tqdm import tqdm

    params = MaskedSampleParams(seed, n, steps, temperature, choice_temperature, cfg_scale, not fp32)
    try:
        gen = tessera.load(model)
        if getattr(gen, "meta", {}).get("kind") != "masked":
            raise ValueError(f"{model} is not a masked generator")
        enc = load_text_encoder(text_encoder) if gen.config.conditional else None
        pipe = MaskedPipeline(gen, load_tokenizer(tokenizer), enc)
        bar = tqdm(total=steps, desc="steps", unit="step")
        progress = lambda i, total: bar.update(1)  # noqa: E731
        images = pipe(prompt, params, progress) if inpaint is None else pipe.inpaint(*inpaint, prompt, params, progress)
        bar.close()
    except (ValueError, FileNotFoundError, RuntimeError, PromptError) as e:
        _fail(str(e))
    _save_grid(images, prompt, out, params, model=model, tokenizer=tokenizer, text_encoder=text_encoder)


@sample_.command("masked")
@click.argument("prompt", default="")
@_masked_options
def sample_masked(prompt, **kw) -> None:
    """Sample N images for PROMPT with the masked generator (iterative parallel decoding)."""
    _masked_run(prompt, **kw)


@main.command("inpaint")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--mask", "mask_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="mask image of the same size: white = regenerate, black = keep")
@click.argument("prompt", default="")
@_masked_options
def inpaint(image, mask_path, prompt, **kw) -> None:
    """Regenerate the white region of MASK in IMAGE with the masked generator (outpainting: mask the border)."""
    from tessera.data.decode import Rejected, decode_image

    try:
        im, region = (decode_image(Path(p).read_bytes()) for p in (image, mask_path))
    except Rejected as r:
        _fail(f"cannot read the image or mask: {r}")
    _masked_run(prompt, inpaint=(im, region), **kw)


@sample_.command("diffusion")
@click.argument("prompt", default="")
@click.option("--model", required=True, help="diffusion denoiser folder or preset")
@click.option("--tokenizer", default=None, help="decoder of the latents (default: the one it was trained with)")
@click.option("--text-encoder", default="minilm", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("-n", default=4, show_default=True, help="images for the prompt (batched)")
@click.option("--steps", default=20, show_default=True)
@click.option("--cfg", "cfg_scale", default=5.0, show_default=True, help="classifier-free guidance scale")
@click.option("--sampler", "method", default="ddim", type=click.Choice(["ddim", "ddpm"]), show_default=True)
@click.option("--eta", default=0.0, show_default=True, help="DDIM noise (0: deterministic, 1: DDPM-like)")
@click.option("--negative-prompt", default="", help="guide away from this prompt instead of the null condition")
@click.option("--fp32", is_flag=True, help="disable bf16 autocast")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="grid PNG")
def sample_diffusion(prompt, model, tokenizer, text_encoder, seed, n, steps, cfg_scale, method, eta,
                     negative_prompt, fp32, out) -> None:
    """Sample N images for PROMPT with a diffusion denoiser; writes a grid PNG with its parameters."""
    from tessera.pipelines.diffusion import DiffusionSampleParams, load_diffusion_pipeline
    from tessera.text import PromptError

    from tqdm import tqdm

    params = DiffusionSampleParams(seed, n, steps, cfg_scale, method, eta, negative_prompt, not fp32)
    try:
        pipe, tokenizer = load_diffusion_pipeline(model, tokenizer, text_encoder)
        bar = tqdm(total=steps, desc="steps", unit="step")
        images = pipe(prompt, params, callback=lambda i, total: bar.update(1))
        bar.close()
    except (ValueError, FileNotFoundError, RuntimeError, PromptError) as e:
        _fail(str(e))
    _save_grid(images, prompt, out, params, model=model, tokenizer=tokenizer, text_encoder=text_encoder)


@main.command("generate")
@click.argument("prompt")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="output PNG (a grid when -n > 1)")
@click.option("--paradigm", default="diffusion", show_default=True, type=click.Choice(["diffusion", "ar", "masked"]))
@click.option("--model", default=None, help="generator folder or preset for the paradigm (default: the bundled one)")
@click.option("--size", default=1024, show_default=True, help="output side in pixels, up to 2048 (0: the generator's 128)")
@click.option("-n", default=1, show_default=True, help="images (1-8)")
@click.option("--seed", default=-1, show_default=True, help="-1: random (printed and stored in the PNG)")
@click.option("--steps", type=int, default=None, help="masked / diffusion steps (default: the paradigm's)")
@click.option("--cfg", "cfg_scale", type=float, default=None, help="classifier-free guidance scale")
@click.option("--temperature", type=float, default=None, help="ar / masked")
@click.option("--top-k", type=int, default=None, help="ar")
@click.option("--top-p", type=float, default=None, help="ar")
@click.option("--negative-prompt", default="", help="diffusion")
@click.option("--no-enhance", is_flag=True, help="use the prompt as written (no enhancement)")
@click.option("--diversify", is_flag=True, help="vary skin tone / gender across the images of a people prompt")
def generate(prompt, out, paradigm, model, size, n, seed, steps, cfg_scale, temperature, top_k, top_p,
             negative_prompt, no_enhance, diversify) -> None:
    """Generate images for PROMPT with the bundled defaults: prompt safety, enhancement, generation,
    decoding, harm detection, super-resolution to --size."""
    from tqdm import tqdm

    from tessera.pipelines.ar import grid, png_info
    from tessera.pipelines.text2image import Request, TextToImage
    from tessera.safety import UnsafePromptError
    from tessera.text import PromptError

    req = Request(prompt, paradigm, size, n, seed, steps, cfg_scale, temperature, top_k, top_p, negative_prompt,
                  not no_enhance, diversify)
    try:
        req.validate()
        pipe = TextToImage({paradigm: model} if model else None)
        bar = tqdm(desc=paradigm, unit="step")
        result = pipe(req, callback=lambda i, total: (setattr(bar, "total", total), bar.update(1)))
        bar.close()
    except UnsafePromptError as e:
        _fail(f"{e} — nothing was generated")
    except (ValueError, FileNotFoundError, RuntimeError, PromptError) as e:
        _fail(str(e))
    for w in result.withheld:
        click.echo(f"image {w['index']} withheld by harm detection: {w['category']} (score {w['score']})", err=True)
    if not result.images:
        _fail("every image was withheld by harm detection; nothing was written")
    record = {**result.settings, "seed": result.seed, "revised_prompt": result.revised_prompt,
              "prompts": result.prompts, "changes": result.changes, "withheld": result.withheld,
              "seconds": result.timings}
    image = result.images[0] if len(result.images) == 1 else grid(result.images)
    image.save(out, pnginfo=png_info(prompt, record))
    click.echo(f"{out}  {image.width}x{image.height}  seed {result.seed}  revised: {result.revised_prompt!r}  "
               f"{json.dumps(result.timings)}")


@main.group("pipeline")
def pipeline_() -> None:
    """The training pipeline: data -> train -> evaluate -> gate -> promote."""


@pipeline_.command("run")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--run-id", default=None, help="run folder name under the config's workdir (default: a timestamp)")
def pipeline_run(config_file, run_id) -> None:
    """Run the pipeline described by CONFIG_FILE (JSON); writes report.json / report.md in the run folder.
    Exit code 0 when the candidate was promoted, 3 when the gate rejected it."""
    from tessera.train.workflow import PipelineConfig, run_pipeline

    try:
        cfg = PipelineConfig.from_dict(json.loads(Path(config_file).read_text()))
        report = run_pipeline(cfg, run_id)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(str(e))
    if "promoted" not in report:  # a rank > 0 under torchrun: rank 0 reports
        return
    click.echo(json.dumps({k: report[k] for k in ("run", "promoted", "metrics")}, indent=2))
    click.echo("\n".join(report["decision"]["reasons"]))
    if not report["promoted"]:
        sys.exit(3)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@main.command("serve")
@click.argument("stage", default="gateway", type=click.Choice(["gateway", "generation", "decoding", "superres"]))
@click.option("--host", default="127.0.0.1", show_default=True, help="another address requires --api-key")
@click.option("--port", type=int, default=None, help="default: 8000 gateway, 8101-8103 stage services")
@click.option("--data-dir", default="tessera-serve", show_default=True, help="jobs, images, feedback (gateway)")
@click.option("--api-key", "api_keys", multiple=True, envvar="TESSERA_API_KEYS",
              help="accepted Bearer key (repeatable; env TESSERA_API_KEYS, space-separated)")
@click.option("--max-queue", type=int, default=64, show_default=True, help="queued jobs before 429")
@click.option("--max-batch", type=int, default=8, show_default=True, help="jobs per generation batch (1: no batching)")
@click.option("--deadline", type=float, default=600.0, show_default=True, help="default per-request deadline (s)")
@click.option("--generation-url", default=None, help="the generation service (default: in-process)")
@click.option("--decoding-url", default=None, help="the decoding service (default: in-process)")
@click.option("--superres-url", default=None, help="the super-resolution service (default: in-process)")
@click.option("--preload", default="diffusion", show_default=True, help="paradigms to load at start (comma-separated)")
@click.option("--ray", "use_ray", is_flag=True, help="run the stages as Ray Serve deployments (the ray extra)")
@click.option("--replicas", default="1,1,1", show_default=True, help="--ray: generation,decoding,superres replicas")
def serve(stage, host, port, data_dir, api_keys, max_queue, max_batch, deadline, generation_url, decoding_url,
          superres_url, preload, use_ray, replicas) -> None:
    """The HTTP server: the gateway (OpenAI-compatible images API, jobs, web page at /) or one stage service."""
    import uvicorn

    keys = tuple(k for arg in api_keys for k in arg.split())
    if host not in LOOPBACK and not keys:
        _fail(f"--host {host}: serving beyond this machine requires API keys (--api-key or TESSERA_API_KEYS)")
    paradigms = tuple(p for p in preload.split(",") if p)
    if stage != "gateway":
        from tessera.serve.services import create_stage_app

        app = create_stage_app(stage, preload=paradigms if stage != "superres" else ())
        port = port or {"generation": 8101, "decoding": 8102, "superres": 8103}[stage]
    else:
        from tessera.serve.app import ServeConfig, create_app

        urls = {k: v for k, v in (("generation", generation_url), ("decoding", decoding_url),
                                  ("superres", superres_url)) if v}
        config = ServeConfig(data_dir, keys, max_queue, max_batch, deadline_s=deadline, stage_urls=urls,
                             preload=paradigms)
        pipeline = None
        if use_ray:
            from tessera.serve.ray_app import ray_pipeline

            pipeline = ray_pipeline(*[int(r) for r in replicas.split(",")])
        app = create_app(config, pipeline)
        port = port or 8000
    click.echo(f"tessera {stage} on http://{host}:{port}/  (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@main.command("upscale")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
@click.option("--size", default=None, help="exact output size: N (square) or WxH, e.g. 1024 or 2048")
@click.option("--scale", type=int, default=None, help="2 or 4 (instead of --size)")
@click.option("--model", default="fast", show_default=True,
              help="fast (Tessera's compact x4/x2) | x4plus (Real-ESRGAN) | a model folder or preset")
@click.option("--tile", type=int, default=192, show_default=True, help="tile side in input pixels")
@click.option("--bf16/--fp32", default=True, show_default=True)
def upscale(src, out, size, scale, model, tile, bf16) -> None:
    """Super-resolve SRC to exactly --size through the x4 / x2 cascade (tiled, bounded memory)."""
    from tessera.superres.cascade import parse_size, upscale_file

    try:
        img = upscale_file(src, out, parse_size(size) if size else None, scale, model, tile=tile, bf16=bf16)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    click.echo(f"{out}  {img.width}x{img.height}")


@main.group("eval")
def eval_() -> None:
    """Evaluation."""


@eval_.command("reconstruction")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--model", default="vq-f8", show_default=True)
@click.option("--split", default="val", type=click.Choice(["val", "train", "all"]), show_default=True)
@click.option("--bf16/--fp32", default=False, show_default=True)
@click.option("--limit", type=int, default=None, help="evaluate only the first N images")
@click.option("--rfd", is_flag=True, help="also the Fréchet distance of reconstructions to originals (open_nsfw space)")
def eval_reconstruction(data_dir, model, split, bf16, limit, rfd) -> None:
    """PSNR / SSIM / codebook usage of a tokenizer on a prepared split (held-out: val)."""
    from tessera.eval.reconstruction import evaluate_reconstruction
    from tessera.tokenizer.tools import load_tokenizer

    try:
        m = load_tokenizer(model)
        out = evaluate_reconstruction(m, data_dir, None if split == "all" else split, bf16=bf16, limit=limit, rfd=rfd)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    click.echo(json.dumps({"model": model, **out}, indent=2))


@eval_.command("caption-margin")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--model", required=True, help="text-conditioned generator (AR or diffusion) folder or preset")
@click.option("--cache", default=None, help="token/latent cache name under DATA/tokens|latents (default: the model's)")
@click.option("--text", default=None, help="caption cache name under DATA/text (default: the model's)")
@click.option("--limit", type=int, default=None, help="score only the first N held-out images")
def eval_caption_margin(data_dir, model, cache, text, limit) -> None:
    """Held-out NLL (AR) or denoising loss (diffusion) with the true vs. a shuffled caption."""
    import tessera
    from tessera.eval.captions import caption_margin

    try:
        out = caption_margin(tessera.load(model), data_dir, cache, text, limit)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    click.echo(json.dumps({"model": model, **out}, indent=2))


@eval_.command("fid")
@click.option("--real", required=True, type=click.Path(exists=True, file_okay=False), help="folder of reference images")
@click.option("--fake", required=True, type=click.Path(exists=True, file_okay=False), help="folder of generated images")
@click.option("--kid-subsets", type=int, default=100, show_default=True)
@click.option("--kid-subset-size", type=int, default=1000, show_default=True)
@click.option("--inception-weights", default=None, type=click.Path(dir_okay=False),
              help="pt_inception-2015-12-05-6726825d.pth: real FID / KID / IS (default: open_nsfw features)")
def eval_fid(real, fake, kid_subsets, kid_subset_size, inception_weights) -> None:
    """Fréchet distance and KID between two image folders (offline feature space: open_nsfw ResNet-50)."""
    from tessera.eval.frechet import compare_folders

    try:
        out = compare_folders(real, fake, kid_subsets, kid_subset_size, inception_weights)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    click.echo(json.dumps({"real": real, "fake": fake, **out}, indent=2))


@eval_.command("sr")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="prepared folder of high-resolution photos (held-out: --split val)")
@click.option("--model", "models", multiple=True, default=("fast",), show_default=True,
              help="'fast', 'x4plus', or a model folder / preset (repeatable)")
@click.option("--scale", type=int, default=4, show_default=True)
@click.option("--split", default="val", type=click.Choice(["val", "train"]), show_default=True)
@click.option("--bf16/--fp32", default=False, show_default=True)
@click.option("--limit", type=int, default=None, help="evaluate only the first N images")
@click.option("--degrade", default="bicubic", type=click.Choice(["bicubic", "tokenizer"]), show_default=True,
              help="tokenizer: the bicubic input also goes through the tokenizer's round trip")
@click.option("--tokenizer", default="vq-f8", show_default=True, help="tokenizer for --degrade tokenizer")
def eval_sr(data_dir, models, scale, split, bf16, limit, degrade, tokenizer) -> None:
    """PSNR / SSIM of bicubic, Lanczos and SR models on bicubic-downscaled held-out photos."""
    from PIL import Image

    import tessera
    from tessera.eval.sr import evaluate_sr, model_upscaler, pillow_upscaler, tokenizer_degrader
    from tessera.superres.cascade import load_sr_models

    try:
        degrader = tokenizer_degrader(tessera.load(tokenizer)) if degrade == "tokenizer" else None
        methods = {"bicubic": pillow_upscaler(scale, Image.Resampling.BICUBIC),
                   "lanczos": pillow_upscaler(scale, Image.Resampling.LANCZOS)}
        for name in models:
            found = load_sr_models(name)
            if scale not in found:
                raise ValueError(f"{name!r} has no x{scale} model (has x{sorted(found)})")
            methods[name] = model_upscaler(found[scale], scale, bf16)
        out = evaluate_sr(methods, data_dir, scale, split, limit=limit, degrade=degrader)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    click.echo(json.dumps({"data": data_dir, "split": split, "scale": scale, "degrade": degrade, "results": out},
                          indent=2))


def _settings(pairs: tuple[str, ...]) -> dict:
    """('steps=10', 'cfg_scale=3') -> {'steps': 10, 'cfg_scale': 3} (values are JSON, else strings)."""
    out = {}
    for kv in pairs:
        key, eq, raw = kv.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{kv!r} must be KEY=VALUE", param_hint="--set")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _sample_options(f):
    for opt in reversed([
        click.option("--model", required=True, help="generator folder or preset (ar, masked, unet or dit)"),
        click.option("--tokenizer", default=None, help="default: the one the generator was trained with"),
        click.option("--text-encoder", default="minilm", show_default=True),
        click.option("--batch-size", default=16, show_default=True, help="prompts drawn together"),
        click.option("--set", "settings", multiple=True,
                     help="sampling setting KEY=VALUE, e.g. steps=10, cfg_scale=3, top_k=100, seed=1 (repeatable)"),
        click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
                     help="samples folder (resumes if it holds the same settings)"),
    ]):
        f = opt(f)
    return f


@eval_.command("sample")
@_sample_options
@click.option("--prompts", "prompt_file", default=None, type=click.Path(dir_okay=False),
              help="TSV with a Prompt column (PartiPrompts) or one prompt per line")
@click.option("--data", "data_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="or: the captions of a prepared folder's --split")
@click.option("--split", default="val", type=click.Choice(["val", "train"]), show_default=True)
@click.option("--limit", type=int, default=None, help="only the first N prompts")
def eval_sample(model, tokenizer, text_encoder, batch_size, settings, out, prompt_file, data_dir, split, limit) -> None:
    """Write evaluation samples: one image per prompt + samples.json with every setting and the timing."""
    from tessera.eval.prompts import read_prompts
    from tessera.eval.samples import dataset_prompts, generate_samples
    from tessera.text import PromptError

    if (prompt_file is None) == (data_dir is None):
        _fail("give exactly one of --prompts FILE or --data DIR")
    try:
        prompts = read_prompts(prompt_file)[:limit] if prompt_file else dataset_prompts(data_dir, split, limit)
        record = generate_samples(model, prompts, out, _settings(settings), batch_size, tokenizer, text_encoder)
    except (ValueError, FileNotFoundError, RuntimeError, PromptError) as e:
        _fail(str(e))
    click.echo(f"{out}: {len(record['images'])} images, {len(record['skipped'])} prompts skipped")


@eval_.command("clipscore")
@click.argument("samples", type=click.Path(exists=True, file_okay=False))
@click.option("--clip", "clip_model", default="clip-xs", show_default=True,
              help="Tessera contrastive model (preset / folder) or a Hugging Face CLIP folder")
def eval_clipscore(samples, clip_model) -> None:
    """CLIPScore of a samples folder's images with their prompts (per category and overall)."""
    from tessera.eval.clipscore import load_image_text_model
    from tessera.eval.prompts import per_category, score_samples

    try:
        scorer = load_image_text_model(clip_model)
        record, scores = score_samples(samples, scorer)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    click.echo(json.dumps({"samples": samples, "feature_space": scorer.space,
                           "per_category": per_category(record, scores)}, indent=2))


@eval_.command("latency")
@click.argument("samples", type=click.Path(exists=True, file_okay=False))
@click.option("--price-per-hour", type=float, default=0.10, show_default=True,
              help="what the machine costs per hour (any currency), for the cost per image")
def eval_latency(samples, price_per_hour) -> None:
    """Seconds per image, images/s, peak memory and cost per image of a samples folder."""
    from tessera.eval.samples import read_samples, timing_summary

    try:
        record, _ = read_samples(samples)
        out = timing_summary(record, price_per_hour)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps({"samples": samples, "models": record["models"], "settings": record["settings"], **out},
                          indent=2))


@eval_.command("prompts")
@click.argument("prompt_file", type=click.Path(exists=True, dir_okay=False))
@_sample_options
@click.option("--per-category", type=int, default=None, help="only the first N prompts of each category")
@click.option("--category", "categories", multiple=True, help="only this category (repeatable)")
@click.option("--clip", "clip_model", default="clip-xs", show_default=True)
@click.option("--price-per-hour", type=float, default=0.10, show_default=True)
def eval_prompts(prompt_file, model, tokenizer, text_encoder, batch_size, settings, out, per_category, categories,
                 clip_model, price_per_hour) -> None:
    """Prompt benchmark: generate for each prompt of PROMPT_FILE (e.g. PartiPrompts.tsv), then CLIPScore
    and seconds per image for each category; writes OUT/report.json and OUT/report.md."""
    from tessera.eval.clipscore import load_image_text_model
    from tessera.eval.prompts import markdown_table, per_category as by_category, read_prompts, score_samples
    from tessera.eval.samples import generate_samples, timing_summary
    from tessera.text import PromptError

    try:
        prompts = read_prompts(prompt_file, per_category, list(categories) or None)
        scorer = load_image_text_model(clip_model)
        generate_samples(model, prompts, out, _settings(settings), batch_size, tokenizer, text_encoder)
        record, scores = score_samples(out, scorer)
    except (ValueError, FileNotFoundError, RuntimeError, PromptError) as e:
        _fail(str(e))
    rows = by_category(record, scores)
    report = {"prompts": prompt_file, "skipped": record.get("skipped", []), "models": record["models"],
              "settings": record["settings"],
              "feature_space": scorer.space, "timing": timing_summary(record, price_per_hour), "per_category": rows}
    Path(out, "report.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(out, "report.md").write_text(markdown_table(rows, scorer.space))
    click.echo(markdown_table(rows, scorer.space))


@eval_.command("human")
@click.option("--a", "a_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="samples folder of model A (or a plain image folder)")
@click.option("--b", "b_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="samples folder of model B, or reference images with the same file names")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help="SQLite file of votes (kept across runs)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True)
@click.option("--report", is_flag=True, help="print the win rate of A with its 95%% interval and exit")
def eval_human(a_dir, b_dir, db, host, port, report) -> None:
    """Side-by-side human evaluation on a local web page; votes in SQLite; win rate with a confidence interval."""
    from tessera.eval.human import VoteStore, make_app, pair_folders

    try:
        if report:
            click.echo(json.dumps(VoteStore(db, len(pair_folders(a_dir, b_dir))).report(), indent=2))
            return
        app = make_app(a_dir, b_dir, db)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    import uvicorn

    click.echo(f"vote at http://{host}:{port}/  (results: /results; Ctrl-C to stop, votes are kept in {db})")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@eval_.command("safety")
@click.option("--model", default="prompt-safety", show_default=True, help="prompt-policy classifier")
@click.option("--benign", "benign_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="prompts that must pass (default: ../shared/data/PartiPrompts.tsv if present)")
@click.option("--threshold", default=0.5, show_default=True)
def eval_safety(model, benign_file, threshold) -> None:
    """Block rate on the held-out unsafe policy prompts; false-positive rate on benign prompts."""
    from tessera.eval.safety import evaluate_prompt_safety

    try:
        out = evaluate_prompt_safety(model, benign_file, threshold)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(json.dumps(out, indent=2))


@main.group("bench")
def bench() -> None:
    """Benchmarks that compare models on this machine."""


@bench.command("paradigms")
@click.option("--data", "data_dir", default="data/demo128", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="prepared captioned folder the models trained on")
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "train"]))
@click.option("--limit", type=int, default=None, help="only N held-out captions, evenly spaced over the split")
@click.option("--config", "configs", multiple=True,
              help="PARADIGM=MODEL[:key=value,...] (repeatable; default: ar-xs, masked-xs, unet-xs, dit-xs at "
                   "several step counts)")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--clip", "clip_model", default="clip-xs", show_default=True)
@click.option("--text-encoder", default="minilm", show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="folder of samples (resumable), results.json, results.md and paradigms.png")
def bench_paradigms(data_dir, split, limit, configs, batch_size, clip_model, text_encoder, out) -> None:
    """AR vs masked vs diffusion: Fréchet distance, CLIPScore, R-precision and seconds per image."""
    from tessera.eval.paradigms import DEFAULT_CONFIGS, markdown, parse_config, plot, run_paradigms
    from tessera.text import PromptError

    try:
        chosen = [parse_config(c) for c in configs] or DEFAULT_CONFIGS
        rows = run_paradigms(data_dir, out, chosen, split, limit, batch_size, clip_model, text_encoder)
    except (ValueError, FileNotFoundError, RuntimeError, PromptError) as e:
        _fail(str(e))
    table = markdown(rows)
    Path(out, "results.md").write_text(table)
    plot(rows, Path(out, "paradigms.png"))
    click.echo(table)

if __name__ == "__main__":
    sys.exit(main())
