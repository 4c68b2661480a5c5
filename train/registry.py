"""The one table of training stages: name -> where its class lives, a one-line help, whether it trains.

Importing this module imports no JAX (``neodragon train --help`` lists the stages from it at once); a
stage's module is imported when the stage is used or its settings (``cfg.stages.<name>``) are read.
Adding a stage = its module (``train/<technique>.py``: the stage class with its ``settings_class``,
roles, loss or updates, data) + one :class:`StageEntry` line in :data:`STAGES`. Out-of-tree stages register
with ``train.stages.register_stage`` instead.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from neodragon_jax.config.stage_settings import register_settings


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """The settings of a stage that has none (``cfg.stages.<name>`` is then empty)."""


@dataclasses.dataclass(frozen=True)
class StageEntry:
    name: str
    factory: Callable[..., Any] | str  # ``factory(cfg) -> stage`` or "package.module:Attr"
    help: str = ""
    plan_only: bool = False  # a stand-in for `neodragon plan --mesh`, refused by `neodragon train`
    settings: type | None = None  # default: the factory's ``settings_class`` attribute, else NoSettings


#: The stages of this repository (lazy: nothing here imports a stage module).
STAGES = (
    StageEntry("flow", "train.flow_matching:FlowMatchingStage",
               "pyramidal flow matching of the MMDiT on latent + text records"),
    StageEntry("vae", "train.vae:VAEStage", "reconstruction training of the causal video VAE (encoder + decoder)"),
    StageEntry("toy", "train.stages:ToyStage", "the engine's stand-in: an MLP regressing a fixed function"),
    StageEntry("toy_distill", "train.toy_distill:ToyDistill",
               "the smallest stage with roles: a student MLP against a frozen deeper teacher"),
    StageEntry("text-distill", "train.text_distill:TextDistill",
               "prompt-only text-encoder distillation: DistilT5 + ContextAdapter learn the teacher DiT's text tokens"),
    StageEntry("decoder", "train.decoder:DecoderStage",
               "asymmetric decoder distillation: a light decoder learns the frozen VAE encoder's latents"),
    StageEntry("recover-flow", "train.pruning:RecoverFlow",
               "pruning recovery stage 1: the pruned MMDiT trained with pyramidal flow matching"),
    StageEntry("recover-distill", "train.pruning:RecoverDistill",
               "pruning recovery stage 2: per-block feature + flow distillation from the frozen full teacher"),
    StageEntry("dmd", "train.dmd:PyramidalDMD",
               "pyramidal DMD: a one-step-per-stage generator against the frozen teacher's CFG score and a fake score"),
)

_REGISTRY: dict[str, StageEntry] = {}


def load_path(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def factory_of(entry: StageEntry):
    return load_path(entry.factory) if isinstance(entry.factory, str) else entry.factory


def settings_of(entry: StageEntry) -> type:
    if entry.settings is not None:
        return entry.settings
    return getattr(factory_of(entry), "settings_class", None) or NoSettings


def add(entry: StageEntry) -> StageEntry:
    _REGISTRY[entry.name] = entry
    register_settings(entry.name, entry.settings if entry.settings is not None else (lambda e=entry: settings_of(e)))
    return entry


def get(name: str) -> StageEntry | None:
    return _REGISTRY.get(name)


def names(*, trainable_only: bool = False) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if not (trainable_only and e.plan_only))


def describe(*, trainable_only: bool = True) -> str:
    """``name: help`` lines of the registered stages (``neodragon train --help``)."""
    return "; ".join(f"{e.name} ({e.help})" if e.help else e.name
                     for n, e in sorted(_REGISTRY.items()) if not (trainable_only and e.plan_only))


for _entry in STAGES:
    add(_entry)
