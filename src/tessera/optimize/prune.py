"""Structured pruning of a Tessera Transformer (`tessera optimize SRC --prune F [--data D --max-steps N] -o OUT`):
the hidden channels of every block's MLP (the largest part of a block: 2 * dim * 4 dim of its weights),
fraction F of them removed in every block alike, then a short recovery fine-tune on D.

A channel j of an MLP  y = fc2(gelu(fc1(x)))  is one row of fc1 and one column of fc2; removing it removes
both. Its importance is the weight-magnitude product

    I_j = ||fc1.weight[j, :]||_2 * ||fc2.weight[:, j]||_2

(a data-free, first-order proxy for the channel's contribution to y: how much of x it can carry times how
much of it reaches y; the magnitude criterion of Li et al. 2017, "Pruning filters for efficient ConvNets",
for a channel that spans two layers). The lowest-I channels of each block go; the pruned network is an
ordinary one of the same family with `mlp_ratio = kept / dim`, so it loads, trains, exports and serves like
any other (its meta.json records the pruning). Attention heads are not pruned (a head's width is dim /
heads in these configs: fewer heads would change every other head's width).

Families: the ones whose config has `dim` and `mlp_ratio` and whose blocks use nn/attention.py's MLP (the
AR and masked token Transformers, DiT, the masked super-resolver). The recovery run is `tessera train
<task>` started from the pruned weights (train.init), in OUT.run (re-running the command resumes it).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from tessera.errors import InvalidInputError


def _pruned_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """The MLPs the config's mlp_ratio sizes: qualified name -> module, in the model's own order."""
    from tessera.nn.attention import MLP

    cfg = model.config
    hidden = int(cfg.dim * cfg.mlp_ratio)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, MLP) and m.fc1.in_features == cfg.dim and m.fc1.out_features == hidden
            and m.fc2.out_features == cfg.dim}


def channel_importance(mlp: nn.Module) -> torch.Tensor:
    """I_j = ||fc1 row j|| * ||fc2 column j|| [hidden] (the module docstring)."""
    return mlp.fc1.weight.detach().float().norm(dim=1) * mlp.fc2.weight.detach().float().norm(dim=0)


def kept_width(dim: int, hidden: int, fraction: float, multiple: int = 8) -> int:
    """How many channels stay when `fraction` of `hidden` go: a multiple of `multiple` (the kernels' vector
    width) that `int(dim * (kept / dim))` gives back exactly, so the stored mlp_ratio rebuilds it."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"--prune {fraction}: the fraction of MLP channels to remove must be in (0, 1)")
    kept = max(multiple, int(round(hidden * (1.0 - fraction) / multiple)) * multiple)
    while int(dim * (kept / dim)) != kept:  # float round trip of the ratio
        kept -= multiple
    if kept >= hidden:
        raise InvalidInputError(f"--prune {fraction}: removes no channel of {hidden} (rounded to {multiple}s)")
    return kept


def prune_mlps(model: nn.Module, fraction: float) -> tuple[nn.Module, dict]:
    """A new model of the same family with `fraction` of every sized MLP's hidden channels removed (the
    least important, `channel_importance`), every other tensor copied -> (model, report)."""
    cfg = model.config
    if not (hasattr(cfg, "dim") and hasattr(cfg, "mlp_ratio")):
        raise InvalidInputError(f"--prune: a {type(model).__name__} has no MLP width to prune (pruning takes the "
                                f"Transformer families: ar, masked, dit, masked-sr)")
    mlps = _pruned_mlps(model)
    if not mlps:
        raise InvalidInputError(f"--prune: {type(model).__name__} has no MLP of width dim * mlp_ratio")
    hidden = int(cfg.dim * cfg.mlp_ratio)
    kept = kept_width(cfg.dim, hidden, fraction)
    state = model.state_dict()
    for name, mlp in mlps.items():
        keep = channel_importance(mlp).topk(kept).indices.sort().values  # (kept,), original order
        for p in ("weight", "bias"):
            state[f"{name}.fc1.{p}"] = state[f"{name}.fc1.{p}"][keep]  # rows: the channels
        state[f"{name}.fc2.weight"] = state[f"{name}.fc2.weight"][:, keep]  # (dim, kept)
    new_cfg = dataclasses.replace(cfg, mlp_ratio=kept / cfg.dim)
    pruned = type(model)(new_cfg)
    pruned.load_state_dict(state, strict=True)
    report = {"pruned_layers": len(mlps), "mlp_hidden": [hidden, kept], "fraction": fraction,
              "parameters": [_count(model), _count(pruned)], "criterion": "||fc1 row|| * ||fc2 column||"}
    return pruned.eval(), report


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(src: str, out: str, fraction: float, data_dir: str | None, max_steps: int, overrides: list[str]) -> dict:
    """`tessera optimize SRC --prune F`: prune, then (with --data) fine-tune in OUT.run and export OUT."""
    from tessera.checkpoint import export_model, load_model
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
    path = runs.export_run(str(run), out, "float16")
    _add_meta(path, {"pruned": {**record, "recovery_steps": int(max_steps)}})
    return {"out": str(path), **report, "recovery_steps": int(max_steps), "run": str(run), "last": logs}


def _tokenizer_of(task: dict, data_dir: str) -> str:
    """The tokenizer the model trained with: the task's own field (diffusion), else the one that wrote its
    token cache (DATA/tokens/<name>/index.json, AR / masked), else the bundled vq-f8."""
    import json

    if task.get("tokenizer"):
        return task["tokenizer"]
    index = Path(data_dir) / "tokens" / str(task.get("tokens")) / "index.json"
    return json.loads(index.read_text())["model"] if task.get("tokens") and index.is_file() else "vq-f8"


def _add_meta(folder: Path, extra: dict) -> None:
    import json

    from tessera.checkpoint import META, atomic_write_bytes

    meta = json.loads((folder / META).read_text())
    atomic_write_bytes(folder / META, (json.dumps({**meta, **extra}, indent=2) + "\n").encode())
