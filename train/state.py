"""Sharded train state: built abstractly, sharded by logical axes, initialised straight into its shardings.

Per the Flax NNX guidance the modules are split once (``nnx.split(module, nnx.Param, ...)``) into a static
``GraphDef`` and state; the train step is then a pure function over plain pytrees:

``state = {"step": int32[], "params": {model: pure dict}, "model_state": {model: pure dict},
"opt_state": {model: optax state}, "ema": {model: pure dict} | {}}``

Only trained models are in ``state`` (donated each step, checkpointed). Frozen models (teachers, frozen
encoders) live in a separate ``frozen = {model: {"params": ..., "model_state": ...}}`` tree that is passed to
the step without donation and never written to checkpoints.

``model_state`` holds a module's non-``Param`` variables (e.g. counters); the step treats them as constants,
so stages must take randomness from the ``rng`` argument of ``Stage.loss``, not from ``nnx.Rngs`` held in the
module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from neodragon_jax.config import Config
from neodragon_jax.sharding import get_rules, param_shardings
from train import stages as stages_lib
from train.optim import decay_mask, freeze_unmasked, make_optimizer


@dataclasses.dataclass
class ModelSpec:
    """One model's static graph and abstract (``ShapeDtypeStruct``) state with its variable metadata."""

    name: str
    graphdef: Any
    params: nnx.State
    model_state: nnx.State

    def _treedef(self, which: str):
        return jax.tree.structure(getattr(self, which))

    def to_module(self, params_pure: Any, model_state_pure: Any) -> nnx.Module:
        """Rebuild the module from pure dicts (inside ``jit``; no copies)."""
        p = jax.tree.unflatten(self._treedef("params"), jax.tree.leaves(params_pure))
        r = jax.tree.unflatten(self._treedef("model_state"), jax.tree.leaves(model_state_pure))
        return nnx.merge(self.graphdef, p, r)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))


def split_module(module: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return graphdef, params, rest


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _abstract_models(builder, cfg: Config) -> dict[str, ModelSpec]:
    modules = nnx.eval_shape(lambda: builder(cfg, nnx.Rngs(0)))
    if not isinstance(modules, dict):
        raise TypeError(f"{builder} must return a dict of name -> nnx.Module, got {type(modules).__name__}")
    specs = {}
    for name, module in modules.items():
        graphdef, params, rest = split_module(module)
        specs[name] = ModelSpec(name, graphdef, params, rest)
        # Pure dicts and nnx.State must flatten in the same order: to_module relies on it.
        flat_paths = [tuple(k) for k, _ in nnx.to_flat_state(params)]
        pure_paths = [
            tuple(getattr(k, "key", k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(_pure(params))[0]
        ]
        if flat_paths != pure_paths:
            raise RuntimeError(f"model {name!r}: parameter order of nnx.State and its pure dict differ")
    return specs


def _with_sharding(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass
class TrainSetup:
    """Everything static about a run: models, optimisers, shardings and abstract state."""

    stage: Any
    cfg: Config
    mesh: Any
    rules: Any
    trainable: dict[str, ModelSpec]
    frozen: dict[str, ModelSpec]
    txs: dict[str, optax.GradientTransformation]
    schedules: dict[str, optax.Schedule]
    state_shardings: Any
    frozen_shardings: Any
    abstract_state: Any  # ShapeDtypeStruct tree with shardings (restore target / AOT compile argument)
    abstract_frozen: Any

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def modules(self, params: dict, model_state: dict, which: str = "trainable") -> dict[str, nnx.Module]:
        specs = self.trainable if which == "trainable" else self.frozen
        return {n: specs[n].to_module(params[n], model_state[n]) for n in specs}

    def frozen_modules(self, frozen: dict) -> dict[str, nnx.Module]:
        return {n: s.to_module(frozen[n]["params"], frozen[n]["model_state"]) for n, s in self.frozen.items()}

    # -- initialisation ------------------------------------------------------------------------------

    def _init_models(self, builder, specs: dict[str, ModelSpec], key: jax.Array):
        modules = builder(self.cfg, nnx.Rngs(key))
        out = {}
        for name in specs:
            _, params, rest = split_module(modules[name])
            out[name] = (_pure(params), _pure(rest))
        return out

    def _init_state_fn(self, key: jax.Array) -> dict:
        models = self._init_models(self.stage.build_trainable, self.trainable, key)
        params = {n: p for n, (p, _) in models.items()}
        return self._state_from_params(params, {n: r for n, (_, r) in models.items()})

    def _state_from_params(self, params: dict, model_state: dict) -> dict:
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": model_state,
            "opt_state": {n: self.txs[n].init(params[n]) for n in self.trainable},
            "ema": {n: jax.tree.map(lambda x: x.astype(jnp.float32), params[n]) for n in self.trainable}
            if self.cfg.optim.ema_decay > 0
            else {},
        }

    def init_state(self, key: jax.Array | None = None) -> dict:
        """Random init (or the stage's pretrained weights) placed directly into ``state_shardings``."""
        key = jax.random.key(self.cfg.train.seed) if key is None else key
        with jax.set_mesh(self.mesh):
            state = jax.jit(self._init_state_fn, out_shardings=self.state_shardings)(key)
        loaded = {n: stages_lib.load_weights(self.stage, self.cfg, n, s.params) for n, s in self.trainable.items()}
        if any(v is not None for v in loaded.values()):
            params = {
                n: (self._place(loaded[n], self.state_shardings["params"][n]) if loaded[n] is not None
                    else state["params"][n])
                for n in self.trainable
            }
            with jax.set_mesh(self.mesh):
                state = jax.jit(self._state_from_params, out_shardings=self.state_shardings)(
                    params, state["model_state"]
                )
        return state

    def init_frozen(self, key: jax.Array | None = None) -> dict:
        """Frozen models, sharded like trained ones; never donated, never checkpointed."""
        if not self.frozen:
            return {}
        key = jax.random.key(self.cfg.train.seed + 1) if key is None else key

        def fn(k):
            models = self._init_models(self.stage.build_frozen, self.frozen, k)
            return {n: {"params": p, "model_state": r} for n, (p, r) in models.items()}

        with jax.set_mesh(self.mesh):
            frozen = jax.jit(fn, out_shardings=self.frozen_shardings)(key)
        for n, spec in self.frozen.items():
            weights = stages_lib.load_weights(self.stage, self.cfg, n, spec.params)
            if weights is not None:
                frozen[n]["params"] = self._place(weights, self.frozen_shardings[n]["params"])
        return frozen

    @staticmethod
    def _place(host_tree: Any, shardings: Any) -> Any:
        # device_put of a host array into a NamedSharding copies only each device's shard.
        return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), host_tree, shardings)


def _opt_shardings(tx, abstract_opt_state, param_sh, replicated):
    """Param-shaped optimizer leaves (moments) follow the param sharding; the rest (``count``) replicate.

    Frozen leaves of a masked / multi-transform optimizer hold an empty ``MaskedNode`` that stays as is.
    """
    masked = optax.transforms.MaskedNode
    return optax.tree_map_params(
        tx,
        lambda x, s: x if isinstance(x, masked) else s,
        abstract_opt_state,
        param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, jax.Array, masked)),
    )


def build_setup(stage, cfg: Config, mesh, *, total_steps: int | None = None) -> TrainSetup:
    """Abstract models -> shardings from logical axes + ``cfg.mesh.rules`` -> abstract sharded state."""
    rules = get_rules(cfg.mesh.rules)
    trainable = _abstract_models(stage.build_trainable, cfg)
    frozen = _abstract_models(stage.build_frozen, cfg)
    if not trainable:
        raise ValueError(f"stage {stage.name!r} trains no model: build_trainable returned an empty dict")
    overlap = sorted(set(trainable) & set(frozen))
    if overlap:
        raise ValueError(f"stage {stage.name!r}: models {overlap} are both trained and frozen")
    total_steps = total_steps or cfg.train.steps
    replicated = NamedSharding(mesh, P())
    min_el = cfg.mesh.min_shard_elements

    txs, schedules = {}, {}
    p_sh, r_sh = {}, {}
    for name, spec in trainable.items():
        ocfg = stages_lib.optim_config(stage, cfg, name)
        txs[name], schedules[name] = make_optimizer(ocfg, total_steps, decay_mask(spec.params))
        train_mask = stages_lib.trainable_mask(stage, cfg, name, spec.params)
        if train_mask is not None:
            txs[name] = freeze_unmasked(txs[name], train_mask)
        p_sh[name] = param_shardings(spec.params, rules, mesh, min_shard_elements=min_el)
        r_sh[name] = param_shardings(spec.model_state, rules, mesh, min_shard_elements=min_el)

    abstract_params = {n: _pure(s.params) for n, s in trainable.items()}
    opt_sh = {}
    for name in trainable:
        abstract_opt = jax.eval_shape(txs[name].init, abstract_params[name])
        opt_sh[name] = _opt_shardings(txs[name], abstract_opt, p_sh[name], replicated)
    state_sh = {
        "step": replicated,
        "params": p_sh,
        "model_state": r_sh,
        "opt_state": opt_sh,
        "ema": p_sh if cfg.optim.ema_decay > 0 else {},
    }
    frozen_sh = {
        n: {
            "params": param_shardings(s.params, rules, mesh, min_shard_elements=min_el),
            "model_state": param_shardings(s.model_state, rules, mesh, min_shard_elements=min_el),
        }
        for n, s in frozen.items()
    }
    setup = TrainSetup(stage, cfg, mesh, rules, trainable, frozen, txs, schedules, state_sh, frozen_sh, None, None)
    abstract_state = jax.eval_shape(setup._init_state_fn, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    setup.abstract_state = _with_sharding(abstract_state, state_sh)
    abstract_frozen = {
        n: {"params": _pure(s.params), "model_state": _pure(s.model_state)} for n, s in frozen.items()
    }
    setup.abstract_frozen = _with_sharding(abstract_frozen, frozen_sh)
    return setup
