"""Causal 3-D convolution and per-frame group norm of the Pyramid Flow video VAE (spec §5.1, §10.7).

Activations are channels-last ``[B, F, H, W, C]`` inside the VAE. Causality in time comes from padding
``k - 1`` zero frames at the front only, so output frame ``t`` depends on input frames ``<= t`` (with a
temporal stride ``s``: output ``t`` sees inputs ``<= s*t``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.layers.core import LOGICAL_AXES, conv, xavier_uniform


def _triple(x: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(x, int):
        return (x, x, x)
    x = tuple(x)
    if len(x) != 3:
        raise ValueError(f"expected an int or 3 values (time, height, width), got {x}")
    return x  # type: ignore[return-value]


class CausalConv3d(nnx.Module):
    """3-D conv with front-only zero padding in time and symmetric ``k // 2`` zero padding in space.

    The parameters live in ``self.conv`` (an ``nnx.Conv``) so that the parameter path matches the
    official ``<name>.conv.weight`` / ``<name>.conv.bias`` keys. Temporal stride ``s`` with ``k = 3`` maps
    ``F -> floor((F - 1) / s) + 1``.

    ``x``: ``[B, F, H, W, C_in]`` -> ``[B, F', H', W', C_out]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=xavier_uniform,
        rngs: nnx.Rngs,
    ):
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd for symmetric padding, got {(kh, kw)}")
        self.kernel_size = (kt, kh, kw)
        self.strides = _triple(strides)
        # Zero padding: the official module pads with mode "constant" (value 0) in time and space.
        padding = ((kt - 1, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        self.conv = conv(
            in_channels,
            out_channels,
            self.kernel_size,
            strides=self.strides,
            padding=padding,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 5:
            raise ValueError(f"CausalConv3d expects [B, F, H, W, C] (channels-last), got shape {x.shape}")
        # Computed as a sum over the kt time taps of 2-D convs on [B*F', H, W, C] (same parameters, same
        # result up to float summation order): XLA:CPU runs 3-D convolutions 5-8x slower than 2-D ones, and
        # on accelerators the two forms cost the same.
        c = self.conv
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.strides
        bias = c.bias[...] if c.bias is not None else None
        x, kernel, bias = c.promote_dtype((x, c.kernel[...], bias), dtype=c.dtype)
        b, f = x.shape[:2]
        fo = (f - 1) // st + 1  # front padding kt - 1: F -> floor((F - 1) / s) + 1
        xp = jnp.pad(x, ((0, 0), (kt - 1, 0), (0, 0), (0, 0), (0, 0)))
        y = None
        for t in range(kt):  # output frame o reads padded frame o * st + t with tap t
            xs = xp[:, t: t + st * (fo - 1) + 1: st]
            yt = jax.lax.conv_general_dilated(
                xs.reshape((b * fo,) + xs.shape[2:]), kernel[t], (sh, sw), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=c.precision,
            )
            y = yt if y is None else y + yt
        y = y.reshape((b, fo) + y.shape[1:])
        return y if bias is None else y + bias


class CausalGroupNorm(nnx.GroupNorm):
    """GroupNorm applied to every frame separately, statistics and affine in float32.

    Parameters ``scale`` / ``bias`` (torch ``weight`` / ``bias``). ``x``: ``[B, F, H, W, C]`` or ``[B, H, W, C]``.

    ``num_groups=0`` keeps the per-channel affine and drops the statistics (not in the official VAE). A tiny
    VAE trained from scratch for a few thousand steps learns much faster without per-frame normalisation
    (the README's demo notes give the figures); the parameters and their keys stay the same.
    """

    def __init__(self, num_channels: int, *, num_groups: int, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_groups < 0:
            raise ValueError(f"GroupNorm: num_groups must be >= 0 (0 = affine only), got {num_groups}")
        self.normalise = num_groups > 0
        num_groups = max(num_groups, 1)
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups; "
                "set norm_groups to a divisor of every block width"
            )
        super().__init__(
            num_channels,
            num_groups=num_groups,
            epsilon=eps,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            # Two-pass variance: matches torch's GroupNorm numerics on activations with a large mean.
            use_fast_variance=False,
            rngs=rngs,
            scale_metadata={LOGICAL_AXES: ("norm",)},
            bias_metadata={LOGICAL_AXES: ("norm",)},
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.normalise:
            return (x.astype(jnp.float32) * self.scale[...] + self.bias[...]).astype(x.dtype)
        if x.ndim == 4:
            return super().__call__(x.astype(jnp.float32)).astype(x.dtype)
        b, f, h, w, c = x.shape
        y = super().__call__(x.reshape(b * f, h, w, c).astype(jnp.float32))
        return y.reshape(b, f, h, w, c).astype(x.dtype)
