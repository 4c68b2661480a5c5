"""Building models: abstract (no memory), or randomly initialised as one compiled program."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def abstract(make: Callable[[], M]) -> M:
    """The module with ``ShapeDtypeStruct`` leaves: shapes, counts, restore and load targets."""
    return nnx.eval_shape(make)


def init_jit(make: Callable[[], M]) -> M:
    """Random init as ONE jitted program rather than one eager dispatch (and compile) per parameter.

    ``make`` builds the module with its own ``nnx.Rngs``; the result is bit-identical to calling ``make()``
    eagerly (same keys, same initialisers), only faster for models with many parameters.
    """
    graphdef = nnx.graphdef(abstract(make))
    state = jax.jit(lambda: nnx.state(make()))()
    return nnx.merge(graphdef, state)
