"""The training pipeline (seed 004 "Overall ML System Design"): data -> train -> evaluate -> gate -> promote.

    tessera pipeline run CONFIG.json

Every run leaves WORKDIR/RUN_ID/ with the training run, the exported candidate, a sample grid and
report.json + report.md: the metrics of candidate and deployed model on the same held-out split, the
gate's verdict on each metric, and the decision. The deployed model is replaced only when the gate
passes (the previous one is kept beside it as DEPLOYED.previous).

The config (JSON, strict: an unknown key is an error):

    {"name": "ar-refresh", "workdir": "runs/pipeline", "deployed": "models/deployed-ar",
     "data":  {"prepared": "data/demo128"}                      # or "sources": [...], "out": "data/new"
     "train": {"task": "ar", "preset": "ar-xs", "max_steps": 1500, "overrides": ["train.lr=6e-4"]},
     "evaluate": {"limit": 0},
     "gate": {"tolerances": {"nll_true": 0.02, "frac_true_better": 0.02}}}

With an `optimize` step (seed 004's model optimization pipeline) the candidate is not trained from scratch
but made from `optimize.source` by `tessera optimize` (a few-step student: `distill_steps`; `prune`; weight-only
`int8`), and the gate compares it with the deployed model on samples (`evaluate.metrics: "samples"`: FD, KID,
CLIPScore, R-precision on the held-out captions, each model with its own sampling defaults):

    {"optimize": {"source": "unet-xs", "distill_steps": 4, "max_steps": 900},
     "evaluate": {"metrics": "samples", "limit": 64},
     "gate": {"tolerances": {"fd": 5.0, "clipscore": 0.5, "r_precision": 0.05}}}
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from tessera.config import Config
from tessera.errors import InvalidInputError
from tessera.eval.gate import Decision, gate
from tessera.registry import family

GENERATORS = ("ar", "masked", "diffusion")


@dataclasses.dataclass
class DataStep(Config):
    prepared: str = ""                 # an already prepared folder, or:
    sources: tuple[str, ...] = ()      # inputs of `data prepare` (folders, shards, Parquet; the flywheel's export)
    out: str = ""                      # ... prepared into this folder (resumable)
    size: int = 128
    val_fraction: float = 0.1
    min_size: int = 64
    scorers: tuple[str, ...] = ()      # registered names, e.g. "nsfw?max_score=0.8"
    engine: str = "local"              # local | ray


@dataclasses.dataclass
class TrainStep(Config):
    task: str = "ar"                   # tokenizer | ar | masked | diffusion | sr | contrastive
    preset: str = ""
    max_steps: int = 1000
    overrides: tuple[str, ...] = ()    # --set KEY=VALUE
    tokenizer: str = "vq-f8"
    text_encoder: str = "minilm"


@dataclasses.dataclass
class OptimizeStep(Config):
    source: str = ""                   # the model to optimize ('' = no optimize step: the train step runs)
    distill_steps: int = 0             # a few-step student of a Tessera diffusion model
    prune: float = 0.0                 # or: this fraction of a Transformer's MLP channels removed, then fine-tuned
    int8: bool = False                 # or: weight-only int8 of a Tessera generator (made only where it is faster)
    max_steps: int = 1000
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass
class EvalStep(Config):
    limit: int = 0                     # held-out images to score (0: all)
    metrics: str = "caption"           # caption: the caption test / reconstruction; samples: FD, KID, CLIPScore, R-precision
    clip: str = "clip-xs"              # samples: the image-text model of CLIPScore / R-precision
    prompts: tuple[str, ...] = ("red apple emoji", "grinning face emoji", "snowman emoji", "a frog")


@dataclasses.dataclass
class GateStep(Config):
    tolerances: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"nll_true": 0.02, "frac_true_better": 0.02})
    bootstrap: int = 1000              # paired bootstrap replicates for the sample metrics (0: point estimates)


@dataclasses.dataclass
class WorkflowConfig(Config):
    name: str = "pipeline"
    workdir: str = "runs/pipeline"
    deployed: str = "models/deployed"
    data: DataStep = dataclasses.field(default_factory=DataStep)
    train: TrainStep = dataclasses.field(default_factory=TrainStep)
    optimize: OptimizeStep = dataclasses.field(default_factory=OptimizeStep)
    evaluate: EvalStep = dataclasses.field(default_factory=EvalStep)
    gate: GateStep = dataclasses.field(default_factory=GateStep)


def data_step(cfg: DataStep) -> str:
    if cfg.prepared:
        if not (Path(cfg.prepared) / "catalog.sqlite").is_file():
            raise FileNotFoundError(f"data.prepared={cfg.prepared!r}: not a prepared folder (no catalog.sqlite)")
        return cfg.prepared
    if not cfg.sources or not cfg.out:
        raise ValueError("data: give `prepared`, or `sources` and `out`")
    from tessera.data.filters import FilterConfig
    from tessera.data.prepare import PrepareConfig, prepare

    pcfg = PrepareConfig(size=cfg.size, val_fraction=cfg.val_fraction, scorers=cfg.scorers,
                         filters=FilterConfig(min_size=cfg.min_size))
    prepare(list(cfg.sources), cfg.out, pcfg, progress=False, engine=cfg.engine)
    return cfg.out


def train_step(cfg: TrainStep, data_dir: str, run: Path) -> None:
    """Train (caches first, rank 0 before the others, as the CLI does); under torchrun every rank calls it."""
    from tessera.train import runs

    model_updates, task_updates = runs.prepare_inputs(cfg.task, data_dir, cfg.tokenizer, cfg.text_encoder,
                                                       preset=cfg.preset or None)
    runs.run_training(cfg.task, data_dir, str(run / "train"), cfg.preset or None, cfg.max_steps, False,
                      list(cfg.overrides), model_updates, task_updates)


def optimize_step(cfg: OptimizeStep, data_dir: str, run: Path) -> Path:
    """The candidate made by `tessera optimize` from cfg.source (its run folder under RUN/candidate.run)."""
    from tessera.train.distill import distill
    from tessera.train.prune import prune

    if [bool(cfg.distill_steps), bool(cfg.prune), bool(cfg.int8)].count(True) != 1:
        raise ValueError("optimize: give one of distill_steps, prune or int8 (the workflow gates Tessera's own models; "
                         "an int8 SD folder has no held-out quality to gate on here)")
    if cfg.int8:
        from tessera.train.int8 import quantize_model

        quantize_model(cfg.source, run / "candidate")  # refuses (a clear error) where int8 is not faster
    elif cfg.prune:
        prune(cfg.source, str(run / "candidate"), cfg.prune, data_dir, cfg.max_steps, list(cfg.overrides))
    else:
        distill(cfg.source, str(run / "candidate"), data_dir, cfg.distill_steps, cfg.max_steps, list(cfg.overrides))
    return run / "candidate"


def evaluate(model_dir: str | Path, data_dir: str, cfg: EvalStep, text_encoder: str = "minilm",
             out: Path | None = None) -> dict[str, float]:
    """Held-out metrics the gate compares: the caption test for generators, reconstruction for tokenizers, or
    (metrics "samples") the sample metrics of `tessera bench paradigms` with the model's own defaults."""
    import tessera

    if cfg.metrics == "samples":
        from tessera.eval.paradigms import Case, run_paradigms

        rows = run_paradigms(data_dir, out or Path(str(model_dir) + ".samples"), [Case("candidate", str(model_dir))],
                             limit=cfg.limit or None, clip_model=cfg.clip, text_encoder=text_encoder, progress=False)
        return {k: rows[-1][k] for k in ("fd", "kid", "clipscore", "r_precision")}
    if cfg.metrics != "caption":
        raise ValueError(f"evaluate.metrics={cfg.metrics!r}: expected 'caption' or 'samples'")

    model = tessera.load(str(model_dir))
    kind = model.kind
    limit = cfg.limit or None
    if kind == "vq":
        from tessera.eval.reconstruction import evaluate_reconstruction

        out = evaluate_reconstruction(model, data_dir, "val", limit=limit)
        return {k: out[k] for k in ("psnr", "ssim", "codebook_usage")}
    if family(kind).role == "generator":
        from tessera.eval.captions import caption_margin

        out = caption_margin(model, data_dir, limit=limit)
        return {k: out[k] for k in ("nll_true", "margin", "frac_true_better")}
    raise ValueError(f"{model_dir}: no gate metrics for a {kind!r} model")


def _intervals(run: Path, cfg: WorkflowConfig) -> dict[str, list[float]] | None:
    """Paired bootstrap intervals of the sample metrics (eval/bootstrap.py), when `gate.bootstrap` asks and both
    models drew one image for every held-out caption (then the rows pair up); else None (point estimates)."""
    from tessera.eval.bootstrap import SCORES_FILE, load_scores, paired_intervals
    from tessera.eval.gate import DIRECTIONS

    if cfg.evaluate.metrics != "samples" or not cfg.gate.bootstrap:
        return None
    scores = [load_scores(next((run / f"samples-{who}").glob(f"*/{SCORES_FILE}"))) for who in ("candidate", "deployed")]
    if list(scores[0]["prompts"]) != list(scores[1]["prompts"]):
        return None  # a prompt skipped or withheld for one model only: not paired
    real = load_scores(run / "samples-candidate" / "real_features.npz")["feats"]
    return paired_intervals(*scores, real, DIRECTIONS, replicates=cfg.gate.bootstrap)


def sample_grid(model_dir: Path, train: TrainStep, prompts: tuple[str, ...], out: Path) -> str | None:
    """Two samples per prompt from the candidate (generators only), one row per prompt; the prompts passed
    prompt safety when the run started, and an image harm detection flags is a grey tile."""
    from PIL import Image

    import tessera
    from tessera.pipelines.folder import load_pipeline
    from tessera.pipelines.records import grid
    from tessera.safety.image import ImageSafety

    if family(tessera.load(str(model_dir)).kind).role != "generator":
        return None
    lp = load_pipeline(str(model_dir), tokenizer=train.tokenizer or None, text_encoder=train.text_encoder)
    images = lp.run([p for p in prompts for _ in range(2)], lp.params(seed=0, n=2 * len(prompts)))
    images = [Image.new("RGB", im.size, (128, 128, 128)) if v.flagged else im
              for im, v in zip(images, ImageSafety().check(images))]
    grid(images, cols=2).save(out)
    return out.name


def promote(candidate: Path, deployed: Path) -> None:
    """Copy the candidate into place atomically; the replaced model stays as DEPLOYED.previous."""
    tmp = deployed.with_name(deployed.name + ".incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(candidate, tmp)
    previous = deployed.with_name(deployed.name + ".previous")
    if deployed.exists():
        shutil.rmtree(previous, ignore_errors=True)
        deployed.rename(previous)
    tmp.rename(deployed)


def _screen_sample_prompts(prompts: tuple[str, ...]) -> None:
    if not prompts:
        return
    from tessera.safety import screen_prompt
    from tessera.safety.prompt import PromptSafety

    checker = PromptSafety()
    for p in prompts:
        screen_prompt(checker, p, suffix=" (evaluate.prompts of the workflow); nothing was run")


def run_workflow(cfg: WorkflowConfig, run_id: str | None = None) -> dict:
    """The whole pipeline; under torchrun the data and train steps run on every rank and rank 0 alone
    exports, evaluates, gates and promotes (the other ranks return {"rank": r} after training)."""
    from tessera.train import runs
    from tessera.train.distributed import init_distributed, rank0_first

    _screen_sample_prompts(cfg.evaluate.prompts)  # before any work, as `generate` does
    rank, world = init_distributed()
    run = Path(cfg.workdir) / (run_id or time.strftime("%Y%m%d-%H%M%S"))
    if run_id is None and world > 1:
        raise ValueError("under torchrun, give --run-id (the ranks must agree on the run folder)")
    exists = run.exists()
    if world > 1:  # every rank looks before rank 0 creates it
        import torch.distributed as dist
        dist.barrier()
    if exists:
        raise ValueError(f"{run} exists: every pipeline run gets its own folder")
    rank0_first(lambda: run.mkdir(parents=True, exist_ok=rank != 0))
    t0 = time.time()
    data_dir = rank0_first(data_step, cfg.data)
    if cfg.optimize.source:
        if world > 1:
            raise ValueError("the optimize step runs in one process (no torchrun)")
        candidate = optimize_step(cfg.optimize, data_dir, run)
    else:
        train_step(cfg.train, data_dir, run)
        if rank != 0:
            return {"rank": rank, "run": str(run)}
        candidate = runs.export_run(str(run / "train"), str(run / "candidate"))
    deployed = Path(cfg.deployed)
    enc = cfg.train.text_encoder
    metrics = {"candidate": evaluate(candidate, data_dir, cfg.evaluate, enc, run / "samples-candidate"),
               "deployed": evaluate(deployed, data_dir, cfg.evaluate, enc, run / "samples-deployed")
               if deployed.exists() else None}
    intervals = _intervals(run, cfg) if metrics["deployed"] is not None else None
    decision = gate(metrics["candidate"], metrics["deployed"], cfg.gate.tolerances, intervals)
    grid_train = dataclasses.replace(cfg.train, tokenizer="") if cfg.optimize.source else cfg.train  # its own
    grid_file = sample_grid(candidate, grid_train, cfg.evaluate.prompts, run / "samples.png")
    if decision.promote:
        promote(candidate, deployed)
    report = {"name": cfg.name, "run": str(run), "data": data_dir, "candidate": str(candidate),
              "deployed": str(deployed), "metrics": metrics, "decision": dataclasses.asdict(decision),
              "promoted": decision.promote, "samples": grid_file, "seconds": round(time.time() - t0, 1),
              "config": cfg.to_dict()}
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run / "report.md").write_text(report_md(report, decision))
    return report


def report_md(report: dict, decision: Decision) -> str:
    lines = [f"# Pipeline run {report['name']}: {'PROMOTED' if decision.promote else 'REJECTED'}", "",
             f"run `{report['run']}`, data `{report['data']}`, deployed `{report['deployed']}`, "
             f"{report['seconds']} s", "", "## Gate", ""]
    lines += [f"- {r}" for r in decision.reasons]
    lines += ["", "## Metrics (held-out split)", "", "| metric | candidate | deployed |", "| --- | ---: | ---: |"]
    deployed = report["metrics"]["deployed"] or {}
    for k, v in report["metrics"]["candidate"].items():
        d = deployed.get(k)
        lines.append(f"| {k} | {v:.5g} | {'-' if d is None else f'{d:.5g}'} |")
    if report["samples"]:
        lines += ["", f"![samples]({report['samples']})"]
    return "\n".join(lines) + "\n"


def run_file(config_file: str | Path, run_id: str | None = None) -> dict:
    """`tessera workflow run CONFIG.json`."""
    try:
        data = json.loads(Path(config_file).read_text())
    except ValueError as e:
        raise InvalidInputError(f"{config_file}: not valid JSON ({e})") from None
    return run_workflow(WorkflowConfig.from_dict(data), run_id)
