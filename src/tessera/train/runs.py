"""Build a run from presets + overrides, train it, export it. Used by the CLI and by scripts.

A run folder holds `run.json` (preset, model config, train config, task config) so that `--resume`
and `tessera export` need nothing but the folder.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from tessera.checkpoint import export_model, load_training_state
from tessera.errors import InvalidInputError, WrongModelError
from tessera.registry import families, family, get_preset, model_class, preset_config
from tessera.train.distributed import shutdown
from tessera.train.trainer import TrainConfig, Trainer


def task_module(task_name: str):
    """The training task `tessera.train.<task_name>`: its `Task` class, `TaskConfig` and `DEFAULT_PRESET`."""
    tasks = sorted({f.task for f in families().values() if f.task})
    if task_name not in tasks:
        raise InvalidInputError(f"unknown training task {task_name!r}; known: {tasks}")
    return importlib.import_module(f"tessera.train.{task_name}")


def _task_classes(task_name: str):
    mod = task_module(task_name)
    return mod.Task, mod.TaskConfig


def check_preset(task_name: str, preset: str) -> None:
    """A preset of a family that the task does not train is an error before any cache is built."""
    kind = get_preset(preset).kind
    if family(kind).task != task_name:
        raise WrongModelError(f"--preset {preset}: a {kind!r} model, which `tessera train {task_name}` does not "
                              f"train (it trains {', '.join(k for k, f in families().items() if f.task == task_name)})")


def apply_overrides(sections: dict[str, dict], overrides: list[str]) -> None:
    """'train.lr=1e-4' / 'task.loss.disc_start=0' / 'model.base_channels=64' (values are JSON)."""
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must be KEY=VALUE")
        key, raw = ov.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = key.split(".")
        if parts[0] not in ("model", "train", "task"):
            raise ValueError(f"override {ov!r}: section must be one of model, train, task")
        node = sections[parts[0]]
        for p in parts[1:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {ov!r}: {p!r} is not a config section")
            node = node[p]
        node[parts[-1]] = value


def new_spec(task_name: str, preset: str, overrides: list[str], model_updates: dict | None = None,
             task_updates: dict | None = None) -> dict:
    check_preset(task_name, preset)
    kind, model_cfg = preset_config(preset, **(model_updates or {}))
    _, task_cfg_cls = _task_classes(task_name)
    spec = {"task_name": task_name, "kind": kind, "preset": str(preset), "model": model_cfg.to_dict(),
            "train": TrainConfig.from_dict({**TrainConfig().to_dict(), **family(kind).train}).to_dict(),
            "task": task_cfg_cls.from_dict(task_updates or {}).to_dict()}
    apply_overrides(spec, overrides)
    return spec


def run_training(task_name: str, data_dir: str, run_dir: str, preset: str | None, max_steps: int | None, resume: bool,
                 overrides: list[str], model_updates: dict | None = None,
                 task_updates: dict | None = None) -> dict[str, float]:
    """Fresh run: build the spec from the preset (None: the task module's DEFAULT_PRESET; + updates,
    + overrides) and write OUT/run.json. --resume: read OUT/run.json (overrides still apply, e.g. a new
    train.max_steps) and continue."""
    run = Path(run_dir)
    spec_path = run / "run.json"
    if resume and spec_path.exists():
        spec = json.loads(spec_path.read_text())
        if spec.get("task_name", task_name) != task_name:
            raise ValueError(f"{run} is a {spec['task_name']!r} run, not {task_name!r}")
        apply_overrides(spec, overrides)
    else:
        if (run / "state.pt").exists():
            raise ValueError(f"{run} already holds a training state; pass --resume or choose a new --out")
        spec = new_spec(task_name, preset or task_module(task_name).DEFAULT_PRESET, overrides, model_updates, task_updates)
    task_cls, task_cfg_cls = _task_classes(task_name)
    cls, cfg_cls = model_class(spec["kind"])
    train_cfg = TrainConfig.from_dict(spec["train"])
    torch.manual_seed(train_cfg.seed)
    model = cls(cfg_cls.from_dict(spec["model"]))
    if train_cfg.init and not (resume and (run / "state.pt").exists()):
        init_weights(model, train_cfg.init)
    task = task_cls(model, data_dir, task_cfg_cls.from_dict(spec["task"]))
    trainer = Trainer(task, train_cfg, run)
    if trainer.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    logs = trainer.fit(max_steps=max_steps, resume=resume)
    shutdown()
    return logs


def init_weights(model: torch.nn.Module, source: str) -> None:
    """Start a fine-tuning run from SOURCE's weights: the same class and config, every tensor (strict)."""
    from tessera.checkpoint import load_model
    from tessera.registry import resolve

    src = load_model(resolve(source))
    if type(src) is not type(model) or src.config != model.config:
        theirs, ours = src.config.to_dict(), model.config.to_dict()
        diff = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)}
        raise ValueError(f"train.init={source}: a {type(src).__name__} whose config differs from the run's "
                         f"({diff or 'class'}); fine-tuning needs the same architecture")
    model.load_state_dict(src.state_dict(), strict=True)


def export_run(run_dir: str, out: str, dtype: str = "float32", extra_meta: dict | None = None) -> Path:
    run = Path(run_dir)
    for name in ("run.json", "state.pt"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run} is not a training run: {name} is missing")
    spec = json.loads((run / "run.json").read_text())
    cls, cfg_cls = model_class(spec["kind"])
    model = cls(cfg_cls.from_dict(spec["model"]))
    state = load_training_state(run / "state.pt")
    model.load_state_dict(state["ema"], strict=True)
    return export_model(model, out, {"trained_steps": int(state["step"]), "preset": spec["preset"],
                                     "train": spec["train"], "task": spec["task"], **(extra_meta or {})},
                        dtype=_DTYPES[dtype])


_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}




def _prepare_text(data_dir: str, text_encoder: str) -> tuple[dict, dict]:
    """Caption cache for a conditional model ('none': unconditional); its width and length."""
    if text_encoder == "none":
        return {"cond_dim": 0}, {}
    from tessera.data.captions import embed_captions
    from tessera.text import load_text_encoder

    enc = load_text_encoder(text_encoder)
    text_dir = embed_captions(data_dir, enc, text_encoder)
    tindex = json.loads((text_dir / "index.json").read_text())
    return {"cond_dim": enc.dim, "max_text_tokens": max(tindex["length"], 64)}, {"text": text_dir.name}


def prepare_inputs(task_name: str, data_dir: str, tokenizer: str = "vq-f8", text_encoder: str = "minilm",
                   space: str = "latent", preset: str | None = None) -> tuple[dict, dict]:
    """The caches a task trains on, built by the `cache` function its model family registers (on rank 0
    first under torchrun, then found complete by the others) -> (model_updates, task_updates) for
    `run_training`. A preset the task does not train fails here, before any cache is built."""
    from tessera.registry import _import
    from tessera.train.distributed import rank0_first

    preset = preset or task_module(task_name).DEFAULT_PRESET
    check_preset(task_name, preset)
    fam = family(get_preset(preset).kind)
    if fam.cache is None:
        return {}, ({"tokenizer": tokenizer} if task_name == "sr" else {})
    return rank0_first(_import(fam.cache), data_dir, tokenizer=tokenizer, text_encoder=text_encoder, space=space)


def prepare_contrastive_inputs(data_dir: str, text_encoder: str = "minilm", **_) -> tuple[dict, dict]:
    """The caption cache (pooled sentence vectors) of the frozen text tower."""
    if text_encoder == "none":
        raise ValueError("the contrastive model needs a text encoder")
    model_updates, task_updates = _prepare_text(data_dir, text_encoder)
    return {"text_encoder": text_encoder, "text_dim": model_updates["cond_dim"]}, task_updates


def prepare_token_inputs(data_dir: str, tokenizer: str = "vq-f8", text_encoder: str = "minilm", **_) -> tuple[dict, dict]:
    """For the token generators (AR, masked): make sure the token and caption caches exist (both
    resumable / skip when complete) and derive the model's vocabulary, grid and condition width."""
    from tessera.tokenizer.tools import tokenize_dataset

    tok_dir = tokenize_dataset(data_dir, tokenizer)
    index = json.loads((tok_dir / "index.json").read_text())
    model_updates, task_updates = _prepare_text(data_dir, text_encoder)
    model_updates.update(vocab_size=index["codebook_size"], grid=index["grid"])
    task_updates["tokens"] = tok_dir.name
    return model_updates, task_updates


def prepare_sr_token_inputs(data_dir: str, tokenizer: str = "vq-f8", text_encoder: str = "minilm", scale: int = 2,
                            **_) -> tuple[dict, dict]:
    """For the token super-resolution transformer: the token grids of every image at its own size and of the
    image reduced `scale` times (both cached, resumable), and the captions."""
    from tessera.tokenizer.tools import tokenize_dataset

    high, low = tokenize_dataset(data_dir, tokenizer), tokenize_dataset(data_dir, tokenizer, downscale=scale)
    index, low_index = (json.loads((d / "index.json").read_text()) for d in (high, low))
    model_updates, task_updates = _prepare_text(data_dir, text_encoder)
    model_updates.update(vocab_size=index["codebook_size"], grid=index["grid"], low_grid=low_index["grid"])
    task_updates.update(tokens=high.name, low_tokens=low.name, tokenizer=tokenizer)
    return model_updates, task_updates


def prepare_diffusion_inputs(data_dir: str, tokenizer: str = "vq-f8", text_encoder: str = "minilm",
                             space: str = "latent", **_) -> tuple[dict, dict]:
    """Latent space: cache the tokenizer's latents and measure the scale that gives them unit variance
    on the train split (LDM's scale factor, stored in the run). Pixel space: the images themselves."""
    model_updates, task_updates = _prepare_text(data_dir, text_encoder)
    task_updates["space"] = space
    if space == "pixel":
        model_updates["in_channels"] = 3
        return model_updates, task_updates
    import numpy as np

    from tessera.data.caches import split_of
    from tessera.tokenizer.tools import cache_latents

    lat_dir = cache_latents(data_dir, tokenizer)
    index = json.loads((lat_dir / "index.json").read_text())
    latents = np.load(lat_dir / "latents.npy", mmap_mode="r")
    train = latents[split_of(data_dir, index["keys"]) == "train"].astype(np.float32)
    model_updates.update(in_channels=index["channels"], sample_size=index["grid"][0])
    task_updates.update(tokenizer=tokenizer, latents=lat_dir.name, latent_scale=float(1.0 / train.std()))
    return model_updates, task_updates


def train_command(task_name: str, data_dir: str, run_dir: str, preset: str | None = None, max_steps: int | None = None,
                  resume: bool = False, overrides: list[str] | None = None, tokenizer: str = "vq-f8",
                  text_encoder: str = "minilm", space: str = "latent", device: str | None = None,
                  dtype: str | None = None) -> dict[str, float]:
    """`tessera train TASK`: the caches it needs (a fresh run), then the run. --device / --dtype become
    train.device / train.dtype overrides (stored in run.json, so --resume keeps them unless given again)."""
    overrides = list(overrides or [])
    overrides += [f'train.{k}="{v}"' for k, v in (("device", device), ("dtype", dtype)) if v is not None]
    if resume and (Path(run_dir) / "run.json").exists() and task_name != "sr":
        updates: tuple[dict, dict] = ({}, {})
    else:
        updates = prepare_inputs(task_name, data_dir, tokenizer, text_encoder, space, preset)
    return run_training(task_name, data_dir, run_dir, preset, max_steps, resume, overrides, *updates)
