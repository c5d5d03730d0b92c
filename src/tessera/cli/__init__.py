"""`tessera` command: argument parsing and formatting only; every command calls one library function.
A user's error (`TesseraError`, ValueError, OSError) becomes one line and a non-zero exit (`handle_errors`)."""
from __future__ import annotations

import functools
import json
import sys

import click

from tessera.errors import TesseraError, plain
from tessera.train import TASK_HELP

P = click.Path
DIR, FILE, NEWDIR, PNG_OUT, PORT = P(exists=True, file_okay=False), P(exists=True, dir_okay=False), \
    P(file_okay=False), P(dir_okay=False), click.IntRange(1, 65535)

def handle_errors(invoke):
    """Wraps the root group's invoke: every sub-command's user error becomes a one-line message."""
    @functools.wraps(invoke)
    def wrapper(self, ctx):
        try:
            return invoke(self, ctx)
        except TesseraError as e:
            _exit(str(e), e.exit_code)
        except (ValueError, OSError) as e:
            _exit(str(e) or type(e).__name__, 2)
        except KeyboardInterrupt as e:
            detail = f"{e}; rerun the same command with --resume to continue" if str(e) else "nothing was saved"
            _exit(f"interrupted: {detail}", 130)
    return wrapper

def _exit(message: str, code: int) -> None: click.echo(f"Error: {plain(message)}", err=True), sys.exit(code)  # noqa: E704

class Group(click.Group):
    invoke = handle_errors(click.Group.invoke)

def echo_json(obj) -> None: click.echo(json.dumps(obj, indent=2, default=str))  # noqa: E704

def opt(*names, **kw):
    """One option spec: opt("--size", default=128, help=...) for `options`."""
    return (*names, kw)

def options(*specs):
    """Stack click options given as (names..., kwargs) tuples, top to bottom."""
    def deco(f):
        for *names, kw in reversed(specs):
            f = click.option(*names, **kw)(f)
        return f
    return deco

SPEED_OPTS = (opt("--attention", type=click.Choice(["sdpa", "gemm", "auto"]), help="SD attention kernel"),
              opt("--tome", type=float, help="SD token merging ratio (lossy)"), opt("--compile", is_flag=True, help="SD U-Net"))
DEVICE_OPTS = (opt("--device", help="cpu | cuda | cuda:N | auto (default: auto)"),
               opt("--dtype", help="autocast dtype: float32 | bfloat16 | float16 | auto (default: auto)"))

def group(parent, name: str, doc: str):
    return parent.group(name, cls=Group, help=doc)(lambda: None)

@click.group(cls=Group, context_settings={"show_default": True})
@click.version_option(package_name="tessera")
def main() -> None:
    """Tessera: curate data, train a tokenizer and generators, generate, upscale, evaluate, serve."""
    from tessera.device import tune_cpu_allocator
    tune_cpu_allocator()  # the application's choice (device.py); TESSERA_CPU_ALLOCATOR=system: off

data = group(main, "data", "Data curation.")

@data.command("prepare")
@click.argument("sources", nargs=-1, required=True)
@options(opt("--out", required=True, type=NEWDIR), opt("--size", default=128, help="output side in pixels"),
         opt("--format", "image_format", default="png", type=click.Choice(["png", "jpg"])),
         opt("--val-fraction", default=0.05), opt("--workers", default=2), opt("--min-size", default=64, help="shorter side"),
         opt("--phash-distance", default=6, help="near-duplicate Hamming threshold"),
         opt("--semantic-dedup", help="image-text model (clip-xs or a CLIP folder): reject semantic duplicates"),
         opt("--semantic-threshold", default=0.95, help="cosine of image embeddings at or above = duplicate"),
         opt("--max-pixels", default=64_000_000, help="decompression-bomb cap"),
         opt("--scorer", "scorers", multiple=True, help="registered scorer, e.g. 'nsfw?max_score=0.8'"),
         opt("--captioner", default="none", help="replaces missing / non-English / low-match captions: none | "
             "caption-xs (offline, emoji names only) | 'retrieval?bank=DIR&model=clip-xs' | a BLIP / GIT folder"),
         opt("--language/--no-language", default=True, help="detect each caption's language (lingua)"),
         opt("--recaption-below", type=float, help="recaption when the caption_match scorer is below this"),
         opt("--engine", default="local", type=click.Choice(["local", "ray"]), help="ray: Ray Data stages (same output)"),
         opt("--crops-per-image", default=0, help="N > 0: N native-resolution crops per image"),
         opt("--crop-mode", default="random", type=click.Choice(["random", "grid"])), opt("--max-downscale", default=1.0))
def data_prepare(sources, out, engine, **kw) -> None:
    """Decode, filter, deduplicate and shard SOURCES (folders, .tar shards, .parquet files) into OUT."""
    from tessera.data.prepare import PrepareConfig, prepare
    report = prepare(list(sources), out, PrepareConfig.from_options(**kw), engine=engine)
    echo_json({k: report[k] for k in ("kept", "kept_by_split", "kept_sources", "source_pixels", "rejected",
                                      "rejected_by_reason", "images_per_second")})

@data.command("catalog")
@click.argument("data_dir", type=DIR)
@options(opt("--status", type=click.Choice(["kept", "rejected"])), opt("--reason", help="only this rejection reason"),
         opt("--recaptioned", is_flag=True, help="only images whose caption was replaced"))
def data_catalog(data_dir, status, reason, recaptioned) -> None:
    """Every decision of `data prepare` in DATA_DIR, one JSON line per item (source, status, reason, caption, verdicts)."""
    from tessera.data.catalog import Catalog
    with Catalog.read(data_dir) as cat:
        click.echo("\n".join(json.dumps(d, ensure_ascii=False) for d in cat.decisions(status, reason, recaptioned)))

@data.command("from-serving")
@options(opt("--serve-dir", required=True, type=DIR, help="`tessera serve --data-dir`"), opt("--out", required=True, type=NEWDIR),
         opt("--min-rating", type=float, help="leave out images rated below this (mean of 1-5)"),
         opt("--rated-only", is_flag=True, help="leave out unrated images"), opt("--nsfw-threshold", default=0.8))
def data_from_serving(serve_dir, out, min_rating, rated_only, nsfw_threshold) -> None:
    """The data flywheel: served images + their prompts (+ ratings) -> a folder `data prepare` takes."""
    from tessera.safety.image import ImageSafety
    from tessera.serve.flywheel import export_from_serving
    echo_json(export_from_serving(serve_dir, out, min_rating, not rated_only, image_safety=ImageSafety(nsfw_threshold)))

@data.command("embed-captions")
@options(opt("--data", "data_dir", required=True, type=DIR), opt("--encoder", default="minilm", help="minilm | tiny | HF name"))
def data_embed_captions(data_dir, encoder) -> None:
    """Cache every kept image's caption embedding beside the shards (DATA/text/<encoder>/)."""
    from tessera.data.captions import embed_captions
    from tessera.text import load_text_encoder
    click.echo(str(embed_captions(data_dir, load_text_encoder(encoder), encoder)))

train = group(main, "train", "Train a model (every trainer takes the same options).")

TRAIN = options(opt("--data", "data_dir", required=True, type=DIR), opt("--out", "run_dir", required=True, type=NEWDIR),
                opt("--preset", help="model preset name or preset JSON file"), opt("--max-steps", type=int),
                opt("--resume/--no-resume", default=False, help="continue from OUT/state.pt"),
                opt("--set", "overrides", multiple=True, help="override KEY=JSON, e.g. train.lr=1e-4"), *DEVICE_OPTS)
TOKENIZER = opt("--tokenizer", default="vq-f8", help="tokenizer whose caches to train on")
TEXT = opt("--text-encoder", default="minilm", help="prompt encoder ('none': unconditional)")
TRAIN_EXTRA = {"tokenizer": [], "ar": [TOKENIZER, TEXT], "masked": [TOKENIZER, TEXT], "masked_sr": [TOKENIZER, TEXT], "contrastive": [TEXT],
               "diffusion": [opt("--arch", default="unet", type=click.Choice(["unet", "dit"]), help="default preset: ARCH-s"),
                             TOKENIZER, opt("--space", default="latent", type=click.Choice(["latent", "pixel"])), TEXT],
               "sr": [opt("--tokenizer", default="vq-f8", help="round trip degrading half of the inputs ('': bicubic)")]}

def _train_command(task: str):
    @TRAIN
    @options(*TRAIN_EXTRA[task])
    def command(data_dir, run_dir, preset, max_steps, resume, overrides, device, dtype, arch=None, **kw) -> None:
        from tessera.train.runs import train_command
        preset = preset or (f"{arch}-s" if arch else None)
        echo_json(train_command(task, data_dir, run_dir, preset, max_steps, resume, list(overrides),
                                device=device, dtype=dtype, **kw))
    command.__doc__ = TASK_HELP[task]
    return train.command(task)(command)

for _task in TASK_HELP:
    _train_command(_task)

@train.command("safety")
@options(opt("--prompts", "prompt_file", type=FILE, help="labelled TSV (text, label)"),
         TEXT[:1] + (dict(default="minilm"),), opt("--steps", default=400),
         opt("-o", "--out", required=True, type=NEWDIR, help="export folder"))
def train_safety(prompt_file, text_encoder, steps, out) -> None:
    """Train the prompt-policy classifier (seconds) and export it with its held-out report."""
    from tessera.train.safety import train_and_export
    echo_json(train_and_export(prompt_file, text_encoder, steps, out))

@main.command("export")
@click.argument("run_dir", type=DIR)
@options(opt("-o", "--out", required=True, type=NEWDIR),
         opt("--dtype", default="float32", type=click.Choice(["float32", "float16", "bfloat16"]), help="storage dtype"))
def export(run_dir, out, dtype) -> None:
    """Export a run's EMA weights as a model folder (config.json + model.safetensors + meta.json)."""
    from tessera.train.runs import export_run
    click.echo(str(export_run(run_dir, out, dtype)))

@main.command("reconstruct")
@click.argument("inputs", nargs=-1, required=True, type=FILE)
@options(opt("-o", "--out", required=True, type=P(), help="output file (one input) or folder"), opt("--model", default="vq-f8-photo"),
         *DEVICE_OPTS)
def reconstruct(inputs, out, model, device, dtype) -> None:
    """Round-trip images through the tokenizer at their own size; prints PSNR and SSIM."""
    from tessera.eval.reconstruction import reconstruct_files
    for r in reconstruct_files(list(inputs), out, model, device, dtype):
        click.echo(f"{r['input']} -> {r['output']}  {r['width']}x{r['height']}  {r['tokens']} tokens  "
                   f"PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}")

@main.command("tokenize")
@options(opt("--data", "data_dir", required=True, type=DIR), opt("--model", default="vq-f8-photo"), opt("--batch-size", default=32))
def tokenize(data_dir, model, batch_size) -> None:
    """Cache every kept image's token grid beside the shards (DATA/tokens/<model-sha>/)."""
    from tessera.tokenizer.tools import tokenize_dataset
    click.echo(str(tokenize_dataset(data_dir, model, batch_size)))

SAMPLE = options(opt("--model", help="pipeline folder, generator folder or preset (default: bundled)"),
                 opt("--tokenizer", help="default: the generator's"), opt("--text-encoder", help="default: the pipeline's"),
                 opt("--seed", default=0), opt("-n", default=4), opt("--cfg", "cfg_scale", type=float, help="guidance scale"),
                 opt("-o", "--out", required=True, type=PNG_OUT, help="grid PNG (an existing file is replaced)"))
SAMPLE_EXTRA = {
    "ar": [opt("--temperature", type=float), opt("--top-k", type=int), opt("--top-p", type=float),
           opt("--cfg-interval", type=int, help="guide only the first K tokens (-1: all)")],
    "masked": [opt("--steps", type=int, help="decoding steps (8-24)"), opt("--temperature", type=float),
               opt("--choice-temperature", type=float, help="Gumbel noise on confidences, annealed to 0")],
    "diffusion": [opt("--steps", type=int), opt("--sampler", "method", help="ddim | ddpm | euler | euler_a | dpmpp_2m | lcm"),
                  opt("--eta", type=float, help="DDIM noise (0: deterministic)"), opt("--negative-prompt")]}

sample_ = group(main, "sample", "Sample images from a bare generator pipeline (with prompt safety and harm detection; no SR).")

def _sample_command(paradigm: str):
    @click.argument("prompt", default="")
    @SAMPLE
    @options(*SAMPLE_EXTRA[paradigm], *DEVICE_OPTS)
    def command(prompt, model, tokenizer, text_encoder, out, device, dtype, **settings) -> None:
        from tessera.pipelines.sample import sample_to_file
        click.echo(str(sample_to_file(paradigm, prompt, out, model, tokenizer, text_encoder, device, dtype, settings)))
    command.__doc__ = f"Sample N images for PROMPT with a {paradigm} pipeline; a grid PNG with its parameters."
    return sample_.command(paradigm)(command)

for _paradigm in SAMPLE_EXTRA:
    _sample_command(_paradigm)

@main.command("inpaint")
@click.argument("image", type=FILE)
@click.option("--mask", "mask_path", required=True, type=FILE, help="same size: white = regenerate, black = keep")
@click.argument("prompt", default="")
@SAMPLE
@options(*SAMPLE_EXTRA["masked"], *DEVICE_OPTS)
def inpaint(image, mask_path, prompt, model, tokenizer, text_encoder, out, device, dtype, **settings) -> None:
    """Regenerate the white region of MASK in IMAGE with a masked pipeline (outpainting: mask the border)."""
    from tessera.pipelines.sample import sample_to_file
    click.echo(str(sample_to_file("masked", prompt, out, model, tokenizer, text_encoder, device, dtype, settings,
                                  inpaint=(image, mask_path))))

@main.command("generate")
@click.argument("prompt")
@options(opt("-o", "--out", required=True, type=PNG_OUT, help="output PNG, a grid when -n > 1 (an existing file is replaced)"),
         opt("--paradigm", type=click.Choice(["diffusion", "ar", "masked"]), help="default: the --model's, else diffusion"),
         opt("--model", help="pipeline folder, generator folder or preset (default: the bundled one)"),
         opt("--size", default=1024, help="output side, up to 2048 (0: native 128)"), opt("-n", default=1, help="1-8"),
         opt("--seed", default=-1, help="-1: random (printed and stored in the PNG)"),
         opt("--steps", type=int, help="masked / diffusion steps"), opt("--cfg", "cfg_scale", type=float),
         opt("--temperature", type=float, help="ar / masked"), opt("--top-k", type=int, help="ar"),
         opt("--top-p", type=float, help="ar"), opt("--negative-prompt", default="", help="diffusion"), opt("--class-label", type=int),
         opt("--no-enhance", is_flag=True, help="use the prompt as written"), opt("--lora", "loras", multiple=True, help="FILE[:SCALE], SD"),
         opt("--diversify", is_flag=True, help="vary skin tone / gender in people prompts"), *DEVICE_OPTS, *SPEED_OPTS)
def generate(prompt, out, **kw) -> None:
    """Generate images for PROMPT: prompt safety, enhancement, generation, decoding, harm detection,
    super-resolution to --size."""
    from tessera.pipelines.text2image import generate_file
    path, result = generate_file(prompt, out, **kw)
    for w in result.withheld:
        click.echo(f"image {w['index']} withheld by harm detection: {w['category']} (score {w['score']})", err=True)
    click.echo(f"{path}  {result.size[0]}x{result.size[1]}  seed {result.seed}  revised: {result.revised_prompt!r}  "
               f"{json.dumps(result.timings)}")

pipeline_ = group(main, "pipeline", "Inference pipeline folders (model_index.json + one folder per component).")

@pipeline_.command("save")
@options(opt("--paradigm", required=True, type=click.Choice(["ar", "masked", "diffusion"])),
         opt("--model", help="generator folder or preset (default: the paradigm's bundled one)"),
         opt("--tokenizer", help="default: the generator's"), opt("--text-encoder", help="default: minilm"),
         opt("--token-sr", help="masked: a token SR stage"), opt("-o", "--out", required=True, type=NEWDIR))
def pipeline_save(paradigm, model, tokenizer, text_encoder, token_sr, out) -> None:
    """Write the pipeline folder of the bundled default of PARADIGM (or of the given components)."""
    from tessera.pipelines.folder import save_default_pipeline
    click.echo(str(save_default_pipeline(paradigm, out, model, tokenizer, text_encoder, token_sr)))

@main.command("convert")
@click.argument("src", type=P(exists=True))
@options(opt("-o", "--out", required=True, type=NEWDIR), opt("--dtype", default="float16", help="storage: float16 | bfloat16 | float32"),
         opt("--tokenizer", type=DIR, help="single file: a CLIP tokenizer folder"), opt("--variant", help="diffusers: fp16 | bf16"),
         opt("--prediction", default="epsilon", type=click.Choice(["epsilon", "v"]), help="single file: v for SD 2.x 768"),
         opt("--vae", type=DIR, help="diffusers: another autoencoder (TAESD)"), opt("--trust-pickle", is_flag=True))
def convert(src, out, **kw) -> None:
    """Write SRC (a diffusers SD folder, a single-file SD .safetensors, a Tessera pipeline or generator) as a pipeline folder."""
    from tessera.pipelines.convert import convert as run
    click.echo(str(run(src, out, **kw)))

@main.command("optimize")
@click.argument("src")
@options(opt("-o", "--out", required=True, type=NEWDIR), opt("--int8", is_flag=True, help="static int8 U-Net and VAE decoder of an SD folder"),
         opt("--int8-layers", type=click.Choice(["speed", "all"]), default="speed", help="--int8: the layers measured faster here, or all"),
         opt("--calibration", type=FILE, help="--int8: prompts, one per line"), opt("--size", type=int), opt("--steps", type=int),
         opt("--cfg", type=float, help="--int8: the guidance it serves at"), opt("--distill-steps", type=int, help="a few-step student"),
         opt("--prune", type=float, help="remove this fraction of a Transformer's MLP channels"), opt("--data", "data_dir", type=DIR),
         opt("--max-steps", default=3000), opt("--set", "overrides", multiple=True))
def optimize(src, out, **kw) -> None:
    """Write an optimized SRC to OUT (seed 004's model optimization); prints the report."""
    from tessera.optimize import optimize as run
    echo_json(run(src, out, **kw))

@main.command("pull")
@click.argument("repo_id")
@options(opt("-o", "--out", required=True, type=NEWDIR), opt("--revision"), opt("--variant", help="fp16 | bf16 where a folder has it"))
def pull(repo_id, out, revision, variant) -> None:
    """Download REPO_ID's configs and safetensors weights (never pickles) from the Hugging Face Hub into OUT."""
    from tessera.pipelines.convert import pull as run
    click.echo(str(run(repo_id, out, revision, variant)))

workflow = group(main, "workflow", "The training workflow: data -> train -> evaluate -> gate -> promote.")

@workflow.command("run")
@click.argument("config_file", type=FILE)
@click.option("--run-id", help="run folder name under the config's workdir (default: a timestamp)")
def workflow_run(config_file, run_id) -> None:
    """Run the workflow CONFIG_FILE (JSON) describes (report.json / report.md in the run folder); exit 0: promoted, 3: rejected."""
    from tessera.train.workflow import run_file
    report = run_file(config_file, run_id)
    if "promoted" in report:  # rank 0 reports (a rank > 0 under torchrun returns nothing)
        echo_json({k: report[k] for k in ("run", "promoted", "metrics")})
        click.echo("\n".join(report["decision"]["reasons"]))
        sys.exit(0 if report["promoted"] else 3)

@main.command("serve")
@click.argument("stage", default="gateway", type=click.Choice(["gateway", "generation", "decoding", "superres"]))
@options(opt("--host", default="127.0.0.1", help="another address requires --api-key"),
         opt("--port", type=PORT, help="default: 8000 gateway, 8101-8103 stages"), *SPEED_OPTS,
         opt("--model", "models", multiple=True, help="pipeline / generator to serve for its paradigm (repeatable)"),
         opt("--data-dir", default="tessera-serve", help="jobs, images, feedback"),
         opt("--api-key", "api_keys", multiple=True, envvar="TESSERA_API_KEYS", help="accepted Bearer key"),
         opt("--max-queue", default=64, help="queued jobs before 429"), opt("--max-batch", default=8, help="jobs per batch"),
         opt("--deadline", "deadline_s", default=600.0, help="per-request deadline (s)"), opt("--public-url", help="of url links"),
         opt("--generation-url", help="default: in-process"), opt("--decoding-url", help="default: in-process"),
         opt("--superres-url", help="default: in-process"), opt("--preload", default="diffusion", help="paradigms to load"),
         opt("--ray", "use_ray", is_flag=True, help="the stages as Ray Serve deployments (the ray extra)"),
         opt("--replicas", default="1,1,1", help="--ray: generation,decoding,superres replicas"),
         opt("--lora", "loras", multiple=True, help="FILE[:SCALE] merged into the diffusion (SD) model"), *DEVICE_OPTS)
def serve(stage, host, port, models, generation_url, decoding_url, superres_url, preload, **kw) -> None:
    """The HTTP server: the gateway (OpenAI-compatible images API, jobs, web page at /) or one stage service."""
    from tessera.serve.app import build_server, run_server
    app, port = build_server(stage, host, port, models=models, preload=tuple(p for p in preload.split(",") if p),
                             stage_urls={"generation": generation_url, "decoding": decoding_url, "superres": superres_url}, **kw)
    click.echo(f"tessera {stage} on http://{host}:{port}/  (Ctrl-C to stop)")
    run_server(app, host, port)

@main.command("upscale")
@click.argument("src", type=FILE)
@options(opt("-o", "--out", required=True, type=PNG_OUT, help=".png/.jpg/.webp (an existing file is replaced)"),
         opt("--size", help="exact output size: N (square) or WxH, up to 2048x2048 pixels"),
         opt("--scale", type=int, help="2 or 4 (instead of --size)"),
         opt("--model", default="fidelity", help="fidelity | perceptual | x4plus (Real-ESRGAN) | a folder or preset"),
         opt("--tile", default=192, help="tile side in input pixels"), *DEVICE_OPTS)
def upscale(src, out, size, scale, model, tile, device, dtype) -> None:
    """Super-resolve SRC to exactly --size through the x4 / x2 cascade (tiled, bounded memory)."""
    from tessera.superres.cascade import parse_size, upscale_file
    img = upscale_file(src, out, parse_size(size) if size else None, scale, model, tile=tile, device=device, dtype=dtype)
    click.echo(f"{out}  {img.width}x{img.height}")

from tessera.cli import evaluation  # noqa: E402,F401  (registers `tessera eval` and `tessera bench`)
