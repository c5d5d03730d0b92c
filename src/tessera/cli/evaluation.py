"""`tessera eval ...` and `tessera bench ...`: parsing and formatting only."""
from __future__ import annotations

import click

from tessera.cli import DEVICE_OPTS, DIR, FILE, NEWDIR, PNG_OUT, PORT, echo_json, group, main, opt, options
from tessera.config import parse_settings

DATA = opt("--data", "data_dir", required=True, type=DIR)
SPLIT = opt("--split", default="val", type=click.Choice(["val", "train"]))
LIMIT = opt("--limit", type=int, help="only the first N images / prompts")
CLIP = opt("--clip", "clip_model", default="clip-xs", help="contrastive model or HF CLIP folder")
SAMPLES = options(opt("--model", required=True, help="pipeline folder, generator folder or preset"),
                  opt("--tokenizer", help="default: the one the generator was trained with"), opt("--text-encoder"),
                  opt("--batch-size", default=16), opt("--no-safety", is_flag=True, help="no safety stages (measuring only)"),
                  opt("--set", "settings", multiple=True, help="sampling setting KEY=VALUE, e.g. steps=10"),
                  opt("-o", "--out", required=True, type=NEWDIR, help="samples folder (resumable)"))

eval_ = group(main, "eval", "Evaluation.")

@eval_.command("reconstruction")
@options(DATA, opt("--model", default="vq-f8-photo"), opt("--split", default="val", type=click.Choice(["val", "train", "all"])),
         LIMIT, opt("--rfd", is_flag=True, help="also the Fréchet distance of reconstructions to originals"),
         *DEVICE_OPTS)
def eval_reconstruction(data_dir, model, split, limit, rfd, device, dtype) -> None:
    """PSNR / SSIM / codebook usage of a tokenizer on a prepared split (held-out: val)."""
    from tessera.eval.reconstruction import evaluate_tokenizer
    echo_json({"model": model, **evaluate_tokenizer(model, data_dir, split, limit, rfd, device, dtype)})

@eval_.command("caption-margin")
@options(DATA, opt("--model", required=True, help="text-conditioned generator folder or preset"),
         opt("--cache", help="token/latent cache under DATA/tokens|latents (default: the model's)"),
         opt("--text", help="caption cache name under DATA/text (default: the model's)"), LIMIT)
def eval_caption_margin(data_dir, model, cache, text, limit) -> None:
    """Held-out NLL (AR / masked) or denoising loss (diffusion) with the true vs. a shuffled caption."""
    import tessera
    from tessera.eval.captions import caption_margin
    echo_json({"model": model, **caption_margin(tessera.load(model), data_dir, cache, text, limit)})

@eval_.command("fid")
@options(opt("--real", required=True, type=DIR, help="folder of reference images"),
         opt("--fake", required=True, type=DIR, help="folder of generated images"), opt("--kid-subsets", default=100),
         opt("--kid-subset-size", default=1000), opt("--inception-weights", type=PNG_OUT,
                                      help="pt_inception-2015-12-05-6726825d.pth: real FID / KID / IS"))
def eval_fid(real, fake, kid_subsets, kid_subset_size, inception_weights) -> None:
    """Fréchet distance and KID between two image folders (offline feature space: open_nsfw ResNet-50)."""
    from tessera.eval.frechet import compare_folders
    echo_json({"real": real, "fake": fake, **compare_folders(real, fake, kid_subsets, kid_subset_size, inception_weights)})

@eval_.command("sr")
@options(opt("--data", "data_dir", required=True, type=DIR, help="held-out HR photos"),
         opt("--model", "models", multiple=True, default=("fidelity",), help="fidelity | perceptual | x4plus | folder"),
         opt("--scale", default=4), SPLIT, LIMIT,
         opt("--degrade", default="bicubic", type=click.Choice(["bicubic", "tokenizer"])),
         opt("--tokenizer", default="vq-f8", help="tokenizer for --degrade tokenizer"), *DEVICE_OPTS)
def eval_sr(data_dir, models, scale, split, limit, degrade, tokenizer, device, dtype) -> None:
    """PSNR / SSIM of bicubic, Lanczos and SR models on bicubic-downscaled held-out photos."""
    from tessera.eval.sr import evaluate_sr_models
    out = evaluate_sr_models(data_dir, models, scale, split, limit, degrade, tokenizer, device, dtype)
    echo_json({"data": data_dir, "split": split, "scale": scale, "degrade": degrade, "results": out})

@eval_.command("sample")
@SAMPLES
@options(opt("--prompts", "prompt_file", type=PNG_OUT, help="TSV / CSV with a Prompt(s) column, or one per line"),
         opt("--data", "data_dir", type=DIR, help="or: a prepared folder's captions"), SPLIT, LIMIT,
         opt("--repeat", default=1, type=click.IntRange(1, 10_000), help="images per prompt"),
         opt("--diversify", is_flag=True, help="vary age / gender / skin tone over a people prompt's images"),
         *DEVICE_OPTS)
def eval_sample(model, tokenizer, text_encoder, batch_size, no_safety, settings, out, prompt_file, data_dir, split,
                limit, repeat, diversify, device, dtype) -> None:
    """Write evaluation samples: one image per prompt (or --repeat N) + samples.json with every setting and the timing."""
    from tessera.eval.samples import generate_prompt_samples
    record = generate_prompt_samples(model, out, prompt_file, data_dir, split, limit, parse_settings(settings),
                                     batch_size, tokenizer, text_encoder, device, dtype, not no_safety, repeat,
                                     diversify)
    click.echo(f"{out}: {len(record['images'])} images, {len(record['skipped'])} prompts skipped")

@eval_.command("clipscore")
@click.argument("samples", type=DIR)
@options(CLIP)
def eval_clipscore(samples, clip_model) -> None:
    """CLIPScore of a samples folder's images with their prompts (per category and overall)."""
    from tessera.eval.prompts import clipscore_report
    echo_json({"samples": samples, **clipscore_report(samples, clip_model)})

@eval_.command("fairness")
@click.argument("samples", type=DIR)
@options(CLIP, opt("--all-prompts", is_flag=True, help="every image, not only those of prompts that depict people"),
         opt("--bootstrap", default=1000, type=click.IntRange(0, 100_000), help="replicates for the 95%% intervals"),
         opt("-o", "--out", type=PNG_OUT, help="write the report here (.json) and beside it (.md)"))
def eval_fairness(samples, clip_model, all_prompts, bootstrap, out) -> None:
    """Perceived gender / age / skin-tone distribution of generated people images (zero-shot CLIP), vs uniform."""
    from tessera.eval.fairness import fairness_report, report_markdown, write_report
    report = fairness_report(samples, clip_model, people_only=not all_prompts, replicates=bootstrap)
    click.echo(report_markdown(write_report(report, out) if out else report))

@eval_.command("latency")
@click.argument("samples", type=DIR)
@click.option("--price-per-hour", default=0.10, help="machine cost per hour")
def eval_latency(samples, price_per_hour) -> None:
    """Seconds per image, images/s, peak memory and cost per image of a samples folder."""
    from tessera.eval.samples import latency_report
    echo_json(latency_report(samples, price_per_hour))

@eval_.command("prompts")
@click.argument("prompt_file", type=FILE)
@SAMPLES
@options(opt("--per-category", type=int, help="only the first N prompts of each category"),
         opt("--category", "categories", multiple=True, help="only this category (repeatable)"), CLIP,
         opt("--price-per-hour", default=0.10), *DEVICE_OPTS)
def eval_prompts(prompt_file, model, tokenizer, text_encoder, batch_size, no_safety, settings, out, per_category,
                 categories, clip_model, price_per_hour, device, dtype) -> None:
    """Prompt benchmark (PartiPrompts.tsv, or a DrawBench CSV of your own): CLIPScore and s / image per category -> OUT/report.*"""
    from tessera.eval.prompts import prompt_benchmark
    click.echo(prompt_benchmark(prompt_file, model, out, parse_settings(settings), batch_size, tokenizer, text_encoder,
                                per_category, list(categories), clip_model, price_per_hour, device, dtype, not no_safety))

@eval_.command("human")
@options(opt("--a", "a_dir", required=True, type=DIR, help="samples folder of model A"),
         opt("--b", "b_dir", required=True, type=DIR, help="model B or references"),
         opt("--db", required=True, type=PNG_OUT, help="SQLite file of votes (kept across runs)"),
         opt("--host", default="127.0.0.1", help="loopback only: no keys"), opt("--port", default=8765, type=PORT),
         opt("--report", is_flag=True, help="print the win rate of A with its 95%% interval and exit"))
def eval_human(a_dir, b_dir, db, host, port, report) -> None:
    """Side-by-side human evaluation on a local web page; votes in SQLite; win rate with a confidence interval."""
    from tessera.eval.human import VoteStore, check_host, make_app, pair_folders, serve_votes
    if report:
        return echo_json(VoteStore(db, len(pair_folders(a_dir, b_dir))).report())
    click.echo(f"vote at http://{check_host(host)}:{port}/  (results: /results; Ctrl-C to stop, votes are kept in {db})")
    serve_votes(make_app(a_dir, b_dir, db), host, port)

@eval_.command("safety")
@options(opt("--model", default="prompt-safety", help="prompt-policy classifier"),
         opt("--benign", "benign_file", type=FILE, help="prompts that must pass"), opt("--threshold", default=0.5),
         opt("--generated", default=0, help="also: harm detection on N benign generated images per paradigm"))
def eval_safety(model, benign_file, threshold, generated) -> None:
    """Block rate on the held-out unsafe policy prompts; false-positive rate on benign prompts (and images)."""
    from tessera.eval.safety import evaluate_prompt_safety, generated_false_positives
    echo_json({**evaluate_prompt_safety(model, benign_file, threshold),
               **({"images": generated_false_positives(benign_file, generated)} if generated else {})})

bench = group(main, "bench", "Benchmarks that compare models on this machine.")

@bench.command("paradigms")
@options(opt("--data", "data_dir", default="data/demo128", type=DIR), SPLIT, LIMIT,
         opt("--config", "configs", multiple=True, help="PARADIGM=MODEL[:key=value,...] (repeatable)"),
         opt("--batch-size", default=16), CLIP, opt("--text-encoder", default="minilm"),
         opt("-o", "--out", required=True, type=NEWDIR, help="samples, results.json/.md, paradigms.png"))
def bench_paradigms(data_dir, split, limit, configs, batch_size, clip_model, text_encoder, out) -> None:
    """AR vs masked vs diffusion: Fréchet distance, CLIPScore, R-precision and seconds per image."""
    from tessera.eval.paradigms import bench_paradigms as run
    click.echo(run(data_dir, out, list(configs), split, limit, batch_size, clip_model, text_encoder))
