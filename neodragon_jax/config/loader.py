"""Preset loading, dotted overrides and (de)serialisation of the frozen config schema.

A preset is a TOML file in ``configs/`` that lists only what differs from the schema defaults; it may name
a ``base`` preset to start from. Overrides are ``dotted.key=value`` strings whose values are parsed as TOML
literals (``18``, ``1e-4``, ``"bfloat16"``, ``[1, 2, 1]``, ``true``) and fall back to a bare string.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from neodragon_jax.config.schema import Config
from neodragon_jax.config.stage_settings import StageSettings


class ConfigError(ValueError):
    """A preset or override does not fit the schema."""


def _candidate_preset_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    return [here.parents[2] / "configs", here.parents[1] / "_configs"]


def presets_dir() -> Path:
    for d in _candidate_preset_dirs():
        if d.is_dir():
            return d
    raise ConfigError(f"no presets folder found (looked in {[str(d) for d in _candidate_preset_dirs()]})")


def available_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def _resolve_preset_path(preset: str | Path) -> Path:
    path = Path(preset)
    if path.suffix == ".toml" and path.is_file():
        return path
    candidate = presets_dir() / f"{preset}.toml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"unknown preset {str(preset)!r}: expected one of {available_presets()} or a path to a .toml file"
    )


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key the schema accepts."""
    keys = []
    for name, tp in _field_types(cls).items():
        if tp is StageSettings:
            keys.extend(StageSettings().valid_keys(f"{prefix}{name}."))
        elif dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (after TOML/JSON parsing) and normalise containers."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in args:
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if tp is type(None):
        if value is None or value == "none" or value == "None":
            return None
        raise ConfigError(f"{key}: expected None, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def near_keys(key: str, keys: Iterable[str] | None = None, n: int = 5) -> list[str]:
    """Valid dotted keys that look like ``key``: close as a whole, or with a close last part."""
    keys = list(valid_keys() if keys is None else keys)
    whole = difflib.get_close_matches(key, keys, n=n, cutoff=0.75)
    leaf = key.rsplit(".", 1)[-1]
    leaves = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    by_leaf = [k for m in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.8) for k in leaves[m]]
    # whole-key matches first, then same-leaf keys closest to the given one
    by_leaf.sort(key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
    return list(dict.fromkeys(whole + by_leaf))[:n]


def unknown_key_message(key: str, value: Any, prefix: str, section_keys: list[str]) -> str:
    """The near matches first, then the keys of the section; never the whole list of leaf keys."""
    full = key
    if isinstance(value, Mapping) and value:  # a section that does not exist: suggest for its first leaf
        node, full = value, key
        while isinstance(node, Mapping) and node:
            k = next(iter(node))
            full, node = f"{full}.{k}", node[k]
    near = near_keys(full)
    msg = f"unknown config key {full!r}" + (f". Did you mean {', '.join(near)}?" if near else ".")
    where = repr(prefix) if prefix else "the root"
    msg += f" Keys under {where}: {', '.join(prefix + k for k in section_keys)}"
    return msg + " (every key: neodragon_jax/config/schema.py)"


def _apply(obj, updates: Mapping[str, Any], prefix: str = "", *, strict_stages: bool = True):
    """Return ``obj`` with nested ``updates`` applied; unknown keys raise with the valid list.

    ``strict_stages=False`` (reading a recorded config) keeps the settings of stages this process has not
    registered as plain dicts instead of refusing them."""
    cls = type(obj)
    types_ = _field_types(cls)
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise ConfigError(unknown_key_message(key, updates[name], prefix, list(types_)))
        tp = types_[name]
        current = getattr(obj, name)
        if tp is StageSettings:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} is a section; set its fields, e.g. {key}.<stage>.<field>=...")
            changes[name] = current.apply(value, f"{key}.", strict=strict_stages)
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} is a section; set its fields, e.g. {key}.<field>=...")
            changes[name] = _apply(current, value, f"{key}.", strict_stages=strict_stages)
        else:
            changes[name] = _coerce(value, tp, key)
    return dataclasses.replace(obj, **changes) if changes else obj


def _merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _preset_tree(preset: str | Path, seen: tuple[str, ...] = ()) -> dict:
    path = _resolve_preset_path(preset)
    if str(path) in seen:
        raise ConfigError(f"preset inheritance cycle: {' -> '.join(seen + (str(path),))}")
    with open(path, "rb") as f:
        try:
            tree = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    base = tree.pop("base", None)
    tree.setdefault("name", path.stem)
    if base is not None:
        parent = _preset_tree(base, seen + (str(path),))
        parent.pop("name", None)
        tree = _merge(parent, tree)
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.mmdit.num_layers=18"`` -> ``("model.mmdit.num_layers", 18)``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        cfg = _apply(cfg, _nest(key, value))
    return cfg


def load_config(preset: str | Path = "tiny", overrides: Iterable[str] = ()) -> Config:
    """Load a preset (name in ``configs/`` or a path) and apply dotted overrides."""
    cfg = _apply(Config(), _preset_tree(preset))
    return apply_overrides(cfg, overrides)


def to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)
    if isinstance(getattr(cfg, "stages", None), StageSettings):
        out["stages"] = cfg.stages.to_dict()
    return out


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_dict` (e.g. the config stored next to a run or inside a checkpoint)."""
    return _apply(Config(), tree, strict_stages=False)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
    return from_dict(json.loads(text))
