"""Training stages: the :class:`Stage` protocol, the stage registry and the ``toy`` stand-in stage.

A stage is everything that differs between training jobs: which models train, which stay frozen, the loss,
the batch it consumes and where that batch comes from. The engine (``train.state``, ``train.step``,
``train.loop``, ``train.plan``) is shared. Examples of how stages map onto the protocol:

* flow matching: ``build_trainable -> {"mmdit": MMDiT}``, ``build_frozen -> {}`` (text/VAE features are
  pre-extracted records), ``loss`` = pyramidal flow-matching loss;
* DMD: ``build_trainable -> {"generator": MMDiT, "fake_score": MMDiT}``, ``build_frozen -> {"real_score":
  MMDiT}``, ``loss`` returns a dict ``{"generator": L_g, "fake_score": L_f}`` so each trained model gets the
  gradient of its own loss; ``load_weights`` fills all three from the teacher checkpoint.

Stages are listed in ``train/registry.py`` (name, module path, one-line help; out-of-tree stages use
``@register_stage("name", settings=...)``); ``get_stage`` also accepts ``"package.module:Factory"`` directly
and, for an unregistered ``name``, imports ``train.<name>`` (which may register itself on import). A stage
declares its roles and updates as ``train.roles`` describes (or, the older form, ``build_trainable`` /
``build_frozen``), and its typed settings as the class attribute ``settings_class`` (a frozen dataclass,
read from ``cfg.stages.<name>``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.config.train_schema import OptimConfig
from neodragon_jax.layers.core import RMSNorm, as_dtype, dense
from neodragon_jax.sharding import constrain
from train import registry
from train.registry import NoSettings  # noqa: F401 - re-exported

Batch = Mapping[str, Any]


@runtime_checkable
class Stage(Protocol):
    """What a training stage provides to the generic engine.

    Required: ``name``, ``build_trainable``, ``build_frozen``, ``loss``, ``example_batch``,
    ``batch_logical_axes``, ``make_example``, ``num_examples``. Optional hooks (the engine uses defaults when
    a stage lacks them): ``tokens_per_example(cfg) -> int`` (default: 0, no tokens/s),
    ``load_weights(cfg, name, abstract_state) -> pure dict | None`` (pretrained weights for a trained or
    frozen model as host arrays; default: keep the random init), ``optim_config(cfg, name) -> OptimConfig``
    (per-model optimiser; default ``cfg.optim``), ``trainable_mask(cfg, name, abstract_params) -> pure bool
    tree | None`` (train only the True leaves of a trained model; the rest get zero updates and no optimizer
    state; default: every leaf trains).
    """

    name: str

    def build_trainable(self, cfg: Config, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        """The models whose ``nnx.Param`` are trained, checkpointed and donated each step."""
        ...

    def build_frozen(self, cfg: Config, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        """Models used in the loss but never updated or checkpointed (teachers, frozen encoders)."""
        ...

    def loss(
        self,
        trainable: dict[str, nnx.Module],
        frozen: dict[str, nnx.Module],
        batch: Batch,
        rng: jax.Array,
    ) -> tuple[jax.Array | dict[str, jax.Array], dict[str, jax.Array]]:
        """Return ``(loss, metrics)``: a float32 scalar (all trained models follow its gradient) or a dict
        ``{model name: scalar}`` (each trained model follows its own entry); ``metrics`` are scalars.

        Must be a pure function of its arguments (use ``rng``, not module-held RNG state): it runs inside
        ``jit``, ``scan`` (micro-batches) and ``vjp``.
        """
        ...

    def example_batch(self, cfg: Config, global_batch: int) -> Batch:
        """``jax.ShapeDtypeStruct`` tree of one global batch (shapes of what the loss receives)."""
        ...

    def batch_logical_axes(self, cfg: Config) -> Batch:
        """Logical axes per batch leaf (same tree as :meth:`example_batch`), e.g. ``("batch", "length", None)``."""
        ...

    def num_examples(self, cfg: Config) -> int:
        """Size of the stage's synthetic dataset (``data.source='synthetic'``)."""
        ...

    def make_example(self, cfg: Config, index: int) -> dict[str, np.ndarray]:
        """Synthetic example ``index`` (deterministic in ``index`` and ``cfg.data.seed``); no batch axis."""
        ...


def register_stage(name: str, factory: Callable[[Config], Stage] | str | None = None, *, settings: type | None = None,
                   help: str = "", plan_only: bool = False):
    """Register ``factory(cfg) -> Stage`` under ``name`` (usable as a decorator, or with a lazy
    ``"package.module:Factory"`` path). The stages of this repository are listed in ``train/registry.py``
    instead, so ``neodragon train --help`` names them without importing them."""

    def add(f):
        old = registry.get(name)
        registry.add(registry.StageEntry(name, f, help or (old.help if old else ""),
                                         plan_only or (old.plan_only if old else False), settings))
        return f

    return add(factory) if factory is not None else add


def available_stages(*, trainable_only: bool = False) -> list[str]:
    return registry.names(trainable_only=trainable_only)


def stage_settings(cfg: Config, name: str):
    """``cfg.stages.<name>``: the stage's typed settings (its class defaults unless set)."""
    return cfg.stages.get_settings(name)


def get_stage(name: str, cfg: Config) -> Stage:
    """Instantiate the stage ``name`` (registered, ``train.<name>`` module, or ``pkg.module:Factory``)."""
    entry = registry.get(name)
    factory = None
    if entry is None and ":" in name:
        factory = registry.load_path(name)
    if entry is None and factory is None:
        try:
            importlib.import_module(f"train.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"train.{name}":
                raise
        entry = registry.get(name)
    if entry is None and factory is None:
        raise ValueError(
            f"unknown training stage {name!r}; registered stages: {available_stages(trainable_only=True)} (a stage "
            f"is its module train/<name>.py plus one StageEntry line in train/registry.py)"
        )
    if factory is None:
        factory = registry.factory_of(entry)
    stage = factory(cfg)
    if entry is not None and entry.plan_only and not getattr(stage, "plan_only", False):
        stage.plan_only = True
    missing = [m for m in ("loss", "example_batch", "batch_logical_axes") if not callable(getattr(stage, m, None))]
    if not hasattr(stage, "roles"):
        missing += [m for m in ("build_trainable", "build_frozen") if not callable(getattr(stage, m, None))]
    if missing:
        raise TypeError(f"stage {name!r} lacks {missing}; see train.stages.Stage")
    return stage


# --- optional-hook defaults, so stages only implement what they need -------------------------------------


def tokens_per_example(stage: Stage, cfg: Config) -> int:
    fn = getattr(stage, "tokens_per_example", None)
    return int(fn(cfg)) if fn is not None else 0


def optim_config(stage: Stage, cfg: Config, name: str) -> OptimConfig:
    fn = getattr(stage, "optim_config", None)
    return fn(cfg, name) if fn is not None else cfg.optim


def load_weights(stage: Stage, cfg: Config, name: str, abstract_state: nnx.State):
    fn = getattr(stage, "load_weights", None)
    return fn(cfg, name, abstract_state) if fn is not None else None


def trainable_mask(stage: Stage, cfg: Config, name: str, abstract_params: nnx.State):
    fn = getattr(stage, "trainable_mask", None)
    return fn(cfg, name, abstract_params) if fn is not None else None


# --- the toy stand-in stage -----------------------------------------------------------------------------


class ToyMLP(nnx.Module):
    """Per-token residual MLP regressor ``x [B, S, D] -> y [B, S, D]`` with logical-axis-annotated weights."""

    def __init__(self, dim: int, hidden: int, depth: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.proj_in = dense(dim, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.blocks = nnx.List(
            [dense(hidden, hidden, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
             for _ in range(depth)]
        )
        self.norm = RMSNorm(hidden, eps=1e-6, param_dtype=param_dtype)
        self.proj_out = dense(hidden, dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.proj_in(x), ("batch", "length", "mlp"))
        for block in self.blocks:
            h = constrain(h + jnp.tanh(block(h)), ("batch", "length", "mlp"))
        return self.proj_out(self.norm(h)).astype(jnp.float32)


class ToyStage:
    """Regression of a fixed random teacher function; the engine's test and benchmark stand-in.

    ``frozen_teacher=True`` adds a frozen copy-shaped ``teacher`` MLP whose output is the target instead of
    the stored ``y`` (exercises the trained/frozen split the DMD stage needs).
    """

    name = "toy"

    def __init__(self, cfg: Config | None = None, *, dim: int = 16, hidden: int = 64, depth: int = 2,
                 seq: int = 8, frozen_teacher: bool = False, num_examples: int | None = None):
        self.dim, self.hidden, self.depth, self.seq = dim, hidden, depth, seq
        self.frozen_teacher = frozen_teacher
        self._num_examples = num_examples

    def _mlp(self, cfg: Config, rngs: nnx.Rngs) -> ToyMLP:
        return ToyMLP(self.dim, self.hidden, self.depth, dtype=as_dtype(cfg.precision.dtype),
                      param_dtype=as_dtype(cfg.precision.param_dtype), rngs=rngs)

    def build_trainable(self, cfg: Config, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        return {"student": self._mlp(cfg, rngs)}

    def build_frozen(self, cfg: Config, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        return {"teacher": self._mlp(cfg, rngs)} if self.frozen_teacher else {}

    def loss(self, trainable, frozen, batch, rng):
        x = batch["x"]
        # A little input noise makes the loss depend on ``rng`` (so RNG plumbing is tested by resume).
        x = x + 0.01 * jax.random.normal(rng, x.shape, x.dtype)
        target = frozen["teacher"](x) if "teacher" in frozen else batch["y"]
        pred = trainable["student"](x)
        err = jnp.square(pred - jax.lax.stop_gradient(target)).astype(jnp.float32)
        loss = jnp.mean(err)
        return loss, {"mae": jnp.mean(jnp.sqrt(err + 1e-12))}

    def example_batch(self, cfg: Config, global_batch: int):
        s = jax.ShapeDtypeStruct((global_batch, self.seq, self.dim), jnp.float32)
        return {"x": s, "y": s}

    def batch_logical_axes(self, cfg: Config):
        return {"x": ("batch", "length", None), "y": ("batch", "length", None)}

    def tokens_per_example(self, cfg: Config) -> int:
        return self.seq

    def num_examples(self, cfg: Config) -> int:
        return self._num_examples or cfg.data.num_synthetic

    def make_example(self, cfg: Config, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([cfg.data.seed, index])
        x = rng.standard_normal((self.seq, self.dim), dtype=np.float32)
        # Fixed "true" function, shared by every example: y = sin(x A) (A from the data seed only).
        a = np.random.default_rng([cfg.data.seed, 1 << 30]).standard_normal((self.dim, self.dim)) / np.sqrt(self.dim)
        return {"x": x, "y": np.sin(x @ a).astype(np.float32)}


# Every stage of this repository (toy included) is listed in train/registry.py.
