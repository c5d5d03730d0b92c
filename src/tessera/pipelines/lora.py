"""LoRA weights users bring, merged into Tessera's SD networks at a scale: W <- W + scale * (alpha / r) * up @ down.

    diffusers / PEFT   unet.<module>.lora_A.weight [r, in], .lora_B.weight [out, r] (older: .lora.down / .lora.up),
                       alpha from the file's `lora_adapter_metadata` (else alpha = r)
    kohya / A1111      lora_unet_<module with '_'>.lora_down.weight / .lora_up.weight / .alpha,
                       lora_te_<CLIP text module with '_'>... for the text encoder

Every key of the file must land on a module: one that does not is an error naming it (a LoRA that loads
silently without effect is the top complaint of diffusers and kohya users). Merging is undone by applying
the same file at -scale.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from tessera.errors import InvalidInputError, WrongModelError

_PEFT = re.compile(r"^(unet|text_encoder)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
_KOHYA = re.compile(r"^(lora_unet|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def parse_spec(spec: str) -> tuple[str, float]:
    """'FILE[:SCALE]' (the CLI's --lora) -> (file, scale)."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not re.fullmatch(r"-?\d+(\.\d+)?", scale):
        return spec, 1.0
    return path, float(scale)


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidInputError(f"--lora {path}: LoRA weights are read from .safetensors only")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _peft_alphas(meta: dict) -> dict[str, float]:
    """diffusers' `lora_adapter_metadata`: {"unet.lora_alpha": a, "unet.r": r, ...} as JSON (may be absent)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    data = json.loads(raw)
    return {comp: float(data[f"{comp}.lora_alpha"]) / float(data[f"{comp}.r"])
            for comp in ("unet", "text_encoder") if f"{comp}.lora_alpha" in data and f"{comp}.r" in data}


def _pairs(state: dict[str, torch.Tensor], meta: dict) -> tuple[dict, list[str]]:
    """-> {(component, module path or kohya name): (down [r,in,...], up [out,r,...], alpha/r)}, unparsed keys."""
    parts: dict = defaultdict(dict)
    unparsed = []
    alphas = _peft_alphas(meta)
    for key, t in state.items():
        if m := _PEFT.match(key):
            comp, module, which = m[1], m[2], m[3]
            parts[(comp, module)]["down" if which in ("lora_A", "lora.down") else "up"] = t
            parts[(comp, module)].setdefault("ratio", alphas.get(comp))
        elif m := _KOHYA.match(key):
            comp = "unet" if m[1] == "lora_unet" else "text_encoder"
            slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]]
            parts[(comp, "_" + m[2])][slot] = t  # '_' marks a kohya name (module path with underscores)
        else:
            unparsed.append(key)
    out = {}
    for (comp, module), p in parts.items():
        if "down" not in p or "up" not in p:
            unparsed.append(f"{comp}:{module} (a down / up half is missing)")
            continue
        rank = p["down"].shape[0]
        ratio = float(p["alpha"]) / rank if "alpha" in p else (p.get("ratio") or 1.0)
        out[(comp, module)] = (p["down"], p["up"], ratio)
    return out, unparsed


def _modules(net: nn.Module) -> dict[str, nn.Module]:
    """Weighted Linear / Conv2d modules by path, also under their kohya names (dots -> underscores), and for
    transformers-5 CLIP models also under the 'text_model.' paths files were written with."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            for n in (name, "text_model." + name if not name.startswith("text_model.") else name):
                out[n] = m
                out["_" + n.replace(".", "_")] = m
    return out


@torch.no_grad()
def merge_lora(networks: dict[str, nn.Module], path: str | Path, scale: float = 1.0) -> int:
    """Merge a LoRA file into `networks` ({"unet": ..., "text_encoder": ...}); returns how many modules
    changed. Any key that does not land on a module of the right shape is an error (nothing is merged then)."""
    state, meta = _read(path)
    pairs, unparsed = _pairs(state, meta)
    targets = {comp: _modules(net) for comp, net in networks.items() if net is not None}
    plan, unmatched = [], list(unparsed)
    for (comp, module), (down, up, ratio) in pairs.items():
        m = targets.get(comp, {}).get(module)
        delta = None
        if m is not None:
            delta = (up.flatten(1).float() @ down.flatten(1).float())  # (out, in * k * k)
            delta = delta.reshape(m.weight.shape) if delta.numel() == m.weight.numel() else None
        if delta is None:
            unmatched.append(f"{comp}:{module}")
            continue
        plan.append((m, delta * ratio * scale))
    if unmatched:
        raise WrongModelError(f"{path}: {len(unmatched)} LoRA key(s) match no module of this model, e.g. "
                              f"{unmatched[:5]} (nothing was applied)")
    if not plan:
        raise WrongModelError(f"{path}: no LoRA weights in the file")
    for m, delta in plan:
        m.weight += delta.to(m.weight.dtype)
    return len(plan)
