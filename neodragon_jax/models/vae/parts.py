"""The two halves of a causal video VAE as separate modules: what decoder distillation (spec §5.2) trains and
freezes.

- :class:`VAEEncoderPart`: encoder + ``quant_conv`` (video -> posterior), the frozen half;
- :class:`VAEDecoderPart`: ``post_quant_conv`` + a decoder, the native Pyramid Flow decoder or the light
  (TAEHV-style) one (latents -> video), the trained half.

Attribute names are those of :class:`~neodragon_jax.models.vae.CausalVideoVAE`, so each part's parameters
are a sub-tree of a whole VAE's, and together the two are exactly a ``CausalVideoVAE`` with that decoder
(:func:`join_parts`). Each reads its own keys from a whole official ``causal_video_vae`` checkpoint
(``neodragon_jax.convert.vae.encoder_part_keymap`` / ``decoder_part_keymap``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config.schema import CausalVAEConfig, VAEConfig
from neodragon_jax.models.vae.causal_vae import (
    CausalVAEDecoder,
    CausalVAEEncoder,
    CausalVideoVAE,
    DiagonalGaussian,
    _cconv,
    _cl,
)


def check_light_factors(cfg: VAEConfig) -> None:
    """The light decoder must undo exactly the encoder's compression (one clear error otherwise)."""
    c, d = cfg.causal, cfg.light_decoder
    if len(d.spatial_upscale) != len(d.channels) or len(d.temporal_upscale) != len(d.channels):
        raise ValueError(f"model.vae.light_decoder: channels {list(d.channels)} need one spatial_upscale and one "
                         f"temporal_upscale flag per stage, got {list(d.spatial_upscale)} and "
                         f"{list(d.temporal_upscale)}")
    s, t = 2 ** sum(map(bool, d.spatial_upscale)), 2 ** sum(map(bool, d.temporal_upscale))
    if (s, t) != (c.spatial_factor, c.temporal_factor):
        raise ValueError(
            f"the light decoder up-samples {s}x in space and {t}x in time but the encoder compresses "
            f"{c.spatial_factor}x and {c.temporal_factor}x: set model.vae.light_decoder.spatial_upscale / "
            f"temporal_upscale to {sum(c.spatial_down)} and {sum(c.temporal_down)} true flags "
            f"(of {len(d.channels)} stages)")
    if d.latent_channels != c.latent_channels:
        raise ValueError(f"model.vae.light_decoder.latent_channels ({d.latent_channels}) must equal "
                         f"model.vae.causal.latent_channels ({c.latent_channels})")


class VAEEncoderPart(nnx.Module):
    """Encoder + ``quant_conv``: ``encode(video [B, 3, F, H, W] in [-1, 1]) -> DiagonalGaussian``."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(cfg, CausalVAEConfig):
            raise TypeError("VAEEncoderPart takes the VAEConfig (model.vae), not its CausalVAEConfig part")
        c = cfg.causal
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = CausalVAEEncoder(c, **kw)
        self.quant_conv = _cconv(2 * c.latent_channels, 2 * c.latent_channels, 1, **kw)

    def encode(self, video: jax.Array) -> DiagonalGaussian:
        return CausalVideoVAE.encode(self, video)  # the same code path as the whole VAE

    _check_video = CausalVideoVAE._check_video

    def __call__(self, video: jax.Array) -> DiagonalGaussian:
        return self.encode(video)


class VAEDecoderPart(nnx.Module):
    """``post_quant_conv`` + decoder: ``decode(z [B, L, T, h, w]) -> video [B, 3, F, H, W]`` (not clipped)."""

    def __init__(self, cfg: VAEConfig, *, decoder: Literal["native", "light"] | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        from neodragon_jax.models.vae.light_decoder import LightDecoder

        if isinstance(cfg, CausalVAEConfig):
            raise TypeError("VAEDecoderPart takes the VAEConfig (model.vae), not its CausalVAEConfig part")
        kind = decoder or cfg.decoder
        if kind not in ("native", "light"):
            raise ValueError(f"decoder must be 'native' or 'light', got {kind!r}")
        if kind == "light":
            check_light_factors(cfg)
        c = cfg.causal
        self.cfg = cfg
        self.decoder_kind = kind
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_quant_conv = _cconv(c.latent_channels, c.latent_channels, 1, **kw)
        self.decoder = CausalVAEDecoder(c, **kw) if kind == "native" else LightDecoder(cfg.light_decoder, **kw)

    def decode(self, z: jax.Array) -> jax.Array:
        return CausalVideoVAE.decode(self, z)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.decode(z)

    def decode_stream(self, z: jax.Array) -> jax.Array:
        """The light decoder one latent frame at a time (``LightDecoder.step``, what a phone runs), frames
        concatenated: equals :meth:`decode` up to float rounding."""
        if self.decoder_kind != "light":
            raise ValueError("streaming decode is the light decoder's; this part has the native decoder")
        b, _, t, h, w = z.shape
        x = self.post_quant_conv(_cl(z.astype(self.dtype)))  # [B, T, h, w, L]
        dec = self.decoder
        state = dec.init_state(b, h, w, x.dtype)
        outs = []
        for i in range(t):
            state, y = dec.step(state, jnp.transpose(x[:, i], (0, 3, 1, 2)), first=i == 0)
            outs.append(y)
        return jnp.concatenate(outs, axis=2)


def join_parts(encoder: VAEEncoderPart, decoder: VAEDecoderPart) -> CausalVideoVAE:
    """One :class:`CausalVideoVAE` (``decoder.decoder_kind``) holding both parts' weights (e.g. to export the
    asymmetric VAE in the official layout, or to use it in a pipeline)."""
    if encoder.cfg.causal != decoder.cfg.causal:
        raise ValueError("the encoder and decoder parts were built for different model.vae.causal configs")
    cfg = decoder.cfg
    vae = nnx.eval_shape(lambda: CausalVideoVAE(cfg, decoder=decoder.decoder_kind, dtype=decoder.dtype,
                                                rngs=nnx.Rngs(0)))
    state = nnx.state(vae)
    pure = nnx.to_pure_dict(state)
    pure.update(nnx.to_pure_dict(nnx.state(encoder)))
    pure.update(nnx.to_pure_dict(nnx.state(decoder)))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(vae, state)
    return vae


__all__ = ["VAEDecoderPart", "VAEEncoderPart", "check_light_factors", "join_parts"]
