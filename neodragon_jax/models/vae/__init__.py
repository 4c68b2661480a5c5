"""Causal video VAE (Pyramid Flow encoder / native decoder), Neodragon's light decoder, latent normalisation."""

from neodragon_jax.models.vae.causal_vae import (
    AsymmetricVAE,
    CausalVAEDecoder,
    CausalVAEEncoder,
    CausalVideoVAE,
    DiagonalGaussian,
)
from neodragon_jax.models.vae.light_decoder import LightDecoder
from neodragon_jax.models.vae.normalize import denormalize_latents, latent_frames, normalize_latents, video_frames
from neodragon_jax.models.vae.parts import VAEDecoderPart, VAEEncoderPart, join_parts

__all__ = [
    "AsymmetricVAE", "CausalVAEDecoder", "CausalVAEEncoder", "CausalVideoVAE", "DiagonalGaussian", "LightDecoder",
    "VAEDecoderPart", "VAEEncoderPart", "denormalize_latents", "join_parts", "latent_frames", "normalize_latents",
    "video_frames",
]
