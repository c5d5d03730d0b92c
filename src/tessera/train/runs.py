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
from tessera.config import Config
from tessera.registry import model_class, preset_config
from tessera.train.trainer import TrainConfig, Trainer

# default trainer settings per task kind (CLI --set overrides them)
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "vq": dict(batch_size=16, lr=2e-4, betas=(0.5, 0.9), warmup_steps=500, ema_decay=0.999, max_steps=20000),
}


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
        if parts[0] not in sections:
            raise ValueError(f"override {ov!r}: section must be one of {sorted(sections)}")
        node = sections[parts[0]]
        for p in parts[1:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {ov!r}: {p!r} is not a config section")
            node = node[p]
        node[parts[-1]] = value


def _tokenizer_setup(run_dir: Path, data_dir: str, preset: str, overrides: list[str], resume: bool):
    from tessera.train.tokenizer import TokenizerTask, TokenizerTaskConfig

    spec_path = run_dir / "run.json"
    if resume and spec_path.exists():
        spec = json.loads(spec_path.read_text())
        if overrides:
            apply_overrides(spec, overrides)
    else:
        kind, model_cfg = preset_config(preset)
        spec = {"kind": kind, "preset": preset, "model": model_cfg.to_dict(),
                "train": {**TrainConfig().to_dict(), **TRAIN_DEFAULTS[kind]}, "task": TokenizerTaskConfig().to_dict()}
        spec["train"] = TrainConfig.from_dict(spec["train"]).to_dict()
        apply_overrides(spec, overrides)
    cls, cfg_cls = model_class(spec["kind"])
    model = cls(cfg_cls.from_dict(spec["model"]))
    train_cfg = TrainConfig.from_dict(spec["train"])
    task = TokenizerTask(model, data_dir, TokenizerTaskConfig.from_dict(spec["task"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    return task, train_cfg


def run_tokenizer_training(data_dir: str, run_dir: str, preset: str, max_steps: int | None, resume: bool,
                           overrides: list[str]) -> dict[str, float]:
    run = Path(run_dir)
    if not resume and (run / "state.pt").exists():
        raise ValueError(f"{run} already holds a training state; pass --resume or choose a new --out")
    task, cfg = _tokenizer_setup(run, data_dir, preset, overrides, resume)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(task, cfg, run)
    return trainer.fit(max_steps=max_steps, resume=resume)


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


__all__ = ["apply_overrides", "export_run", "run_tokenizer_training", "Config"]
