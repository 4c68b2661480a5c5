"""Roles and updates: how a stage says which models it trains against which, and in what order.

A stage declares named **roles** (``roles(cfg) -> {name: Role}``). Each role has

* ``build(cfg, rngs) -> nnx.Module`` and its own config: ``overrides`` are dotted config overrides applied on
  top of the run's config for this role only (a 24-block teacher beside an 18-block student:
  ``Frozen(build_mmdit)`` and ``Trained(build_mmdit, overrides=("model.mmdit.num_layers=18",))``);
* an init source (``train.weights`` spec: ``random``, ``official:DIR``, ``run:DIR@STEP[:ema]#SUBTREE``,
  ``npz:FILE``, ``prune:ROLE[kept]``); ``train.role_init=["ROLE=SPEC", ...]`` overrides it per run;
* trained or frozen: trained roles live in the donated, checkpointed state with their own optimiser
  (``optim``: overrides of ``cfg.optim``) and EMA (``ema``: a decay; default the role optimiser's
  ``ema_decay``); frozen roles are loaded once and are constants of the step, never checkpointed;
* ``mask(cfg, abstract_params)``: an optional bool tree, only its True leaves train.

A stage may return an ordered list of **updates** (``updates(cfg) -> [Update, ...]``): each names the
trained roles it moves, a loss ``(models, batch, rng) -> (loss, metrics)`` over every role by name, and how
many times it runs. They run in order inside one jitted step (later updates see the earlier ones' new
weights), each role with its own optimiser state in the one checkpoint. Without ``updates`` the stage has
one update of all trained roles with its ``loss(trainable, frozen, batch, rng)`` (the engine's original
contract: a scalar, or ``{role: loss}`` for each role to follow its own entry).

Stages written before roles existed (``build_trainable`` / ``build_frozen`` returning dicts, and the
``load_weights`` / ``optim_config`` / ``trainable_mask`` hooks) keep working: :func:`plan_roles` reads them as
roles built together, exactly as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from flax import nnx

from neodragon_jax.config import Config, apply_overrides
from neodragon_jax.config.train_schema import OptimConfig
from train.weights import SOURCE_FORMS, WeightSource, WeightSourceError, parse_source


class RoleError(ValueError):
    """A stage's roles or updates do not fit together (unknown role, frozen role updated, ...)."""


@dataclasses.dataclass(frozen=True)
class Role:
    """One model of a stage; see the module docstring. Build with :func:`Trained` / :func:`Frozen`."""

    build: Callable[[Config, nnx.Rngs], Any]
    trained: bool = True
    overrides: tuple[str, ...] = ()
    init: str = "random"
    optim: Mapping[str, Any] | OptimConfig | None = None
    ema: float | None = None
    mask: Callable[[Config, nnx.State], Any] | None = None
    # Legacy stages build all their trained (or frozen) models in one call: roles of one ``group`` share
    # that call and its key (``build`` then returns the group's dict), so their initial weights are the
    # ones the stage always had.
    group: str | None = None


def Trained(build, *, overrides: Sequence[str] = (), init: str = "random", optim=None, ema: float | None = None,
            mask=None) -> Role:
    """A role whose parameters train (its own optimiser state and EMA in the checkpoint)."""
    return Role(build, True, tuple(overrides), init, optim, ema, mask)


def Frozen(build, *, overrides: Sequence[str] = (), init: str = "random") -> Role:
    """A role used as a constant of the step (teacher, frozen encoder): loaded once, never checkpointed."""
    return Role(build, False, tuple(overrides), init)


@dataclasses.dataclass(frozen=True)
class Update:
    """``roles`` move by the gradient of ``loss(models, batch, rng)``, ``repeat`` times in a row.

    ``loss`` returns ``(scalar, metrics)`` (every role of the update follows it) or ``({role: scalar},
    metrics)`` (each role follows its own entry). ``name`` prefixes its metrics (default: the roles).
    """

    roles: tuple[str, ...]
    loss: Callable
    repeat: int = 1
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or "+".join(self.roles)


class Models(Mapping[str, nnx.Module]):
    """The modules of every role by name (``m["teacher"]`` or ``m.teacher``) as an update's loss sees them."""

    def __init__(self, modules: Mapping[str, nnx.Module]):
        self._m = dict(modules)

    def __getitem__(self, name: str) -> nnx.Module:
        try:
            return self._m[name]
        except KeyError:
            raise RoleError(f"no role {name!r}; roles: {', '.join(self._m)}") from None

    def __getattr__(self, name: str) -> nnx.Module:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)


@dataclasses.dataclass(frozen=True)
class PlannedUpdate:
    """An update resolved against the roles: ``fn(trainable, frozen, batch, rng)`` in the engine's form."""

    label: str
    roles: tuple[str, ...]
    fn: Callable
    repeat: int


@dataclasses.dataclass(frozen=True)
class RolePlan:
    roles: dict[str, Role]          # declaration order
    configs: dict[str, Config]      # each role's config (run config + its overrides)
    inits: dict[str, WeightSource]  # each role's init source (after train.role_init)
    updates: tuple[PlannedUpdate, ...]

    @property
    def trained(self) -> list[str]:
        return [n for n, r in self.roles.items() if r.trained]

    @property
    def frozen(self) -> list[str]:
        return [n for n, r in self.roles.items() if not r.trained]

    def applications(self, name: str) -> int:
        """How many optimiser updates role ``name`` gets per train step."""
        return sum(u.repeat for u in self.updates if name in u.roles)


def role_config(cfg: Config, role: Role) -> Config:
    return apply_overrides(cfg, role.overrides) if role.overrides else cfg


def _legacy_roles(stage, cfg: Config) -> dict[str, Role]:
    """Roles of a stage written as ``build_trainable`` / ``build_frozen`` (and the optional hooks)."""
    roles = {}
    for trained, builder in ((True, stage.build_trainable), (False, stage.build_frozen)):
        names = list(nnx.eval_shape(lambda b=builder: b(cfg, nnx.Rngs(0))))
        for name in names:
            roles[name] = Role(builder, trained, group="trainable" if trained else "frozen")
    return roles


def role_overrides(cfg: Config, roles: Mapping[str, Role]) -> dict[str, WeightSource]:
    """Each role's init source, with ``train.role_init`` entries ``ROLE=SPEC`` applied (checked)."""
    out = {}
    for name, role in roles.items():
        try:
            out[name] = parse_source(role.init)
        except WeightSourceError as e:
            raise RoleError(f"role {name!r}: {e}") from None
    for entry in cfg.train.role_init:
        name, sep, spec = str(entry).partition("=")
        if not sep:
            raise RoleError(f"train.role_init entry {entry!r} must look like ROLE=SOURCE "
                            f"(sources: {', '.join(SOURCE_FORMS)})")
        name = name.strip()
        if name not in roles:
            raise RoleError(f"train.role_init names unknown role {name!r}; this stage's roles: {', '.join(roles)}")
        try:
            out[name] = parse_source(spec)
        except WeightSourceError as e:
            raise RoleError(f"train.role_init {name}: {e}") from None
    for name, src in out.items():
        if src.kind == "prune":
            order = list(roles)
            if src.role not in roles:
                raise RoleError(f"role {name!r} is initialised as {src} but there is no role {src.role!r}; "
                                f"roles: {', '.join(roles)}")
            if order.index(src.role) >= order.index(name):
                raise RoleError(f"role {name!r} prunes role {src.role!r}, which must be declared before it")
    return out


def plan_roles(stage, cfg: Config) -> RolePlan:
    """The stage's roles (declared, or read from a legacy stage), their configs, inits and updates."""
    if hasattr(stage, "roles"):
        roles = stage.roles(cfg) if callable(stage.roles) else stage.roles
        roles = dict(roles)
        bad = [n for n, r in roles.items() if not isinstance(r, Role)]
        if bad:
            raise RoleError(f"stage {stage.name!r}: roles {bad} are not Role objects (use Trained(...) / Frozen(...))")
    else:
        roles = _legacy_roles(stage, cfg)
    if not any(r.trained for r in roles.values()):
        raise ValueError(f"stage {stage.name!r} trains no model: it declares no trained role")
    configs = {n: role_config(cfg, r) for n, r in roles.items()}
    inits = role_overrides(cfg, roles)

    trained = [n for n, r in roles.items() if r.trained]
    declared = stage.updates(cfg) if callable(getattr(stage, "updates", None)) else None
    if declared is None:
        # Looked up at each call, not bound now: code may swap a stage's loss after building the setup.
        updates = (PlannedUpdate("+".join(trained), tuple(trained), lambda *a: stage.loss(*a), 1),)
    else:
        updates = []
        for u in declared:
            if not isinstance(u, Update):
                raise RoleError(f"stage {stage.name!r}: updates must be Update objects, got {type(u).__name__}")
            for n in u.roles:
                if n not in roles:
                    raise RoleError(f"stage {stage.name!r}: update {u.label!r} names unknown role {n!r}; "
                                    f"roles: {', '.join(roles)}")
                if not roles[n].trained:
                    raise RoleError(f"stage {stage.name!r}: update {u.label!r} moves role {n!r}, which is frozen")
            if not u.roles or u.repeat < 1:
                raise RoleError(f"stage {stage.name!r}: update {u.label!r} needs at least one role and repeat >= 1")

            def fn(trainable, frozen, batch, rng, _loss=u.loss):
                return _loss(Models({**trainable, **frozen}), batch, rng)

            updates.append(PlannedUpdate(u.label, tuple(u.roles), fn, int(u.repeat)))
        labels = [u.label for u in updates]
        if len(set(labels)) != len(labels):
            raise RoleError(f"stage {stage.name!r}: update names must differ, got {labels}")
        idle = [n for n in trained if not any(n in u.roles for u in updates)]
        if idle:
            raise RoleError(f"stage {stage.name!r}: trained roles {idle} are in no update (make them Frozen?)")
        updates = tuple(updates)
    return RolePlan(roles, configs, inits, updates)


def build_modules(plan: RolePlan, names: Sequence[str], key: jax.Array) -> dict[str, Any]:
    """Build the modules of ``names`` (one group: all trained or all frozen roles) from ``key``.

    The first role draws from ``key`` itself and role ``i`` from ``fold_in(key, i)``: a one-model stage gets
    exactly the weights it had before roles existed. Roles of a legacy ``group`` share one builder call.
    """
    out: dict[str, Any] = {}
    groups: dict[str, dict] = {}
    for i, name in enumerate(names):
        role = plan.roles[name]
        if role.group is not None:
            if role.group not in groups:
                groups[role.group] = role.build(plan.configs[name], nnx.Rngs(key))
            out[name] = groups[role.group][name]
        else:
            k = key if i == 0 else jax.random.fold_in(key, i)
            out[name] = role.build(plan.configs[name], nnx.Rngs(k))
    return out


class RoleStage:
    """Base of stages that declare roles: ``build_trainable`` / ``build_frozen`` are derived from them (for
    code that builds a stage's models directly, e.g. tests and benchmarks)."""

    name = "role_stage"

    def roles(self, cfg: Config) -> dict[str, Role]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _build(self, cfg: Config, rngs: nnx.Rngs, trained: bool) -> dict[str, nnx.Module]:
        return {n: r.build(role_config(cfg, r), rngs) for n, r in self.roles(cfg).items() if r.trained == trained}

    def build_trainable(self, cfg: Config, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        return self._build(cfg, rngs, True)

    def build_frozen(self, cfg: Config, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        return self._build(cfg, rngs, False)
