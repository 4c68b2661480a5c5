"""Pyramid Flow causal video VAE: encoder, native decoder, posterior and the VAE wrappers (spec §5.1, §9.5-9.6).

Public tensors use the PyTorch layout ``[B, C, F, H, W]`` (video in [-1, 1], latents ``[B, 16, T, h, w]``);
inside, activations are channels-last ``[B, F, H, W, C]``. Attribute names follow the official module
names, so the key map (``neodragon_jax.convert.vae``) is identity plus layout transforms.

Non-chunked semantics of the official code (``temporal_chunk=False, is_init_image=True``): every causal
conv pads two zero frames at the front; the temporal down-sampler maps ``F -> floor((F - 1) / 2) + 1``
(49 -> 25 -> 13 -> 7); the temporal up-sampler maps ``T -> 2T - 1`` (7 -> 13 -> 25 -> 49) by interleaving
the two channel halves in time and dropping the first frame.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config.schema import CausalVAEConfig, VAEConfig
from neodragon_jax.layers.causal_conv import CausalConv3d, CausalGroupNorm
from neodragon_jax.layers.core import dense
from neodragon_jax.models.vae.normalize import latent_frames, video_frames  # noqa: F401  (re-export)

# The official ``_init_weights``: timm trunc_normal_(std=0.02), whose cut is at +-2 absolute (100 std), i.e.
# a plain normal(0, 0.02); zero biases.
_INIT = nnx.initializers.normal(stddev=0.02)


def _cl(x: jax.Array) -> jax.Array:
    """``[B, C, F, H, W]`` -> ``[B, F, H, W, C]``."""
    return jnp.transpose(x, (0, 2, 3, 4, 1))


def _cf(x: jax.Array) -> jax.Array:
    """``[B, F, H, W, C]`` -> ``[B, C, F, H, W]``."""
    return jnp.transpose(x, (0, 4, 1, 2, 3))


def _cconv(cin, cout, k, *, strides=1, dtype, param_dtype, rngs) -> CausalConv3d:
    return CausalConv3d(
        cin, cout, k, strides=strides, dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, rngs=rngs
    )


class CausalResnetBlock3D(nnx.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus a 1x1x1 shortcut conv when the width changes."""

    def __init__(self, cin: int, cout: int, cfg: CausalVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        gn = dict(num_groups=cfg.norm_groups, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = CausalGroupNorm(cin, **gn)
        self.conv1 = _cconv(cin, cout, 3, **kw)
        self.norm2 = CausalGroupNorm(cout, **gn)
        self.conv2 = _cconv(cout, cout, 3, **kw)
        self.conv_shortcut = _cconv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class CausalDownsample2x(nnx.Module):
    """Spatial 2x down-sampling: causal conv k3, stride (1, 2, 2)."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = _cconv(channels, channels, 3, strides=(1, 2, 2), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class CausalTemporalDownsample2x(nnx.Module):
    """Temporal 2x down-sampling: causal conv k3, stride (2, 1, 1); ``F -> floor((F - 1) / 2) + 1``."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = _cconv(channels, channels, 3, strides=(2, 1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class CausalUpsample2x(nnx.Module):
    """Spatial 2x up-sampling: causal conv to ``4C`` then depth-to-space.

    Channel ``c * 4 + p1 * 2 + p2`` goes to pixel ``(2h + p1, 2w + p2)`` of channel ``c`` (the official
    ``'b (c p1 p2) t h w -> b c t (h p1) (w p2)'``).
    """

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = _cconv(channels, 4 * channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        b, f, h, w, c4 = y.shape
        c = c4 // 4
        y = y.reshape(b, f, h, w, c, 2, 2)
        y = jnp.transpose(y, (0, 1, 2, 5, 3, 6, 4))  # b f h p1 w p2 c
        return y.reshape(b, f, 2 * h, 2 * w, c)


class CausalTemporalUpsample2x(nnx.Module):
    """Temporal 2x up-sampling: causal conv to ``2C``, channel ``c * 2 + p`` -> frame ``2t + p``; the first
    frame is dropped (initial chunk), so ``T -> 2T - 1`` and a single image frame stays one frame."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = _cconv(channels, 2 * channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        b, f, h, w, c2 = y.shape
        c = c2 // 2
        y = y.reshape(b, f, h, w, c, 2)
        y = jnp.transpose(y, (0, 1, 5, 2, 3, 4)).reshape(b, 2 * f, h, w, c)  # frame index = 2t + p
        return y[:, 1:]


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over the ``H*W`` positions of each frame, GN in, residual out.

    Matches diffusers' ``Attention(_from_deprecated_attn_block=True, residual_connection=True,
    upcast_softmax=True)`` with one head of width ``C``: ``x + to_out(softmax(q k^T / sqrt(C)) v)``.
    """

    def __init__(self, channels: int, cfg: CausalVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.group_norm = CausalGroupNorm(
            channels, num_groups=cfg.norm_groups, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=_INIT)
        self.to_q = dense(channels, channels, axes=("embed", "heads"), **lin)
        self.to_k = dense(channels, channels, axes=("embed", "heads"), **lin)
        self.to_v = dense(channels, channels, axes=("embed", "heads"), **lin)
        self.to_out = nnx.List([dense(channels, channels, axes=("heads", "embed"), **lin)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        t = self.group_norm(x).reshape(b * f, h * w, c).astype(self.dtype)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("nlc,nmc->nlm", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(float(c))
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = self.to_out[0](jnp.einsum("nlm,nmc->nlc", probs, v))
        return x + o.reshape(b, f, h, w, c).astype(x.dtype)


class CausalUNetMidBlock(nnx.Module):
    """ResBlock -> per-frame spatial self-attention -> ResBlock (widths constant)."""

    def __init__(self, channels: int, cfg: CausalVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([CausalResnetBlock3D(channels, channels, cfg, **kw) for _ in range(2)])
        self.attentions = nnx.List([SpatialSelfAttention(channels, cfg, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlockCausal3D(nnx.Module):
    def __init__(self, cin, cout, cfg: CausalVAEConfig, *, spatial: bool, temporal: bool, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = cfg.encoder_layers_per_block
        self.resnets = nnx.List([CausalResnetBlock3D(cin if i == 0 else cout, cout, cfg, **kw) for i in range(n)])
        self.downsamplers = nnx.List([CausalDownsample2x(cout, **kw)]) if spatial else None
        self.temporal_downsamplers = nnx.List([CausalTemporalDownsample2x(cout, **kw)]) if temporal else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.temporal_downsamplers is not None:
            x = self.temporal_downsamplers[0](x)
        return x


class UpDecoderBlockCausal3D(nnx.Module):
    def __init__(self, cin, cout, cfg: CausalVAEConfig, *, spatial: bool, temporal: bool, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = cfg.decoder_layers_per_block
        self.resnets = nnx.List([CausalResnetBlock3D(cin if i == 0 else cout, cout, cfg, **kw) for i in range(n)])
        self.upsamplers = nnx.List([CausalUpsample2x(cout, **kw)]) if spatial else None
        self.temporal_upsamplers = nnx.List([CausalTemporalUpsample2x(cout, **kw)]) if temporal else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        if self.temporal_upsamplers is not None:
            x = self.temporal_upsamplers[0](x)
        return x


def _check_cfg(cfg: CausalVAEConfig) -> None:
    n = len(cfg.block_out_channels)
    if len(cfg.spatial_down) != n or len(cfg.temporal_down) != n:
        raise ValueError(
            f"CausalVAEConfig: spatial_down ({len(cfg.spatial_down)}) and temporal_down ({len(cfg.temporal_down)}) "
            f"need one flag per block of block_out_channels ({n})"
        )


class CausalVAEEncoder(nnx.Module):
    """Pyramid Flow causal encoder (without ``quant_conv``): video -> ``2 * latent_channels`` moments.

    ``__call__``: ``[B, 3, F, H, W]`` -> ``[B, 2L, T, H/8, W/8]``; ``call_cl`` is the channels-last form.
    """

    def __init__(self, cfg: CausalVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_cfg(cfg)
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = cfg.block_out_channels
        self.conv_in = _cconv(cfg.in_channels, widths[0], 3, **kw)
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append(
                DownEncoderBlockCausal3D(
                    cin, cout, cfg, spatial=cfg.spatial_down[i], temporal=cfg.temporal_down[i], **kw
                )
            )
            cin = cout
        self.down_blocks = nnx.List(blocks)
        self.mid_block = CausalUNetMidBlock(widths[-1], cfg, **kw)
        self.conv_norm_out = CausalGroupNorm(
            widths[-1], num_groups=cfg.norm_groups, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.conv_out = _cconv(widths[-1], 2 * cfg.latent_channels, 3, **kw)

    def call_cl(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))

    def __call__(self, video: jax.Array) -> jax.Array:
        return _cf(self.call_cl(_cl(video)))


class CausalVAEDecoder(nnx.Module):
    """Pyramid Flow native causal decoder (without ``post_quant_conv``): latents -> video.

    ``__call__``: ``[B, L, T, h, w]`` -> ``[B, 3, 1 + 8(T - 1), 8h, 8w]`` (unclipped; the pipeline clips).
    """

    def __init__(self, cfg: CausalVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_cfg(cfg)
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = tuple(reversed(cfg.block_out_channels))
        # The official config gives the decoder the same flags as the encoder, (T, T, T, F): up-sample
        # after up blocks 0..2 (checkpoint keys up_blocks.{0,1,2}.upsamplers).
        spatial_up, temporal_up = cfg.spatial_down, cfg.temporal_down
        self.conv_in = _cconv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = CausalUNetMidBlock(rev[0], cfg, **kw)
        blocks, cin = [], rev[0]
        for i, cout in enumerate(rev):
            blocks.append(UpDecoderBlockCausal3D(cin, cout, cfg, spatial=spatial_up[i], temporal=temporal_up[i], **kw))
            cin = cout
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = CausalGroupNorm(
            rev[-1], num_groups=cfg.norm_groups, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.conv_out = _cconv(rev[-1], cfg.in_channels, 3, **kw)

    def call_cl(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))

    def __call__(self, z: jax.Array) -> jax.Array:
        return _cf(self.call_cl(_cl(z)))


@flax.struct.dataclass
class DiagonalGaussian:
    """VAE posterior ``N(mean, exp(logvar))``; arrays ``[B, L, T, h, w]``, logvar already clamped."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        eps = jax.random.normal(key, self.mean.shape, jnp.float32)
        return (self.mean.astype(jnp.float32) + self.std.astype(jnp.float32) * eps).astype(self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class CausalVideoVAE(nnx.Module):
    """Encoder + ``quant_conv`` + ``post_quant_conv`` + a decoder (native PF decoder or the light decoder).

    ``decoder='native'`` is the Pyramid Flow VAE (checkpoint ``pf_vae``); ``decoder='light'`` is Neodragon's
    asymmetric VAE (checkpoint ``asym_vae``, see :class:`AsymmetricVAE`). Default: ``cfg.decoder``.

    - ``encode(video [B, 3, F, H, W] in [-1, 1]) -> DiagonalGaussian`` with ``[B, 16, T, H/8, W/8]`` arrays;
    - ``sample(video, key)`` = ``encode(video).sample(key)`` (what the pipeline uses for the first frame);
    - ``decode(z [B, 16, T, h, w]) -> [B, 3, 1 + 8(T - 1), 8h, 8w]``, not clipped (the pipeline clips).
    Latents here are raw (un-normalised); see ``normalize.py``.
    """

    def __init__(
        self,
        cfg: VAEConfig,
        *,
        decoder: Literal["native", "light"] | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        from neodragon_jax.models.vae.light_decoder import LightDecoder

        if isinstance(cfg, CausalVAEConfig):
            raise TypeError("CausalVideoVAE takes the VAEConfig (model.vae), not its CausalVAEConfig part")
        kind = decoder or cfg.decoder
        if kind not in ("native", "light"):
            raise ValueError(f"decoder must be 'native' or 'light', got {kind!r}")
        c = cfg.causal
        if kind == "light" and cfg.light_decoder.latent_channels != c.latent_channels:
            raise ValueError(
                f"light_decoder.latent_channels ({cfg.light_decoder.latent_channels}) must equal "
                f"causal.latent_channels ({c.latent_channels})"
            )
        self.cfg = cfg
        self.decoder_kind = kind
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = CausalVAEEncoder(c, **kw)
        self.quant_conv = _cconv(2 * c.latent_channels, 2 * c.latent_channels, 1, **kw)
        self.post_quant_conv = _cconv(c.latent_channels, c.latent_channels, 1, **kw)
        if kind == "native":
            self.decoder = CausalVAEDecoder(c, **kw)
        else:
            self.decoder = LightDecoder(cfg.light_decoder, **kw)

    def _check_video(self, video: jax.Array) -> None:
        c = self.cfg.causal
        if video.ndim != 5 or video.shape[1] != c.in_channels:
            raise ValueError(f"encode expects video [B, {c.in_channels}, F, H, W] in [-1, 1], got shape {video.shape}")
        f = c.spatial_factor
        if video.shape[3] % f or video.shape[4] % f:
            raise ValueError(f"video height and width must be multiples of {f}, got {video.shape[3:]}")

    def encode(self, video: jax.Array) -> DiagonalGaussian:
        self._check_video(video)
        c = self.cfg.causal
        moments = self.quant_conv(self.encoder.call_cl(_cl(video.astype(self.dtype))))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, c.logvar_min, c.logvar_max)
        return DiagonalGaussian(_cf(mean), _cf(logvar))

    def sample(self, video: jax.Array, key: jax.Array) -> jax.Array:
        return self.encode(video).sample(key)

    def decode(self, z: jax.Array) -> jax.Array:
        c = self.cfg.causal
        if z.ndim != 5 or z.shape[1] != c.latent_channels:
            raise ValueError(f"decode expects latents [B, {c.latent_channels}, T, h, w], got shape {z.shape}")
        x = self.post_quant_conv(_cl(z.astype(self.dtype)))
        return _cf(self.decoder.call_cl(x))

    def __call__(self, video: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: posterior sample (or the mean when ``key`` is None), then decode."""
        post = self.encode(video)
        return self.decode(post.mode() if key is None else post.sample(key))


class AsymmetricVAE(CausalVideoVAE):
    """Neodragon's asymmetric VAE: PF encoder + quant convs + the light (TAEHV-style) decoder."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, decoder="light", dtype=dtype, param_dtype=param_dtype, rngs=rngs)


__all__ = [
    "AsymmetricVAE", "CausalVAEDecoder", "CausalVAEEncoder", "CausalVideoVAE", "DiagonalGaussian",
    "latent_frames", "video_frames",
]
