"""Named rule sets mapping logical axis names to mesh axes, and their resolution to ``PartitionSpec``.

Parameters carry logical axes as the variable metadata ``logical_axes`` (``neodragon_jax.layers.core``);
activations name theirs at :func:`~neodragon_jax.sharding.constraints.constrain` calls. A rule set lists
``(logical name, mesh axes)`` pairs in priority order (as MaxText's ``logical_axis_rules``): the first rule
that can claim a dimension does, a mesh axis is used at most once per tensor, and a dimension the mesh axes
do not divide stays replicated (a smaller prefix of a multi-axis rule is tried first). Unannotated tensors
(or ones whose annotations shard nothing) above ``min_shard_elements`` fall back to their largest dimension
divisible by the rule set's ``fallback`` axes, so large convs or stray parameters never stay replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from neodragon_jax.layers.core import LOGICAL_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical names used for activations (parameters use the weight vocabulary of layers/core.py).
ACTIVATION_AXES = ("batch", "length", "frames", "height", "width", "embed", "heads", "mlp", "vocab", "channels")


@dataclass(frozen=True)
class RuleSet:
    """How one parallelism strategy places parameters and activations on the ``data/fsdp/tensor`` mesh."""

    name: str
    params: Rules
    activations: Rules
    fallback: tuple[str, ...] = ()
    # (regex on the dotted parameter path, logical axes) for parameters without ``logical_axes`` metadata.
    overrides: tuple[tuple[str, tuple[str | None, ...]], ...] = ()

    def with_overrides(self, *pairs: tuple[str, Sequence[str | None]]) -> "RuleSet":
        return dataclasses.replace(self, overrides=self.overrides + tuple((p, tuple(a)) for p, a in pairs))


_BATCH_ALL = (("batch", ("data", "fsdp", "tensor")),)

RULE_SETS: dict[str, RuleSet] = {
    # Pure data parallelism: every device holds every weight; the batch spans all devices.
    "dp": RuleSet("dp", params=(), activations=_BATCH_ALL),
    # ZeRO-3 style: each weight is split along one dimension over `fsdp` (model width first), gathered
    # per layer in the forward/backward; the batch spans all devices.
    "fsdp": RuleSet(
        "fsdp",
        params=(
            ("embed", "fsdp"),
            ("mlp", "fsdp"),
            ("heads", "fsdp"),
            ("vocab", "fsdp"),
            ("conv_out", "fsdp"),
            ("conv_in", "fsdp"),
        ),
        activations=_BATCH_ALL,
        fallback=("fsdp",),
    ),
    # FSDP plus sequence parallelism for stage columns smaller than the device count (2 examples per device
    # with the 1:2:1 pyramid columns leaves the finest column half an example per device): the batch takes
    # what it can of data x fsdp x tensor, the token axis ("length") then takes fsdp (or data) where it
    # divides, so the MMDiT's token-wise work is split instead of replicated; attention then runs with its
    # heads split over the axes the batch left free (all-to-all in between, as DeepSpeed-Ulysses). Weights as
    # `fsdp`. Where the batch covers the mesh, identical to `fsdp`.
    "fsdp_sp": RuleSet(
        "fsdp_sp",
        params=(
            ("embed", "fsdp"),
            ("mlp", "fsdp"),
            ("heads", "fsdp"),
            ("vocab", "fsdp"),
            ("conv_out", "fsdp"),
            ("conv_in", "fsdp"),
        ),
        activations=_BATCH_ALL + (("length", ("fsdp", "data")),),
        fallback=("fsdp",),
    ),
    # Megatron tensor parallelism on `tensor` (attention heads / MLP hidden / vocab / conv outputs) with
    # FSDP on the model width; the batch spans `data` x `fsdp`.
    "fsdp_tp": RuleSet(
        "fsdp_tp",
        params=(
            ("heads", "tensor"),
            ("mlp", "tensor"),
            ("vocab", "tensor"),
            ("conv_out", "tensor"),
            ("embed", "fsdp"),
            ("conv_in", "fsdp"),
            ("mlp", "fsdp"),
            ("heads", "fsdp"),
            ("conv_out", "fsdp"),
        ),
        activations=(("batch", ("data", "fsdp")), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")),
        fallback=("fsdp",),
    ),
}


def get_rules(name: str | RuleSet) -> RuleSet:
    if isinstance(name, RuleSet):
        return name
    try:
        return RULE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown sharding rule set {name!r}; expected one of {sorted(RULE_SETS)}") from None


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _spec_entry(axes: tuple[str, ...]) -> MeshAxes:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _claim(dim: int, axes: tuple[str, ...], mesh_shape: Mapping[str, int], used: set[str]) -> tuple[str, ...]:
    """The longest prefix of ``axes`` (unused, size > 1) whose product divides ``dim``."""
    axes = tuple(a for a in axes if a in mesh_shape and mesh_shape[a] > 1 and a not in used)
    while axes and dim % math.prod(mesh_shape[a] for a in axes):
        axes = axes[:-1]
    return axes


def resolve_spec(
    shape: Sequence[int],
    logical_axes: Sequence[str | None] | None,
    rules: Rules,
    mesh_shape: Mapping[str, int],
    *,
    fallback: tuple[str, ...] = (),
    min_shard_elements: int | None = None,
    where: str = "tensor",
) -> P:
    """``PartitionSpec`` for one tensor of ``shape`` with ``logical_axes`` under ``rules``."""
    shape = tuple(int(s) for s in shape)
    if logical_axes is not None and len(logical_axes) != len(shape):
        raise ValueError(
            f"{where}: logical axes {tuple(logical_axes)} have {len(logical_axes)} names but the shape "
            f"{shape} has {len(shape)} dims; annotate one name (or None) per dimension"
        )
    spec: list[tuple[str, ...]] = [()] * len(shape)
    used: set[str] = set()
    if logical_axes is not None:
        for logical, mesh_axes in rules:
            for d, name in enumerate(logical_axes):
                if name != logical or spec[d]:
                    continue
                claimed = _claim(shape[d], _axes_tuple(mesh_axes), mesh_shape, used)
                if claimed:
                    spec[d] = claimed
                    used.update(claimed)
    if (
        not used
        and fallback
        and min_shard_elements is not None
        and math.prod(shape) >= min_shard_elements
    ):
        for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
            claimed = _claim(shape[d], fallback, mesh_shape, used)
            if claimed:
                spec[d] = claimed
                break
    return P(*(_spec_entry(s) for s in spec))


def _mesh_shape(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def variable_logical_axes(var: nnx.Variable, path: str, rules: RuleSet) -> tuple[str | None, ...] | None:
    axes = var.get_metadata().get(LOGICAL_AXES)
    if axes is not None:
        return tuple(axes)
    for pattern, override in rules.overrides:
        if re.search(pattern, path):
            return override
    return None


def param_specs(abstract_state: nnx.State, rules: str | RuleSet, mesh, *, min_shard_elements: int = 1 << 16):
    """Pure-dict tree (as ``nnx.to_pure_dict``) of ``PartitionSpec`` for every variable of ``abstract_state``."""
    rules = get_rules(rules)
    mesh_shape = _mesh_shape(mesh)
    flat = {}
    for path, var in nnx.to_flat_state(abstract_state):
        where = ".".join(map(str, path))
        value = var.get_value() if hasattr(var, "get_value") else var[...]
        axes = variable_logical_axes(var, where, rules)
        flat[tuple(path)] = resolve_spec(
            value.shape,
            axes,
            rules.params,
            mesh_shape,
            fallback=rules.fallback,
            min_shard_elements=min_shard_elements,
            where=where,
        )
    return traverse_util.unflatten_dict(flat)


def param_shardings(abstract_state: nnx.State, rules: str | RuleSet, mesh, *, min_shard_elements: int = 1 << 16):
    """Like :func:`param_specs` but ``NamedSharding(mesh, spec)`` leaves, ready for ``jit`` / orbax."""
    specs = param_specs(abstract_state, rules, mesh, min_shard_elements=min_shard_elements)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def activation_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], rules: str | RuleSet, mesh_shape: Mapping[str, int]
) -> P:
    """``PartitionSpec`` of an activation (or batch input) with ``logical_axes``; undivisible dims replicate."""
    return resolve_spec(shape, logical_axes, get_rules(rules).activations, mesh_shape, where="activation")


def batch_shardings(example_batch: Any, batch_axes: Any, rules: str | RuleSet, mesh) -> Any:
    """``NamedSharding`` per batch leaf from the stage's ``batch_logical_axes`` (same tree as the batch)."""
    mesh_shape = _mesh_shape(mesh)

    def one(leaf, axes):
        return NamedSharding(mesh, activation_spec(axes, leaf.shape, rules, mesh_shape))

    return jax.tree.map(one, example_batch, batch_axes)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
