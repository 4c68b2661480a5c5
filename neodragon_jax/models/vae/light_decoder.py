"""Neodragon's light decoder: a TAEHV-style decoder with 8x temporal up-sampling (spec §5.2, §9.5, §10.8).

The official module is ``TAEHVDecoder.blocks`` (an ``nn.Sequential``); ``self.blocks`` here is a list with
the same indices, so checkpoint keys ``decoder.blocks.{i}...`` map by index. With the default config:

    0 Clamp  1 conv 16->256  2 ReLU  3-5 MemBlock(256)  6 Upsample2x  7 TGrow(256, 2)  8 conv 256->128 (no bias)
    9-11 MemBlock(128)  12 Upsample2x  13 TGrow(128, 2)  14 conv 128->64 (no bias)
    15-17 MemBlock(64)  18 Upsample2x  19 TGrow(64, 2)  20 conv 64->64 (no bias)  21 ReLU  22 conv 64->3

All convs are 2-D (3x3, padding 1) and act on every frame separately; time enters only through the
MemBlocks (each sees its own input one frame earlier, zeros before the first frame) and the TGrows (one
frame -> ``s`` frames: channel group ``j`` becomes frame ``s*t + j``). ``T`` latents give ``8T`` raw frames
whose first 7 are dropped, so latent 0 decodes to one frame and 7 latents to 49 frames.

Smaller VAEs (the tiny presets: 4x spatial, no temporal compression) set ``spatial_upscale`` /
``temporal_upscale`` per stage: a stage without spatial up-sampling keeps its (parameter-free) block index
as an identity, so the checkpoint keys ``decoder.blocks.{i}`` stay those of the official layout.

Two execution modes give the same result (up to float rounding):
- whole clip (``__call__``): every block runs on all frames at once, MemBlock memory = input shifted by one;
- streaming (``init_state`` / ``step``): one latent frame per call with the MemBlock memories carried in a
  state dict, which is what a phone runs. ``step`` emits the ``s = 8`` raw frames of that latent in time
  order; concatenating all emitted frames gives the whole-clip raw output, and ``step(..., first=True)``
  drops the 7 start-up frames exactly as the whole-clip decode does.

Output is in [-1, 1] by training but not clipped here: like the official decoder, the pipeline clips.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config.schema import LightDecoderConfig
from neodragon_jax.layers.core import conv

# PyTorch's default Conv2d init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))): TAEHV is trained from
# it; a small-std init would silence this deep ReLU stack when the decoder is trained from scratch.
_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

State = dict[str, jax.Array]


def _conv2d(cin, cout, k, *, use_bias=True, dtype, param_dtype, rngs) -> nnx.Conv:
    p = k // 2
    return conv(
        cin, cout, (k, k), padding=((p, p), (p, p)), use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs, kernel_init=_INIT,
    )


def _frames(fn, x: jax.Array) -> jax.Array:
    """Apply a per-frame 2-D op to ``[B, T, H, W, C]``."""
    b, t = x.shape[:2]
    y = fn(x.reshape((b * t,) + x.shape[2:]))
    return y.reshape((b, t) + y.shape[1:])


class Clamp(nnx.Module):
    """Soft clamp ``c * tanh(x / c)`` (c = 3)."""

    def __init__(self, c: float):
        self.c = c

    def __call__(self, x):
        return jnp.tanh(x / self.c) * self.c


class ReLU(nnx.Module):
    def __call__(self, x):
        return nnx.relu(x)


class Identity(nnx.Module):
    """The place of an ``Upsample2x`` in a stage without spatial up-sampling (keeps the block indices)."""

    def __call__(self, x):
        return x


class Upsample2x(nnx.Module):
    """Nearest-neighbour 2x in H and W (torch ``nn.Upsample(scale_factor=2)``)."""

    def __call__(self, x):
        return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


class MemBlock(nnx.Module):
    """``relu(conv(relu(conv(relu(conv([x_t, x_{t-1}]))))) + x_t)``; convs 2C->C, C->C, C->C (``conv.0/2/4``)."""

    def __init__(self, c: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = nnx.List(
            [_conv2d(2 * c, c, 3, **kw), ReLU(), _conv2d(c, c, 3, **kw), ReLU(), _conv2d(c, c, 3, **kw)]
        )

    def __call__(self, x: jax.Array, past: jax.Array) -> jax.Array:
        """``x``, ``past``: ``[N, H, W, C]`` (``past`` = this block's input one frame earlier)."""
        h = jnp.concatenate([x, past.astype(x.dtype)], axis=-1)
        for layer in self.conv:
            h = layer(h)
        return nnx.relu(h + x)


class TGrow(nnx.Module):
    """1x1 conv ``C -> s*C`` (no bias); channel group ``j`` of frame ``t`` becomes frame ``s*t + j``."""

    def __init__(self, c: int, stride: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.stride = stride
        self.conv = _conv2d(c, c * stride, 1, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, H, W, C]`` -> ``[B, s*T, H, W, C]``."""
        b, t, h, w, c = x.shape
        y = _frames(self.conv, x).reshape(b, t, h, w, self.stride, c)
        return jnp.transpose(y, (0, 1, 4, 2, 3, 5)).reshape(b, t * self.stride, h, w, c)


class LightDecoder(nnx.Module):
    """TAEHV-style decoder (``decoder`` of the asymmetric VAE); input is the ``post_quant_conv`` output.

    ``__call__(z [B, L, T, h, w]) -> [B, 3, 8T - 7, 8h, 8w]`` with the official flags (in general
    ``[B, 3, t(T - 1) + 1, s h, s w]`` with ``t = temporal_factor``, ``s = spatial_factor``); ``call_cl`` is
    the channels-last form (``[B, T, h, w, L]`` -> ``[B, F, H, W, 3]``).
    """

    def __init__(self, cfg: LightDecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if len(cfg.temporal_upscale) != len(cfg.channels):
            raise ValueError(
                f"LightDecoderConfig: temporal_upscale has {len(cfg.temporal_upscale)} flags for "
                f"{len(cfg.channels)} stages (channels); give one flag per stage"
            )
        if len(cfg.spatial_upscale) != len(cfg.channels):
            raise ValueError(
                f"LightDecoderConfig: spatial_upscale has {len(cfg.spatial_upscale)} flags for "
                f"{len(cfg.channels)} stages (channels); give one flag per stage"
            )
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = tuple(cfg.channels) + (cfg.channels[-1],)  # TAEHV's n_f: the last conv keeps the last width
        blocks: list[nnx.Module] = [Clamp(cfg.clamp), _conv2d(cfg.latent_channels, ch[0], 3, **kw), ReLU()]
        for i, (up_t, up_s) in enumerate(zip(cfg.temporal_upscale, cfg.spatial_upscale)):
            blocks += [MemBlock(ch[i], **kw) for _ in range(cfg.blocks_per_stage)]
            blocks += [
                Upsample2x() if up_s else Identity(),
                TGrow(ch[i], 2 if up_t else 1, **kw),
                _conv2d(ch[i], ch[i + 1], 3, use_bias=False, **kw),
            ]
        blocks += [ReLU(), _conv2d(ch[-1], cfg.out_channels, 3, **kw)]
        self.blocks = nnx.List(blocks)
        self.temporal_factor = 2 ** sum(bool(u) for u in cfg.temporal_upscale)
        self.spatial_factor = 2 ** sum(bool(u) for u in cfg.spatial_upscale)
        self.frames_to_trim = self.temporal_factor - 1

    # ---- shared core: runs the block list on T frames given the MemBlock memories --------------------
    def _run(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        """``x``: ``[B, T, h, w, L]`` -> raw frames ``[B, s*T, H, W, 3]`` and the memories after frame T-1."""
        new_state: State = {}
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, MemBlock):
                # Memory of frame t is this block's input at frame t-1; state holds the one before frame 0.
                past = jnp.concatenate([state[str(i)][:, None].astype(x.dtype), x[:, :-1]], axis=1)
                new_state[str(i)] = x[:, -1]
                b, t = x.shape[:2]
                flat = lambda a: a.reshape((b * t,) + a.shape[2:])  # noqa: E731
                x = blk(flat(x), flat(past)).reshape(x.shape)
            elif isinstance(blk, TGrow):
                x = blk(x)
            else:
                x = _frames(blk, x)
        return x, new_state

    def init_state(self, batch: int, height: int, width: int, dtype=jnp.float32) -> State:
        """Empty (zero) MemBlock memories for a stream of ``[B, L, h, w]`` latent frames."""
        state: State = {}
        scale, stage = 1, 0
        ch = self.cfg.channels
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, MemBlock):
                state[str(i)] = jnp.zeros((batch, height * scale, width * scale, ch[stage]), dtype)
            elif isinstance(blk, Upsample2x):
                scale *= 2
            elif isinstance(blk, TGrow):
                stage += 1
        return state

    def step(self, state: State, latent: jax.Array, *, first: bool = False) -> tuple[State, jax.Array]:
        """Decode one latent frame ``[B, L, h, w]`` -> ``(state, frames [B, 3, n, 8h, 8w])``.

        ``n = 8`` raw frames in time order (``temporal_factor``; ``spatial_factor`` for the ``8``s of the
        frame size); with ``first=True`` (the stream's first latent) the 7 start-up frames are dropped and
        ``n = 1``, matching the whole-clip decode frame for frame.
        """
        if latent.ndim != 4 or latent.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"step expects one latent frame [B, {self.cfg.latent_channels}, h, w], got {latent.shape}")
        x = jnp.transpose(latent, (0, 2, 3, 1))[:, None]
        y, state = self._run(x, state)
        if first:
            y = y[:, self.frames_to_trim:]
        return state, jnp.transpose(y, (0, 4, 1, 2, 3))

    def call_cl(self, z: jax.Array) -> jax.Array:
        b, _, h, w, _ = z.shape
        y, _ = self._run(z, self.init_state(b, h, w, z.dtype))
        return y[:, self.frames_to_trim:]

    def __call__(self, z: jax.Array) -> jax.Array:
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"LightDecoder expects latents [B, {self.cfg.latent_channels}, T, h, w], got {z.shape}")
        return jnp.transpose(self.call_cl(jnp.transpose(z, (0, 2, 3, 4, 1))), (0, 4, 1, 2, 3))
