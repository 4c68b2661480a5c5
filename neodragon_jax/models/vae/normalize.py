"""Latent normalisation of the causal VAE and frame-count helpers (spec §1.3 steps 4 and 7, §5.1).

The first latent frame (an image) and the later frames (video) use different constants:
``z' = (z - shift) * scale`` with (image_shift, image_scale) = (0.1490, 0.5430) for frame 0 and
(video_shift, video_scale) = (-0.2343, 0.3031) for frames 1.. (Neodragon decode; Pyramid Flow trains with
1/3.0986). Latents are ``[B, L, T, h, w]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neodragon_jax.config.schema import CausalVAEConfig, VAEConfig


def _causal(cfg: CausalVAEConfig | VAEConfig) -> CausalVAEConfig:
    return cfg.causal if isinstance(cfg, VAEConfig) else cfg


def _per_frame(z: jax.Array, cfg, first_frame_is_image: bool) -> tuple[jax.Array, jax.Array]:
    """Per-frame ``(shift, scale)`` broadcastable against ``[B, L, T, h, w]``."""
    c = _causal(cfg)
    if z.ndim != 5:
        raise ValueError(f"latents must be [B, L, T, h, w], got shape {z.shape}")
    t = z.shape[2]
    is_image = (jnp.arange(t) == 0) & first_frame_is_image
    shift = jnp.where(is_image, c.image_shift, c.video_shift).astype(jnp.float32)
    scale = jnp.where(is_image, c.image_scale, c.video_scale).astype(jnp.float32)
    return shift[None, None, :, None, None], scale[None, None, :, None, None]


def normalize_latents(
    z: jax.Array, cfg: CausalVAEConfig | VAEConfig, *, first_frame_is_image: bool = True
) -> jax.Array:
    """Raw VAE latents -> DiT space. Frame 0: ``(z - 0.1490) * 0.5430``; later: ``(z + 0.2343) * video_scale``.

    ``first_frame_is_image=False`` treats every frame as a video frame (a clip that does not start at
    frame 0 of its video).
    """
    shift, scale = _per_frame(z, cfg, first_frame_is_image)
    return ((z.astype(jnp.float32) - shift) * scale).astype(z.dtype)


def denormalize_latents(
    z: jax.Array, cfg: CausalVAEConfig | VAEConfig, *, first_frame_is_image: bool = True
) -> jax.Array:
    """Inverse of :func:`normalize_latents`: frame 0 ``z / 0.5430 + 0.1490``, later ``z / video_scale - 0.2343``."""
    shift, scale = _per_frame(z, cfg, first_frame_is_image)
    return (z.astype(jnp.float32) / scale + shift).astype(z.dtype)


def latent_frames(num_frames: int, temporal_factor: int = 8) -> int:
    """Latent frame count of a causal clip: ``1 + 8k`` frames -> ``1 + k`` latents (49 -> 7, 17 -> 3, 1 -> 1)."""
    valid = isinstance(num_frames, int) and not isinstance(num_frames, bool) and num_frames >= 1
    if not valid or (num_frames - 1) % temporal_factor:
        raise ValueError(
            f"the causal VAE needs 1 + {temporal_factor}k video frames (1, {1 + temporal_factor}, "
            f"{1 + 2 * temporal_factor}, ..., 49, ...), got {num_frames!r}; trim or pad the clip to such a length"
        )
    return 1 + (num_frames - 1) // temporal_factor


def video_frames(num_latent_frames: int, temporal_factor: int = 8) -> int:
    """Inverse of :func:`latent_frames`: ``T`` latents decode to ``1 + 8(T - 1)`` frames (7 -> 49, 1 -> 1)."""
    if isinstance(num_latent_frames, bool) or not isinstance(num_latent_frames, int) or num_latent_frames < 1:
        raise ValueError(f"the number of latent frames must be a positive int, got {num_latent_frames!r}")
    return 1 + temporal_factor * (num_latent_frames - 1)
