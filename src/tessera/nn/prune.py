"""Structured pruning of a Transformer's MLPs (`tessera optimize SRC --prune F`; the driver with its recovery
fine-tune is train/prune.py): fraction F of the hidden channels of every block's MLP (the largest part of a
block: 2 * dim * 4 dim of its weights) removed, the same number in every block.

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
AR and masked token Transformers, DiT, the masked super-resolver).
"""
from __future__ import annotations

import dataclasses

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
