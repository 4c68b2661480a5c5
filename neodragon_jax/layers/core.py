"""Shared building blocks: logical-axis-annotated Linear/Conv factories and float32 norms.

Parameters carry their logical axis names as the variable metadata ``logical_axes`` (never mesh axes):
``neodragon_jax.sharding`` maps them to mesh axes with a named rule set. We keep them as plain metadata
rather than Flax's eager ``sharding`` annotation so that models can be built without a mesh in context
(tests, conversion, ``eval_shape`` planning) and sharded later from the abstract state.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = "logical_axes"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> jnp.dtype:
    if isinstance(name_or_dtype, str):
        try:
            return DTYPES[name_or_dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(DTYPES)}") from None
    return jnp.dtype(name_or_dtype)


xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


def dense(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init=xavier_uniform,
    bias_init=zeros,
) -> nnx.Linear:
    """``nnx.Linear`` whose kernel ``[in, out]`` is tagged with logical ``axes`` (bias with ``axes[1]``)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        rngs=rngs,
        kernel_metadata={LOGICAL_AXES: tuple(axes)},
        bias_metadata={LOGICAL_AXES: (axes[1],)},
    )


def conv(
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int],
    *,
    rngs: nnx.Rngs,
    strides: Sequence[int] | int = 1,
    padding="VALID",
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init=xavier_uniform,
    bias_init=zeros,
) -> nnx.Conv:
    """``nnx.Conv`` (channels-last) with kernel ``[*spatial, in, out]`` tagged ``(..., conv_in, conv_out)``."""
    spatial = (None,) * len(tuple(kernel_size))
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=tuple(kernel_size),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        rngs=rngs,
        kernel_metadata={LOGICAL_AXES: spatial + ("conv_in", "conv_out")},
        bias_metadata={LOGICAL_AXES: ("conv_out",)},
    )


def param(rngs: nnx.Rngs, init, shape, *, axes, param_dtype=jnp.float32) -> nnx.Param:
    """A bare parameter with logical axis metadata."""
    return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), **{LOGICAL_AXES: tuple(axes)})


class RMSNorm(nnx.Module):
    """T5/QK-style RMS norm in float32 with a learnable scale (``weight`` as in PyTorch)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name: str | None = "norm"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **{LOGICAL_AXES: (axis_name,)})

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm_no_affine(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without scale/bias, computed in float32 (AdaLN's base norm)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)
