"""One registry of model families and presets, filled where each family is defined (timm's pattern).

A *family* is a model class with its config class, registered by a decorator in the model's own file:

    @register_family("ar", ARConfig, role="generator", paradigm="ar", sampler="ar-kv-cache", task="ar",
                     cache="tessera.train.runs:prepare_token_inputs", train=dict(lr=3e-4, ...))
    class ARTransformer(nn.Module): ...

It names what the rest of the system needs: the paradigm it generates in, its default sampler, the
training task (module `tessera.train.<task>`), the function that builds the caches it trains on, and
its trainer defaults. The class and its config learn their `kind`, so a model knows what it is.

A *preset* is a named config of a family (`register_preset("ar-xs", "ar", dim=192, ...)`). Presets
with `weights=True` ship a bundled model in `tessera/weights/<name>/`; the others are configs to train.
A preset may also be a JSON file {"kind": ..., "config": {...}} (tests keep their tiny presets so).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import json
from pathlib import Path
from typing import Any

from tessera.errors import InvalidInputError, ModelNotFoundError

# packages whose import registers the families defined in them (each imports its own model files)
FAMILY_PACKAGES = ("tessera.tokenizer", "tessera.generators", "tessera.superres", "tessera.eval.contrastive",
                   "tessera.safety.classifier")


@dataclasses.dataclass(frozen=True)
class Family:
    kind: str
    model: type
    config: type
    role: str                      # tokenizer | generator | superres | scorer | safety
    paradigm: str | None = None    # ar | masked | diffusion (generators only)
    sampler: str | None = None     # the default sampler of its paradigm
    pipeline: str | None = None    # "module:Class" of the inference pipeline that samples it
    task: str | None = None        # training task: module tessera.train.<task>
    cache: str | None = None       # "module:function" that builds the caches the task trains on
    train: dict = dataclasses.field(default_factory=dict)  # trainer defaults (TrainConfig fields)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    kind: str
    config: dict
    weights: bool = False          # a bundled model ships in tessera/weights/<name>/
    default: bool = False          # the bundled default of its paradigm / role


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, Preset] = {}


def register_family(kind: str, config: type, *, role: str, paradigm: str | None = None, sampler: str | None = None,
                    pipeline: str | None = None, task: str | None = None, cache: str | None = None,
                    train: dict | None = None):
    """Class decorator: register `cls` as the model of family `kind` (its config class `config`)."""
    def deco(cls: type) -> type:
        if kind in _FAMILIES and _FAMILIES[kind].model is not cls:
            raise RuntimeError(f"model family {kind!r} is registered twice ({_FAMILIES[kind].model} and {cls})")
        cls.kind = config.kind = kind
        if not hasattr(cls, "meta"):
            cls.meta = None  # checkpoint.ModelMeta once saved or loaded
        _FAMILIES[kind] = Family(kind, cls, config, role, paradigm, sampler, pipeline, task, cache, dict(train or {}))
        return cls
    return deco


def register_preset(name: str, kind: str, *, weights: bool = False, default: bool = False, **config: Any) -> None:
    _PRESETS[name] = Preset(name, kind, config, weights or default, default)


def default_model(paradigm_or_role: str) -> str:
    """The bundled default preset of a paradigm (ar | masked | diffusion) or a role (tokenizer, ...)."""
    for p in presets(True).values():
        fam = family(p.kind)
        if p.default and paradigm_or_role in (fam.paradigm, fam.role):
            return p.name
    raise InvalidInputError(f"no bundled default model for {paradigm_or_role!r}")


def paradigms() -> tuple[str, ...]:
    return tuple(sorted({f.paradigm for f in families().values() if f.paradigm}))


def _import(ref: str) -> Any:
    """'package.module:attr' -> the attribute (families name their task helpers so, without importing them)."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _ensure_loaded() -> None:
    for package in FAMILY_PACKAGES:
        importlib.import_module(package)


def families() -> dict[str, Family]:
    _ensure_loaded()
    return dict(_FAMILIES)


def family(kind: str) -> Family:
    _ensure_loaded()
    if kind not in _FAMILIES:
        raise InvalidInputError(f"unknown model kind {kind!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[kind]


def family_of(model) -> Family:
    kind = getattr(model, "kind", None)
    if kind is None:
        raise InvalidInputError(f"{type(model).__name__} is not a registered Tessera model family")
    return family(kind)


def model_class(kind: str) -> tuple[type, type]:
    f = family(kind)
    return f.model, f.config


def presets(weights: bool | None = None) -> dict[str, Preset]:
    """Every preset; `weights=True` only those with a bundled model, `False` only bare configs."""
    _ensure_loaded()
    return {k: p for k, p in _PRESETS.items() if weights is None or p.weights == weights}


def known_names() -> str:
    return (f"bundled models: {', '.join(sorted(presets(True)))}; "
            f"configs to train: {', '.join(sorted(presets(False)))}")


def _preset_file(path: Path) -> Preset:
    try:
        data = json.loads(path.read_text())
        return Preset(path.stem, data["kind"], dict(data.get("config", {})))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"preset file {path}: expected JSON {{\"kind\": ..., \"config\": {{...}}}} ({e})")


def get_preset(name: str | Path) -> Preset:
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return _preset_file(path)
    all_presets = presets()
    if str(name) not in all_presets:
        raise InvalidInputError(f"unknown preset {str(name)!r}; {known_names()}")
    return all_presets[str(name)]


def preset_config(name: str | Path, **overrides: Any):
    """(kind, config) of a preset name or preset file, with `overrides` applied."""
    p = get_preset(name)
    return p.kind, family(p.kind).config.from_dict({**p.config, **overrides})


def build(name: str | Path, **overrides: Any):
    """A freshly initialised model of a preset (random weights)."""
    kind, cfg = preset_config(name, **overrides)
    return family(kind).model(cfg)


def bundled_dir(name: str) -> Path:
    return Path(str(importlib.resources.files("tessera") / "weights" / name))


def resolve(path_or_preset: str | Path) -> Path:
    """The folder a model / pipeline name stands for: itself if it is a folder, else a bundled preset's."""
    p = Path(path_or_preset)
    if p.is_dir():
        return p
    name = str(path_or_preset)
    preset = presets().get(name)
    if preset is not None and bundled_dir(name).is_dir():
        return bundled_dir(name)
    if preset is not None:
        raise ModelNotFoundError(f"{name!r} is a config preset without bundled weights: train one "
                                 f"(`tessera train`) and pass its exported folder; {known_names()}")
    raise ModelNotFoundError(f"{name!r} is neither a model / pipeline folder nor a bundled model; {known_names()}")
