"""``cfg.stages.<name>``: the typed settings of each training stage, registered by the stage itself.

A stage's settings are a frozen dataclass (its loss weights, crop sizes, update ratios, ...). The schema
cannot list them statically: they belong to the stage modules in ``train/``, which this package never
imports. So ``Config.stages`` is a :class:`StageSettings` container and this module keeps a registry of
``stage name -> settings class`` that ``train.stages`` fills (a class, or a zero-argument function that
imports the stage module when the settings are first needed).

Dotted overrides reach the fields like any other section (``--set stages.vae.crop=32``); an unknown stage
or field is refused with the valid ones. ``cfg.stages.vae`` is the stored settings or, if none were set,
the class defaults. Only stored entries are serialised; ``train.loop.run`` stores the running stage's
settings before it writes ``config.json`` and the checkpoint, so a run records every field it used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

_REGISTRY: dict[str, type | Callable[[], type]] = {}
_RESOLVED: dict[str, type] = {}


def register_settings(stage: str, settings: type | Callable[[], type]) -> None:
    """Register the settings dataclass of ``stage`` (or a function returning it, resolved on first use)."""
    _REGISTRY[stage] = settings
    _RESOLVED.pop(stage, None)
    if isinstance(settings, type):
        if not dataclasses.is_dataclass(settings):
            raise TypeError(f"settings of stage {stage!r} must be a dataclass, got {settings!r}")
        _RESOLVED[stage] = settings


def registered_stages() -> list[str]:
    return sorted(_REGISTRY)


def settings_class(stage: str) -> type:
    """The settings dataclass of ``stage``; a ``KeyError`` naming the registered stages otherwise."""
    if stage not in _RESOLVED:
        if stage not in _REGISTRY:
            raise KeyError(f"no settings registered for stage {stage!r}; stages with settings: "
                           f"{', '.join(registered_stages()) or '(none: import train.stages first)'}")
        cls = _REGISTRY[stage]()  # type: ignore[operator]
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"settings of stage {stage!r} must be a dataclass, got {cls!r}")
        _RESOLVED[stage] = cls
    return _RESOLVED[stage]


class StageSettings(Mapping[str, Any]):
    """Immutable ``{stage name: settings dataclass}``; attribute access falls back to the class defaults.

    Equality and hashing ignore entries equal to their class defaults, so a config that stored a stage's
    default settings equals one that never mentioned the stage (configs are compared and used as keys).
    """

    __slots__ = ("_items", "_raw")

    def __init__(self, items: Mapping[str, Any] | None = None, raw: Mapping[str, Mapping] | None = None):
        object.__setattr__(self, "_items", dict(items or {}))
        # Entries read back from a record (config.json) for stages whose module is not registered in this
        # process: kept as plain dicts, typed when the stage registers and they are read.
        object.__setattr__(self, "_raw", {k: dict(v) for k, v in (raw or {}).items()})

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    # -- mapping --------------------------------------------------------------------------------------------
    def __getitem__(self, stage: str):
        return self.get_settings(stage)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._items) | set(self._raw)))

    def __len__(self) -> int:
        return len(set(self._items) | set(self._raw))

    def __getattr__(self, stage: str):
        if stage.startswith("_"):
            raise AttributeError(stage)
        try:
            return self.get_settings(stage)
        except KeyError as e:
            raise AttributeError(str(e)) from None

    def get_settings(self, stage: str):
        if stage in self._items:
            return self._items[stage]
        cls = settings_class(stage)
        if stage in self._raw:
            from neodragon_jax.config.loader import _apply

            return _apply(cls(), self._raw[stage], f"stages.{stage}.")
        return cls()

    def with_settings(self, stage: str, settings: Any) -> "StageSettings":
        items = dict(self._items)
        items[stage] = settings
        raw = {k: v for k, v in self._raw.items() if k != stage}
        return StageSettings(items, raw)

    # -- value semantics --------------------------------------------------------------------------------------
    def _canonical(self) -> tuple:
        out = {k: v for k, v in self._items.items() if v != type(v)()}
        out.update({k: tuple(sorted((f, repr(x)) for f, x in v.items())) for k, v in self._raw.items() if v})
        return tuple(sorted((k, v if isinstance(v, tuple) else (type(v).__qualname__, v)) for k, v in out.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, StageSettings) and self._canonical() == other._canonical()

    def __hash__(self) -> int:
        return hash(self._canonical())

    def __repr__(self) -> str:
        return f"StageSettings({dict(self._items)!r}{', raw=' + repr(self._raw) if self._raw else ''})"

    def __deepcopy__(self, memo):  # immutable: dataclasses.asdict deep-copies non-dataclass fields
        return self

    def to_dict(self) -> dict[str, dict]:
        out = {k: dict(v) for k, v in self._raw.items()}
        out.update({k: dataclasses.asdict(v) for k, v in self._items.items()})
        return out

    def apply(self, updates: Mapping[str, Any], prefix: str = "stages.", *, strict: bool = True) -> "StageSettings":
        """``updates = {stage: {field: value}}`` applied through the config loader's type checks.

        ``strict=False`` (reading a record) keeps the entries of stages not registered in this process as
        plain dicts instead of refusing them.
        """
        from neodragon_jax.config.loader import ConfigError, _apply

        items, raw = dict(self._items), dict(self._raw)
        for stage, fields in updates.items():
            if not isinstance(fields, Mapping):
                raise ConfigError(f"{prefix}{stage} is a section; set its fields, e.g. {prefix}{stage}.<field>=...")
            try:
                cls = settings_class(stage)
            except KeyError:
                if not strict:
                    raw[stage] = {**raw.get(stage, {}), **fields}
                    continue
                raise ConfigError(
                    f"unknown stage {stage!r} in '{prefix}{stage}'; stages with settings: "
                    f"{', '.join(registered_stages()) or '(none registered)'}"
                ) from None
            current = items.get(stage)
            if current is None:
                current = _apply(cls(), raw.pop(stage), f"{prefix}{stage}.") if stage in raw else cls()
            items[stage] = _apply(current, fields, f"{prefix}{stage}.")
        return StageSettings(items, raw)

    def valid_keys(self, prefix: str = "stages.") -> list[str]:
        """Dotted keys of the stages whose settings class is already known (never imports a stage)."""
        from neodragon_jax.config.loader import valid_keys

        return [k for stage in sorted(_RESOLVED) for k in valid_keys(_RESOLVED[stage], f"{prefix}{stage}.")]
