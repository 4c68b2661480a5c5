"""Sharded train state: built abstractly, sharded by logical axes, initialised straight into its shardings.

Per the Flax NNX guidance the modules are split once (``nnx.split(module, nnx.Param, ...)``) into a static
``GraphDef`` and state; the train step is then a pure function over plain pytrees:

``state = {"step": int32[], "params": {role: pure dict}, "model_state": {role: pure dict},
"opt_state": {role: optax state}, "ema": {role: pure dict}}`` (``ema`` holds the roles with an EMA decay).

Only trained roles are in ``state`` (donated each step, checkpointed). Frozen roles (teachers, frozen
encoders) live in a separate ``frozen = {role: {"params": ..., "model_state": ...}}`` tree that is passed to
the step without donation and never written to checkpoints. Each role is built with its own config (the
run's plus the role's overrides), has its own optimiser and EMA decay, and starts from its init source
(``train.roles``, ``train.weights``).

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
from neodragon_jax.config.train_schema import OptimConfig
from neodragon_jax.sharding import get_rules, param_shardings
from train import roles as roles_lib
from train import stages as stages_lib
from train.optim import decay_mask, freeze_unmasked, make_optimizer
from train.weights import WeightSource, flatten, load_weights, merge_into


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works on arrays sharded over several processes (all of them call it)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


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


def abstract_models(plan: roles_lib.RolePlan, names: list[str]) -> dict[str, ModelSpec]:
    modules = nnx.eval_shape(lambda: roles_lib.build_modules(plan, names, jax.random.key(0)))
    specs = {}
    for name in names:
        module = modules[name]
        if not isinstance(module, nnx.Module):
            raise TypeError(f"role {name!r} must build an nnx.Module, got {type(module).__name__}")
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
    """Everything static about a run: roles, optimisers, shardings and abstract state."""

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
    plan: roles_lib.RolePlan | None = None
    ema_decays: dict[str, float] = dataclasses.field(default_factory=dict)  # roles with an EMA

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def updates(self) -> tuple[roles_lib.PlannedUpdate, ...]:
        return self.plan.updates

    def modules(self, params: dict, model_state: dict, which: str = "trainable") -> dict[str, nnx.Module]:
        specs = self.trainable if which == "trainable" else self.frozen
        return {n: specs[n].to_module(params[n], model_state[n]) for n in specs}

    def frozen_modules(self, frozen: dict) -> dict[str, nnx.Module]:
        return {n: s.to_module(frozen[n]["params"], frozen[n]["model_state"]) for n, s in self.frozen.items()}

    # -- initialisation ------------------------------------------------------------------------------

    def _init_models(self, names: list[str], key: jax.Array):
        modules = roles_lib.build_modules(self.plan, names, key)
        out = {}
        for name in names:
            _, params, rest = split_module(modules[name])
            out[name] = (_pure(params), _pure(rest))
        return out

    def _init_state_fn(self, key: jax.Array) -> dict:
        models = self._init_models(list(self.trainable), key)
        params = {n: p for n, (p, _) in models.items()}
        return self._state_from_params(params, {n: r for n, (_, r) in models.items()})

    def _state_from_params(self, params: dict, model_state: dict) -> dict:
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": model_state,
            "opt_state": {n: self.txs[n].init(params[n]) for n in self.trainable},
            "ema": {n: jax.tree.map(lambda x: x.astype(jnp.float32), params[n]) for n in self.ema_decays},
        }

    def _loaded_weights(self, name: str, spec: ModelSpec, roles_host: dict) -> Any:
        """Host pure dict of role ``name``'s init source (None: keep the random init)."""
        src: WeightSource = self.plan.inits[name]
        if src.kind == "random":
            # Legacy stages fill roles through their ``load_weights`` hook.
            return stages_lib.load_weights(self.stage, self.plan.configs[name], name, spec.params)
        target = nnx.merge(spec.graphdef, spec.params, spec.model_state)
        flat = load_weights(src, target, roles=roles_host)
        if src.into:  # a part of the role: the rest keeps its initialisation
            return ("partial", flat)
        return merge_into(_pure(spec.params), flat)

    def _role_host(self, name: str, roles_host: dict, state: dict | None) -> None:
        """Role ``name``'s params as host flat arrays, for roles that prune it."""
        if name in roles_host:
            return
        if name in self.frozen:
            tree = self.init_frozen()[name]["params"]
        else:
            tree = state["params"][name]
        roles_host[name] = {k: np.asarray(v) for k, v in flatten(to_host(tree)).items()}

    def _needed_by_prune(self) -> set[str]:
        return {s.role for s in self.plan.inits.values() if s.kind == "prune"}

    def init_state(self, key: jax.Array | None = None) -> dict:
        """Random init, then each trained role's init source, placed directly into ``state_shardings``."""
        key = jax.random.key(self.cfg.train.seed) if key is None else key
        with jax.set_mesh(self.mesh):
            state = jax.jit(self._init_state_fn, out_shardings=self.state_shardings)(key)
        roles_host: dict = {}
        new_params, changed = dict(state["params"]), False
        for n, spec in self.trainable.items():
            src = self.plan.inits[n]
            if src.kind == "prune":
                self._role_host(src.role, roles_host, {"params": new_params})
            loaded = self._loaded_weights(n, spec, roles_host)
            if loaded is not None:
                if isinstance(loaded, tuple):  # ("partial", flat): merge into this role's random init
                    loaded = merge_into(to_host(new_params[n]), loaded[1])
                new_params[n] = self._place(loaded, self.state_shardings["params"][n], self.abstract_state["params"][n])
                changed = True
        if changed:
            with jax.set_mesh(self.mesh):
                state = jax.jit(self._state_from_params, out_shardings=self.state_shardings)(
                    new_params, state["model_state"]
                )
        return state

    def init_frozen(self, key: jax.Array | None = None) -> dict:
        """Frozen roles, sharded like trained ones; never donated, never checkpointed."""
        if not self.frozen:
            return {}
        default_key = key is None
        if default_key and getattr(self, "_frozen_cache", None) is not None:
            return self._frozen_cache  # a role pruned from a frozen one asked first: build them once
        key = jax.random.key(self.cfg.train.seed + 1) if key is None else key
        names = list(self.frozen)

        def fn(k):
            models = self._init_models(names, k)
            return {n: {"params": p, "model_state": r} for n, (p, r) in models.items()}

        with jax.set_mesh(self.mesh):
            frozen = jax.jit(fn, out_shardings=self.frozen_shardings)(key)
        roles_host: dict = {}
        for n, spec in self.frozen.items():
            src = self.plan.inits[n]
            if src.kind == "prune":
                if src.role in self.frozen:
                    roles_host.setdefault(src.role, {k: np.asarray(v) for k, v in flatten(
                        to_host(frozen[src.role]["params"])).items()})
                else:
                    raise roles_lib.RoleError(f"frozen role {n!r} cannot prune trained role {src.role!r}")
            loaded = self._loaded_weights(n, spec, roles_host)
            if loaded is not None:
                if isinstance(loaded, tuple):
                    loaded = merge_into(to_host(frozen[n]["params"]), loaded[1])
                frozen[n]["params"] = self._place(loaded, self.frozen_shardings[n]["params"],
                                                  self.abstract_frozen[n]["params"])
        if default_key:
            self._frozen_cache = frozen
        return frozen

    @staticmethod
    def _place(host_tree: Any, shardings: Any, abstract: Any = None) -> Any:
        # device_put of a host array into a NamedSharding copies only each device's shard; the values take
        # the parameter's storage dtype (checkpoints may store fp16/bf16, a run float32).
        if abstract is None:
            return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), host_tree, shardings)
        return jax.tree.map(lambda x, s, a: jax.device_put(np.asarray(x).astype(a.dtype), s),
                            host_tree, shardings, abstract)


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
    """Roles -> abstract models -> shardings from logical axes + ``cfg.mesh.rules`` -> abstract sharded state."""
    rules = get_rules(cfg.mesh.rules)
    plan = roles_lib.plan_roles(stage, cfg)
    trainable = abstract_models(plan, plan.trained)
    frozen = abstract_models(plan, plan.frozen)
    total_steps = total_steps or cfg.train.steps
    replicated = NamedSharding(mesh, P())
    min_el = cfg.mesh.min_shard_elements

    txs, schedules, ema_decays = {}, {}, {}
    p_sh, r_sh = {}, {}
    for name, spec in trainable.items():
        role, rcfg = plan.roles[name], plan.configs[name]
        ocfg = stages_lib.optim_config(stage, rcfg, name)
        if isinstance(role.optim, OptimConfig):
            ocfg = role.optim
        elif role.optim:
            ocfg = dataclasses.replace(ocfg, **dict(role.optim))
        decay = float(role.ema if role.ema is not None else ocfg.ema_decay)
        if decay > 0:
            ema_decays[name] = decay
        # A role updated k times a step advances its schedule k times a step.
        txs[name], schedules[name] = make_optimizer(ocfg, total_steps * plan.applications(name),
                                                    decay_mask(spec.params))
        train_mask = role.mask(rcfg, spec.params) if role.mask is not None else stages_lib.trainable_mask(
            stage, rcfg, name, spec.params)
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
        "ema": {n: p_sh[n] for n in ema_decays},
    }
    frozen_sh = {
        n: {
            "params": param_shardings(s.params, rules, mesh, min_shard_elements=min_el),
            "model_state": param_shardings(s.model_state, rules, mesh, min_shard_elements=min_el),
        }
        for n, s in frozen.items()
    }
    setup = TrainSetup(stage, cfg, mesh, rules, trainable, frozen, txs, schedules, state_sh, frozen_sh, None, None,
                       plan, ema_decays)
    abstract_state = jax.eval_shape(setup._init_state_fn, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    setup.abstract_state = _with_sharding(abstract_state, state_sh)
    abstract_frozen = {
        n: {"params": _pure(s.params), "model_state": _pure(s.model_state)} for n, s in frozen.items()
    }
    setup.abstract_frozen = _with_sharding(abstract_frozen, frozen_sh)
    return setup
