"""Conditioning and positional embeddings of the pyramidal MMDiT (spec §2.2, §2.4, §10.1).

* Timestep sinusoid (cos first) and the two Linear-SiLU-Linear embedders (timestep, pooled text).
* The SD3-style fixed 2-D sin-cos table, its centre crop for the current clip's patch grid and the bilinear
  resize (``align_corners=False``, no antialias) of that crop onto smaller history grids. These are
  deterministic buffers computed with numpy at trace time (float64, then float32), never parameters.
* Temporal RoPE over the full head dimension by frame index, interleaved pairs ``(2k, 2k+1)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.layers.core import conv, dense

TIMESTEP_CHANNELS = 256


# ---- timestep / pooled-text conditioning -------------------------------------------------------------


def timestep_sinusoid(t: jax.Array, dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> jax.Array:
    """``[B] -> [B, dim]`` float32 sinusoid ``[cos(t f), sin(t f)]``, ``f_i = exp(-ln(max_period) i / (dim/2))``.

    ``t`` is the global scheduler timestep (0..1000), not a ratio.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def normal_init(stddev: float):
    return nnx.initializers.normal(stddev)


class MLPEmbedder(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` / ``TextProjection`` names)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # N(0, 0.02) weights and zero biases, as the official from-scratch init (spec §2.1b).
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=normal_init(0.02))
        self.linear_1 = dense(in_dim, out_dim, axes=(None, "embed"), **kw)
        self.linear_2 = dense(out_dim, out_dim, axes=(None, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextEmbedding(nnx.Module):
    """``temb = MLP_t(sinusoid(t)) + MLP_p(pooled)``: ``[B], [B, P] -> [B, D]`` (float32 out)."""

    def __init__(self, dim: int, pooled_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim, **kw)
        self.text_embedder = MLPEmbedder(pooled_dim, dim, **kw)

    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        # Low-precision runs round t to the compute dtype before the sinusoid, like the official
        # bf16 pipeline (spec §2.2, §10.4); a no-op in float32.
        t = timestep.astype(self.dtype).astype(jnp.float32)
        t_emb = self.timestep_embedder(timestep_sinusoid(t).astype(self.dtype))
        p_emb = self.text_embedder(pooled.astype(self.dtype))
        return t_emb.astype(jnp.float32) + p_emb.astype(jnp.float32)


# ---- 2-D sin-cos table ----------------------------------------------------------------------------------


def _grid_positions(grid: int, base_size: int) -> np.ndarray:
    # float32 coordinates (index / (grid / base)) exactly as the official numpy/torch code, then float64.
    return (np.arange(grid, dtype=np.float32) / np.float32(grid / base_size)).astype(np.float64)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[M] -> [M, dim]`` float64 ``[sin(p w_k), cos(p w_k)]``, ``w_k = 10000^(-k/(dim/2))``."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _check_dim(dim: int) -> None:
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")


def sincos_2d_table(dim: int, grid: int, base_size: int) -> np.ndarray:
    """The full ``[1, grid*grid, dim]`` float32 table (the checkpoint buffer ``pos_embed.pos_embed``).

    Flat index ``row * grid + col``; the first ``dim/2`` channels encode the column, the rest the row
    (SD3 quirk). About 226 MB at full size: only built to check / write checkpoints, never cached (the
    model itself only ever builds the crops it needs, :func:`sincos_2d_crop`).
    """
    _check_dim(dim)
    e = _sincos_1d(dim // 2, _grid_positions(grid, base_size)).astype(np.float32)  # [G, D/2]
    half = dim // 2
    table = np.empty((grid, grid, dim), np.float32)
    table[:, :, :half] = e[None, :, :]  # column
    table[:, :, half:] = e[:, None, :]  # row
    return table.reshape(1, grid * grid, dim)


@functools.lru_cache(maxsize=64)
def sincos_2d_crop(dim: int, grid: int, base_size: int, h: int, w: int) -> np.ndarray:
    """Centre crop ``[h, w, dim]`` of :func:`sincos_2d_table` (rows from ``(grid-h)//2``, cols ``(grid-w)//2``).

    Computed directly from the coordinates, so it equals slicing the full table without building it.
    """
    _check_dim(dim)
    if h > grid or w > grid:
        raise ValueError(
            f"patch grid {h}x{w} exceeds the positional table ({grid}x{grid}, pos_embed_max_size): use a "
            f"smaller latent or a larger pos_embed_max_size"
        )
    pos = _grid_positions(grid, base_size)
    top, left = (grid - h) // 2, (grid - w) // 2
    e_rows = _sincos_1d(dim // 2, pos[top : top + h]).astype(np.float32)
    e_cols = _sincos_1d(dim // 2, pos[left : left + w]).astype(np.float32)
    half = dim // 2
    out = np.empty((h, w, dim), np.float32)
    out[:, :, :half] = e_cols[None, :, :]
    out[:, :, half:] = e_rows[:, None, :]
    out.setflags(write=False)
    return out


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 weights of torch ``interpolate(mode='bilinear', align_corners=False)``.

    Source coordinate ``(i + 0.5) * n_in / n_out - 0.5`` clamped at 0, linear between the two neighbours
    (no antialias; an exact 2x reduction is the 2x2 mean, a 4x one the mean of the central 2x2).
    """
    # Source indices and weights in float32 exactly as torch's CPU kernel computes them (for float input).
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def resize_bilinear_np(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """``[H, W, C] -> [h, w, C]`` bilinear resize (torch semantics above), float64 math, float32 out."""
    rh = bilinear_matrix(x.shape[0], h)
    rw = bilinear_matrix(x.shape[1], w)
    return np.einsum("hH,HWc,wW->hwc", rh, x.astype(np.float64), rw).astype(np.float32)


@functools.lru_cache(maxsize=64)
def clip_pos_embed(dim: int, grid: int, base_size: int, h: int, w: int, ref_h: int, ref_w: int) -> np.ndarray:
    """Spatial PE ``[h*w, dim]`` for a clip with patch grid ``h x w`` when the current clip's grid is ``ref``.

    The crop is taken for the current clip; smaller history grids get that crop bilinearly resized
    (``interp_condition_pos``, spec §2.4 / §10.6).
    """
    if h > ref_h or w > ref_w:
        raise ValueError(
            f"a history clip's patch grid {h}x{w} is larger than the current clip's {ref_h}x{ref_w}: clips must "
            f"be ordered oldest -> newest with the current (largest) clip last"
        )
    crop = sincos_2d_crop(dim, grid, base_size, ref_h, ref_w)
    if (h, w) != (ref_h, ref_w):
        crop = resize_bilinear_np(crop, h, w)
    out = np.ascontiguousarray(crop.reshape(h * w, dim))
    out.setflags(write=False)
    return out


class PatchEmbed(nnx.Module):
    """Per-frame ``p x p`` stride-``p`` patch conv (``pos_embed.proj``) plus the cropped sin-cos PE.

    ``[B, F, H, W, C] -> [B, F*h*w, D]`` (frame-major, then row, then column).
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        patch_size: int,
        *,
        pos_embed_max_size: int,
        base_size: int,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.patch_size = patch_size
        self.dim = dim
        self.grid = pos_embed_max_size
        self.base_size = base_size
        self.dtype = dtype
        # Xavier over the flattened [C*p*p, D] matrix, i.e. initialised like a Linear (official init).
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
        self.proj = conv(
            in_channels, dim, (patch_size, patch_size), strides=patch_size, dtype=dtype,
            param_dtype=param_dtype, kernel_init=init, rngs=rngs,
        )

    def pos_embed_for(self, h: int, w: int, ref_h: int, ref_w: int) -> np.ndarray:
        return clip_pos_embed(self.dim, self.grid, self.base_size, h, w, ref_h, ref_w)

    def __call__(self, x: jax.Array, ref_hw: tuple[int, int]) -> jax.Array:
        b, f, hh, ww, c = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        y = self.proj(x.reshape(b * f, hh, ww, c).astype(self.dtype))  # [B*F, h, w, D]
        y = y.reshape(b, f * h * w, self.dim).astype(jnp.float32)
        pe = self.pos_embed_for(h, w, *ref_hw)
        return (y.reshape(b, f, h * w, self.dim) + pe[None, None]).reshape(b, f * h * w, self.dim)


# ---- temporal RoPE --------------------------------------------------------------------------------------


def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
    """``theta^(-2k/dim)``, ``k = 0..dim/2-1`` (float64)."""
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def rope_cos_sin(positions, dim: int, theta: float):
    """``positions [..., L] -> (cos, sin)`` each ``[..., L, dim/2]`` float32.

    numpy positions (static layouts) are evaluated in float64 like the official code; traced positions
    (the padded static entry point) in float32.
    """
    inv = rope_inv_freq(dim, theta)
    if isinstance(positions, np.ndarray):
        ang = positions.astype(np.float64)[..., None] * inv
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs ``(2k, 2k+1)`` of ``x [B, L, N, K]`` by ``cos/sin [B|1, L, K/2]`` (float32 math)."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c = jnp.asarray(cos)[:, :, None, :]
    s = jnp.asarray(sin)[:, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
