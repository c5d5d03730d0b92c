"""Structured pruning with a recovery fine-tune (`tessera optimize SRC --prune F [--data D --max-steps N] -o OUT`):
nn/prune.py removes fraction F of every block's MLP channels; the recovery run is `tessera train <task>` started
from the pruned weights (train.init) in OUT.run (re-running the command resumes it)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tessera.errors import InvalidInputError


def prune(src: str, out: str, fraction: float, data_dir: str | None, max_steps: int, overrides: list[str]) -> dict:
    """`tessera optimize SRC --prune F`: prune, then (with --data) fine-tune in OUT.run and export OUT."""
    from tessera.checkpoint import export_model, load_model
    from tessera.nn.prune import prune_mlps
    from tessera.registry import family_of, resolve
    from tessera.train import runs

    if Path(out).exists() and any(Path(out).iterdir()):
        raise InvalidInputError(f"-o {out}: not empty")
    model = load_model(resolve(src))
    pruned, report = prune_mlps(model, fraction)
    meta = model.meta.to_dict() if model.meta else {}
    record = {"source": str(src), **{k: report[k] for k in ("fraction", "mlp_hidden", "parameters", "criterion")}}
    keep_meta = {k: meta[k] for k in ("preset", "task", "train") if meta.get(k) is not None}
    if not data_dir:  # pruned only: the caller fine-tunes it (or serves it as it is)
        export_model(pruned, out, {**keep_meta, "pruned": {**record, "recovery_steps": 0}}, dtype=torch.float16)
        return {"out": str(out), **report, "recovery_steps": 0}
    task_name = family_of(model).task
    if not task_name:
        raise InvalidInputError(f"--data: {src} is a {model.kind} model, which no training task fine-tunes")
    run = Path(str(out) + ".run")
    init = run / "pruned"
    if not (init / "model.safetensors").is_file():
        export_model(pruned, init, {**keep_meta, "pruned": record})
    task = dict(meta.get("task") or {})
    _, caches = runs.prepare_inputs(task_name, data_dir, _tokenizer_of(task, data_dir), task.get("text", "minilm"),
                                    preset=meta.get("preset"))
    train = ["train.warmup_steps=50", f'train.init="{init}"', *overrides]
    logs = runs.run_training(task_name, data_dir, str(run), meta.get("preset"), max_steps,
                             (run / "state.pt").is_file(), train, pruned.config.to_dict(), {**task, **caches})
    path = runs.export_run(str(run), out, "float16", {"pruned": {**record, "recovery_steps": int(max_steps)}})
    return {"out": str(path), **report, "recovery_steps": int(max_steps), "run": str(run), "last": logs}


def _tokenizer_of(task: dict, data_dir: str) -> str:
    """The tokenizer the model trained with: the task's own field (diffusion), else the one that wrote its
    token cache (DATA/tokens/<name>/index.json, AR / masked), else the bundled vq-f8."""
    if task.get("tokenizer"):
        return task["tokenizer"]
    index = Path(data_dir) / "tokens" / str(task.get("tokens")) / "index.json"
    return json.loads(index.read_text())["model"] if task.get("tokens") and index.is_file() else "vq-f8"

