"""Typed dataclass configs with a strict JSON round trip.

Every model and trainer config is a frozen-free dataclass deriving from `Config`. `from_dict`
rejects unknown keys and checks value types, so a typo in a JSON file fails loudly instead of
being silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from tessera.errors import InvalidInputError

C = TypeVar("C", bound="Config")


class ConfigError(InvalidInputError):
    """A config dict or file does not match its dataclass."""


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} matches none of {tp} ({'; '.join(errors)})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, args[0], v) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected an object, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{name}: unsupported config field type {tp}")


@dataclasses.dataclass
class Config:
    """Base class: dataclass fields, strict `from_dict`, JSON save/load."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(names)}")
        kwargs = {k: _coerce(f"{cls.__name__}.{k}", hints[k], v) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        return cls.from_json(Path(path).read_text())


def parse_settings(pairs, option: str = "--set") -> dict[str, Any]:
    """('steps=10', 'cfg_scale=3') -> {'steps': 10, 'cfg_scale': 3} (values are JSON, else strings)."""
    out = {}
    for kv in pairs:
        key, eq, raw = kv.partition("=")
        if not eq or not key:
            raise ConfigError(f"{option} {kv!r}: must be KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


DIFFUSERS_META = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def check_diffusers_config(name: str, config: dict, fixed: dict, read: set | dict) -> None:
    """A diffusers config.json read into one of Tessera's networks: every key is either `read` (mapped onto
    the Tessera config) or `fixed` (must hold the value Tessera's network implements); anything else, or a
    fixed key with another value, is an error naming it (lists compare as tuples)."""
    unknown = sorted(set(config) - set(read) - set(fixed) - DIFFUSERS_META)
    if unknown:
        raise ValueError(f"{name} config: unknown key(s) {unknown}")
    for key, want in fixed.items():
        got = config.get(key, want)
        if (tuple(got) if isinstance(got, list) else got) != want:
            raise ValueError(f"{name} config: {key}={got!r} is not implemented (Tessera: {want!r})")
