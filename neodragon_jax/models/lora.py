"""LoRA: low-rank updates ``W + (alpha / r) A B`` of chosen Linear kernels of a frozen base module.

The :class:`LoRA` module holds only the factors (``a [in, r]``, ``b [r, out]``, ``b`` zero at init so the
adapted model starts as the base); the base module stays a separate, frozen model. :func:`apply_lora` returns
the base with every targeted kernel replaced by its merged value, as a new module (functional: the base is
not changed), so gradients reach the factors through the merged kernels and the forward is the base's own
code. :func:`merge_lora` writes the merged kernels into a module for export.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.layers.core import LOGICAL_AXES, as_dtype

Path = tuple  # a parameter path as nnx flattens it: ('encoder', 'block', 0, ..., 'kernel')


def lora_targets(base: nnx.Module, names: Iterable[str]) -> list[tuple[Path, tuple[int, int]]]:
    """``(path, (in, out))`` of every 2-D ``kernel`` of ``base`` whose path contains one of ``names`` (a
    module attribute name such as ``q``, ``wi_0`` or ``final_projection``), in the module's order."""
    names = set(names)
    out = []
    for path, var in nnx.to_flat_state(nnx.state(base, nnx.Param)):
        shape = tuple(var.get_value().shape)
        if path[-1] == "kernel" and len(shape) == 2 and names & {str(p) for p in path[:-1]}:
            out.append((tuple(path), shape))
    return out


class LoRA(nnx.Module):
    """Factors for the kernels ``targets`` (from :func:`lora_targets`) of rank ``rank``, scale ``alpha / rank``."""

    def __init__(self, targets: Sequence[tuple[Path, tuple[int, int]]], rank: int, alpha: float | None = None, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not targets:
            raise ValueError("LoRA has no target kernels: no Linear kernel of the base module matched")
        self.paths = tuple(tuple(p) for p, _ in targets)
        self.rank = int(rank)
        self.scale = float(alpha if alpha else rank) / float(rank)
        pd = as_dtype(param_dtype)
        a, b = [], []
        for _, (d_in, d_out) in targets:
            init = jax.random.normal(rngs.params(), (d_in, self.rank), jnp.float32) / jnp.sqrt(float(d_in))
            a.append(nnx.Param(init.astype(pd), **{LOGICAL_AXES: (None, None)}))
            b.append(nnx.Param(jnp.zeros((self.rank, d_out), pd), **{LOGICAL_AXES: (None, None)}))
        self.a = nnx.List(a)
        self.b = nnx.List(b)

    def deltas(self) -> dict[Path, jax.Array]:
        """``{kernel path: (alpha / r) A B}`` in float32."""
        return {p: self.scale * jnp.matmul(a.get_value().astype(jnp.float32), b.get_value().astype(jnp.float32))
                for p, a, b in zip(self.paths, self.a, self.b)}


def apply_lora(base: nnx.Module, lora: LoRA) -> nnx.Module:
    """A new module: ``base`` with each targeted kernel ``W`` replaced by ``W + delta`` (differentiable in
    the factors). ``base`` is left as it is."""
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    deltas = lora.deltas()
    flat = list(nnx.to_flat_state(params))
    missing = sorted(set(deltas) - {tuple(p) for p, _ in flat}, key=str)
    if missing:
        raise ValueError(f"LoRA targets {missing[:5]} are not parameters of the base module")
    new = [(p, v.replace(v.get_value() + deltas[tuple(p)].astype(v.get_value().dtype)) if tuple(p) in deltas else v)
           for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new), rest)


def merge_lora(base: nnx.Module, lora: LoRA) -> nnx.Module:
    """Write the merged kernels into ``base`` in place (export: the adapted model as a plain module)."""
    deltas = lora.deltas()
    for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param)):
        if tuple(p) in deltas:
            v.set_value(v.get_value() + deltas[tuple(p)].astype(v.get_value().dtype))
    return base


__all__ = ["LoRA", "apply_lora", "lora_targets", "merge_lora"]
