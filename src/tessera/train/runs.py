"""Build a run from presets + overrides, train it, export it. Used by the CLI and by scripts.

A run folder holds `run.json` (preset, model config, train config, task config) so that `--resume`
and `tessera export` need nothing but the folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tessera.checkpoint import export_model, load_training_state
from tessera.registry import model_class, preset_config
from tessera.train.distributed import shutdown
from tessera.train.trainer import TrainConfig, Trainer

# default trainer settings per model kind (CLI --set overrides them)
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "vq": dict(batch_size=16, lr=2e-4, betas=(0.5, 0.9), warmup_steps=500, ema_decay=0.999, max_steps=20000),
    "ar": dict(batch_size=32, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=500, ema_decay=0.999,
               max_steps=20000),
    "masked": dict(batch_size=32, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=500,
                   ema_decay=0.999, max_steps=20000),
    "unet": dict(batch_size=32, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=500, ema_decay=0.999,
                 max_steps=20000),
    "srvgg": dict(batch_size=16, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=200, ema_decay=0.999,
                  max_steps=20000, val_every=500),
    "rrdbnet": dict(batch_size=16, lr=2e-4, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=200,
                    ema_decay=0.999, max_steps=20000, val_every=500),
    "contrastive": dict(batch_size=128, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1, warmup_steps=100,
                        ema_decay=0.995, max_steps=2000, val_every=250),
    "dit": dict(batch_size=32, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=500, ema_decay=0.999,
                max_steps=20000),
}


DEFAULT_PRESETS = {"tokenizer": "vq-f8", "ar": "ar-s", "masked": "masked-s", "diffusion": "unet-s",
                   "sr": "sr-compact-x4", "contrastive": "clip-xs"}


def _task_classes(task_name: str):
    if task_name == "tokenizer":
        from tessera.train.tokenizer import TokenizerTask, TokenizerTaskConfig

        return TokenizerTask, TokenizerTaskConfig
    if task_name == "ar":
        from tessera.train.ar import ARTask, ARTaskConfig

        return ARTask, ARTaskConfig
    if task_name == "masked":
        from tessera.train.masked import MaskedTask, MaskedTaskConfig

        return MaskedTask, MaskedTaskConfig
    if task_name == "diffusion":
        from tessera.train.diffusion import DiffusionTask, DiffusionTaskConfig

        return DiffusionTask, DiffusionTaskConfig
    if task_name == "sr":
        from tessera.train.sr import SRTask, SRTaskConfig

        return SRTask, SRTaskConfig
    if task_name == "contrastive":
        from tessera.train.contrastive import ContrastiveTask, ContrastiveTaskConfig

        return ContrastiveTask, ContrastiveTaskConfig
    raise KeyError(f"unknown training task {task_name!r}")


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
    kind, model_cfg = preset_config(preset, **(model_updates or {}))
    _, task_cfg_cls = _task_classes(task_name)
    spec = {"task_name": task_name, "kind": kind, "preset": preset, "model": model_cfg.to_dict(),
            "train": TrainConfig.from_dict({**TrainConfig().to_dict(), **TRAIN_DEFAULTS[kind]}).to_dict(),
            "task": task_cfg_cls.from_dict(task_updates or {}).to_dict()}
    apply_overrides(spec, overrides)
    return spec


def run_training(task_name: str, data_dir: str, run_dir: str, preset: str | None, max_steps: int | None, resume: bool,
                 overrides: list[str], model_updates: dict | None = None,
                 task_updates: dict | None = None) -> dict[str, float]:
    """Fresh run: build the spec from the preset (None: the task's DEFAULT_PRESETS entry; + updates,
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
        spec = new_spec(task_name, preset or DEFAULT_PRESETS[task_name], overrides, model_updates, task_updates)
    task_cls, task_cfg_cls = _task_classes(task_name)
    cls, cfg_cls = model_class(spec["kind"])
    train_cfg = TrainConfig.from_dict(spec["train"])
    torch.manual_seed(train_cfg.seed)
    model = cls(cfg_cls.from_dict(spec["model"]))
    task = task_cls(model, data_dir, task_cfg_cls.from_dict(spec["task"]))
    trainer = Trainer(task, train_cfg, run)
    if trainer.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    logs = trainer.fit(max_steps=max_steps, resume=resume)
    shutdown()
    return logs


def export_run(run_dir: str, out: str, dtype: str = "float32") -> Path:
    run = Path(run_dir)
    for name in ("run.json", "state.pt"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run} is not a training run: {name} is missing")
    spec = json.loads((run / "run.json").read_text())
    cls, cfg_cls = model_class(spec["kind"])
    model = cls(cfg_cls.from_dict(spec["model"]))
    state = load_training_state(run / "state.pt")
    model.load_state_dict(state["ema"], strict=True)
    return export_model(model, spec["kind"], out, {"trained_steps": int(state["step"]), "preset": spec["preset"],
                                                   "train": spec["train"], "task": spec["task"]},
                        dtype=_DTYPES[dtype])


_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}




def _prepare_text(data_dir: str, text_encoder: str) -> tuple[dict, dict]:
    """Caption cache for a conditional model ('none': unconditional); its width and length."""
    if text_encoder == "none":
        return {"cond_dim": 0}, {}
    from tessera.text import load_text_encoder
    from tessera.text.cache import embed_captions

    enc = load_text_encoder(text_encoder)
    text_dir = embed_captions(data_dir, enc, text_encoder)
    tindex = json.loads((text_dir / "index.json").read_text())
    return {"cond_dim": enc.dim, "max_text_tokens": max(tindex["length"], 64)}, {"text": text_dir.name}


def prepare_inputs(task_name: str, data_dir: str, tokenizer: str = "vq-f8", text_encoder: str = "minilm",
                   space: str = "latent") -> tuple[dict, dict]:
    """The caches a task trains on (built on rank 0 first under torchrun, then found complete by the
    others) -> (model_updates, task_updates) for `run_training`."""
    from tessera.train.distributed import rank0_first

    if task_name in ("ar", "masked"):
        return rank0_first(prepare_token_inputs, data_dir, tokenizer, text_encoder)
    if task_name == "diffusion":
        return rank0_first(prepare_diffusion_inputs, data_dir, tokenizer, text_encoder, space)
    if task_name == "contrastive":
        return rank0_first(prepare_contrastive_inputs, data_dir, text_encoder)
    if task_name == "sr":
        return {}, {"tokenizer": tokenizer}
    return {}, {}


def prepare_contrastive_inputs(data_dir: str, text_encoder: str) -> tuple[dict, dict]:
    """The caption cache (pooled sentence vectors) of the frozen text tower."""
    if text_encoder == "none":
        raise ValueError("the contrastive model needs a text encoder")
    model_updates, task_updates = _prepare_text(data_dir, text_encoder)
    return {"text_encoder": text_encoder, "text_dim": model_updates["cond_dim"]}, task_updates


def prepare_token_inputs(data_dir: str, tokenizer: str, text_encoder: str) -> tuple[dict, dict]:
    """For the token generators (AR, masked): make sure the token and caption caches exist (both
    resumable / skip when complete) and derive the model's vocabulary, grid and condition width."""
    from tessera.tokenizer.tools import tokenize_dataset

    tok_dir = tokenize_dataset(data_dir, tokenizer)
    index = json.loads((tok_dir / "index.json").read_text())
    model_updates, task_updates = _prepare_text(data_dir, text_encoder)
    model_updates.update(vocab_size=index["codebook_size"], grid=index["grid"])
    task_updates["tokens"] = tok_dir.name
    return model_updates, task_updates


def prepare_diffusion_inputs(data_dir: str, tokenizer: str, text_encoder: str, space: str) -> tuple[dict, dict]:
    """Latent space: cache the tokenizer's latents and measure the scale that gives them unit variance
    on the train split (LDM's scale factor, stored in the run). Pixel space: the images themselves."""
    model_updates, task_updates = _prepare_text(data_dir, text_encoder)
    task_updates["space"] = space
    if space == "pixel":
        model_updates["in_channels"] = 3
        return model_updates, task_updates
    import numpy as np

    from tessera.tokenizer.tools import cache_latents
    from tessera.train.diffusion import split_mask

    lat_dir = cache_latents(data_dir, tokenizer)
    index = json.loads((lat_dir / "index.json").read_text())
    latents = np.load(lat_dir / "latents.npy", mmap_mode="r")
    train = latents[split_mask(data_dir, index["keys"], "train")].astype(np.float32)
    model_updates.update(in_channels=index["channels"], sample_size=index["grid"][0])
    task_updates.update(tokenizer=tokenizer, latents=lat_dir.name, latent_scale=float(1.0 / train.std()))
    return model_updates, task_updates
