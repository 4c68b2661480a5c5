"""Activation sharding constraints that model code may call unconditionally.

``constrain(x, ("batch", "length", "embed"))`` pins an activation's layout at a block boundary when a mesh
(``jax.set_mesh``) and a rule set (:func:`use_rules`) are active, and returns ``x`` unchanged otherwise, so
the same model code runs in unit tests, conversion and single-device inference.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax

from neodragon_jax.sharding.rules import RuleSet, activation_spec, get_rules

_ACTIVE_RULES: contextvars.ContextVar[RuleSet | None] = contextvars.ContextVar("neodragon_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: str | RuleSet) -> Iterator[RuleSet]:
    """Make ``rules`` the rule set :func:`constrain` resolves logical names with (while tracing)."""
    token = _ACTIVE_RULES.set(get_rules(rules))
    try:
        yield _ACTIVE_RULES.get()
    finally:
        _ACTIVE_RULES.reset(token)


@contextlib.contextmanager
def activate(mesh, rules: str | RuleSet) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` plus :func:`use_rules`: the context every sharded trace/compile runs in."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield


def active_rules() -> RuleSet | None:
    return _ACTIVE_RULES.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names; a no-op outside a mesh + rule-set context."""
    rules = _ACTIVE_RULES.get()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(
            f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of shape {x.shape}"
        )
    spec = activation_spec(logical_axes, x.shape, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
