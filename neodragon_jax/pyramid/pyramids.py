"""Spatial pyramids of latents and noise (spec §3.4, §10.1-2).

All functions act on the last two axes (H, W) of arrays laid out [..., H, W], typically [B, C, F, H, W].

* ``downsample_2x``: exact 2x2 mean pooling. This is what torch ``interpolate(mode='bilinear', scale 0.5,
  align_corners=False)`` computes for an even size; ``jax.image.resize`` would antialias and differ.
* Latent pyramid: plain 2x2 mean per level (the clean signal shrinks without rescaling).
* Noise pyramid: 2x2 mean times 2 per level, so i.i.d. unit-variance noise stays i.i.d. unit variance.
* ``upsample_2x``: nearest neighbour (each value repeated into a 2x2 block).

Pyramid lists are ordered coarsest (stage 0) -> finest (stage S-1), like the stages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_even(x: jax.Array, what: str) -> None:
    if x.ndim < 2:
        raise ValueError(f"{what}: expected an array [..., H, W], got shape {x.shape}")
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(
            f"{what}: H and W must be even to halve them, got H={h}, W={w} (shape {x.shape}); "
            "latent sizes must be divisible by 2**(num_stages - 1)"
        )


def downsample_2x(x: jax.Array) -> jax.Array:
    """2x2 mean pooling over the last two axes: [..., H, W] -> [..., H/2, W/2] (same dtype)."""
    _check_even(x, "downsample_2x")
    *lead, h, w = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def upsample_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling over the last two axes: [..., H, W] -> [..., 2H, 2W]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=-2), 2, axis=-1)


def latent_pyramid(z: jax.Array, num_stages: int) -> list[jax.Array]:
    """Clean-latent pyramid by repeated 2x2 mean: returns ``num_stages`` arrays, coarsest first.

    z: [..., H, W] full resolution. Entry k has spatial size (H, W) / 2**(num_stages-1-k).
    """
    levels = [z]
    for _ in range(num_stages - 1):
        levels.append(downsample_2x(levels[-1]))
    return levels[::-1]


def noise_pyramid(eps: jax.Array, num_stages: int) -> list[jax.Array]:
    """Noise pyramid by repeated (2x2 mean) x 2, which keeps i.i.d. N(0, 1) noise i.i.d. N(0, 1).

    eps: [..., H, W] full resolution. Returns ``num_stages`` arrays, coarsest first.
    """
    levels = [eps]
    for _ in range(num_stages - 1):
        levels.append(downsample_2x(levels[-1]) * 2)
    return levels[::-1]
