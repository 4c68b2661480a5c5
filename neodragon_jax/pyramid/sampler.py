"""Autoregressive pyramidal flow-matching sampler with classifier-free guidance (spec §1.3 steps 5-7, §3.6).

Generation runs unit by unit (unit 0 = the first latent frame, then ``frames_per_unit`` frames per unit)
and, inside a unit, stage by stage (coarsest first):

* Noise: ONE full-resolution eps ~ N(0, I) [B, C, F, H, W] is drawn from the noise key and reduced
  S-1 times by (2x2 mean) x 2 (unit variance kept); unit u starts stage 0 from its frames of this
  coarsest level.
* Stage k > 0 starts with the jump of spec §3.3 (nearest 2x, alpha, block noise, beta); the block noise of
  (unit u, stage k) uses ``fold_in(jump_key, u * S + k)``; (noise_key, jump_key) = split(key).
* History: the clean generated latents so far (full resolution, float32) are reduced by plain 2x2 mean
  into a pyramid and sliced by ``history.history_layout`` (most recent unit at the current stage, older
  ones coarser, stage 0 for the rest).
* Euler: x <- x + (sigma_{j+1} - sigma_j) v with the stage's inference timesteps, in float32; only the
  model inputs are cast to ``model_dtype``. With CFG (scale > 0, as the official pipelines decide) the
  model sees the batch [uncond, cond] and v = v_u + w (v_c - v_u).
* Image-to-video / hybrid: a caller-supplied first-frame latent is unit 0 (not generated).

The per-(unit, stage) Euler step is jitted on its static shapes and cached on the sampler (the jump is one
module-level jitted function shared by all samplers): a second video with the same shapes reuses every
compiled step (``num_traces`` counts step traces, ``cache_size()`` the compiled variants).

Returns normalised latents [B, C, F, H, W]; denormalisation and decoding happen elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config.schema import SamplingConfig
from neodragon_jax.pyramid.history import build_history, num_units, unit_frames
from neodragon_jax.pyramid.loss import TextCondition
from neodragon_jax.pyramid.pyramids import latent_pyramid, noise_pyramid
from neodragon_jax.pyramid.scheduler import PyramidSchedule, stage_jump

Model = Callable[..., jax.Array]

# The jump does not depend on the model: one compiled variant per (schedule, stage, shape) for all samplers.
_jump = jax.jit(stage_jump, static_argnames=("schedule", "stage"))


class SampleOutput(NamedTuple):
    """latents [B, C, F, H, W] float32 (normalised); nfe = model calls counting CFG as 2;
    intermediates: {(unit, stage): end-of-stage latent} when requested, else None."""

    latents: jax.Array
    nfe: int
    intermediates: dict[tuple[int, int], jax.Array] | None


def unit_settings(
    unit: int,
    *,
    first_unit_steps: Sequence[int],
    later_unit_steps: Sequence[int],
    first_unit_cfg: float,
    later_unit_cfg: float,
) -> tuple[tuple[int, ...], float]:
    """(steps per stage, CFG scale) of ``unit``: unit 0 uses the first-unit settings."""
    if unit == 0:
        return tuple(int(n) for n in first_unit_steps), float(first_unit_cfg)
    return tuple(int(n) for n in later_unit_steps), float(later_unit_cfg)


def count_nfe(
    num_frames: int,
    *,
    first_unit_steps: Sequence[int],
    later_unit_steps: Sequence[int],
    first_unit_cfg: float = 0.0,
    later_unit_cfg: float = 0.0,
    frames_per_unit: int = 1,
    first_frame_given: bool = False,
) -> int:
    """Model evaluations of a sampling run (each CFG step counts 2): e.g. 7 frames, 20-20-20 then 10-10-10
    with CFG -> (3*20 + 6*3*10)*2 = 480; 1-1-1 without CFG -> 21 (18 with a given first frame)."""
    total = 0
    for u in range(1 if first_frame_given else 0, num_units(num_frames, frames_per_unit)):
        steps, w = unit_settings(
            u,
            first_unit_steps=first_unit_steps,
            later_unit_steps=later_unit_steps,
            first_unit_cfg=first_unit_cfg,
            later_unit_cfg=later_unit_cfg,
        )
        total += sum(steps) * (2 if w > 0 else 1)
    return total


def sampling_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(noise_key, jump_key) of a sampling run."""
    k = jax.random.split(key)
    return k[0], k[1]


def sampling_noise(key: jax.Array, shape: tuple[int, ...], schedule: PyramidSchedule) -> list[jax.Array]:
    """Noise pyramid (coarsest first) of the full-resolution eps [B, C, F, H, W] a run with ``key`` draws.

    The sampler uses only level 0 (the coarsest); the finer levels are what training pairs with it.
    """
    noise_key, _ = sampling_keys(key)
    return noise_pyramid(jax.random.normal(noise_key, shape, jnp.float32), schedule.num_stages)


def _as_key(key_or_seed) -> jax.Array:
    if isinstance(key_or_seed, (int, np.integer)):
        return jax.random.key(int(key_or_seed))
    return key_or_seed


def _check_condition(c: TextCondition, name: str, batch: int | None = None) -> TextCondition:
    if not isinstance(c, TextCondition):
        if isinstance(c, (tuple, list)) and len(c) == 3:
            c = TextCondition(*c)
        else:
            raise TypeError(f"{name} must be a TextCondition(tokens, mask, pooled), got {type(c).__name__}")
    c = TextCondition(*(jnp.asarray(a) for a in c))
    B = c.tokens.shape[0]
    if c.tokens.ndim != 3 or c.mask.shape != c.tokens.shape[:2] or c.pooled.ndim != 2 or c.pooled.shape[0] != B:
        raise ValueError(
            f"{name}: expected tokens [B,S,D], mask [B,S], pooled [B,P]; got {c.tokens.shape}, "
            f"{c.mask.shape}, {c.pooled.shape}"
        )
    if batch is not None and B != batch:
        if B != 1:
            raise ValueError(f"{name} has batch {B}; expected 1 (broadcast) or {batch}")
        c = TextCondition(*(jnp.broadcast_to(a, (batch,) + a.shape[1:]) for a in c))
    return c


class PyramidSampler:
    """Samples latent videos from a pyramidal flow-matching model; holds the compiled-step cache.

    model: nnx.Module or plain callable with the MMDiT interface
    ``model(clips, text_tokens, text_mask, pooled, timestep) -> velocity of the last clip``.
    An nnx module is split once per ``sample`` call and its state passed to the jitted step, so weights
    are arguments (never baked into the compiled program) and updated weights need no recompilation.
    """

    def __init__(self, model: Model, schedule: PyramidSchedule, *, model_dtype: Any = None):
        self.model = model
        self.schedule = schedule
        self.model_dtype = None if model_dtype is None else jnp.dtype(model_dtype)
        self.num_traces = 0
        self._step = jax.jit(self._step_impl, static_argnames=("graphdef", "cfg", "unit", "stage"))

    # ---------------------------------------------------------------------------------- jitted pieces
    def _step_impl(self, state, x, generated, tokens, mask, pooled, t, dsigma, scale, *, graphdef, cfg, unit, stage):
        """One Euler step of (unit, stage). ``generated``: the video buffer [B, C, F, H, W] whose frames
        before ``unit`` hold the clean latents generated (or given) so far.

        The history pyramid is rebuilt inside the step (a few 2x2 means, negligible next to the model) so a
        unit needs no eager glue ops whose shapes change every unit.
        """
        self.num_traces += 1  # runs only while tracing: counts compilations
        model = self.model if graphdef is None else nnx.merge(graphdef, state)
        clips = []
        if unit > 0:
            past = generated[:, :, : unit_frames(unit, self.schedule.frames_per_unit)[0]]
            pyramid = latent_pyramid(past, self.schedule.num_stages)
            clips = build_history(pyramid, unit, stage, frames_per_unit=self.schedule.frames_per_unit)
        B = x.shape[0]
        if cfg:
            x_in = jnp.concatenate([x, x], axis=0)
            clips = [jnp.concatenate([c, c], axis=0) for c in clips]
        else:
            x_in = x
        if self.model_dtype is not None:
            x_in = x_in.astype(self.model_dtype)
            clips = [c.astype(self.model_dtype) for c in clips]
        timestep = jnp.full((x_in.shape[0],), t, jnp.float32)
        v = model(list(clips) + [x_in], tokens, mask, pooled, timestep)
        if v.shape != x_in.shape:
            raise ValueError(f"model returned velocity of shape {v.shape}; expected {x_in.shape}")
        v = v.astype(jnp.float32)
        if cfg:
            v_u, v_c = v[:B], v[B:]
            v = v_u + scale * (v_c - v_u)
        return x + dsigma * v

    def cache_size(self) -> int:
        """Number of compiled Euler-step variants held by this sampler (one per (unit, stage, CFG) shape)."""
        return self._step._cache_size()

    # ------------------------------------------------------------------------------------------ sample
    def sample(
        self,
        cond: TextCondition,
        *,
        num_frames: int,
        height: int,
        width: int,
        key: jax.Array | int,
        first_unit_steps: Sequence[int],
        later_unit_steps: Sequence[int],
        first_unit_cfg: float = 0.0,
        later_unit_cfg: float = 0.0,
        uncond: TextCondition | None = None,
        first_frame: jax.Array | None = None,
        channels: int = 16,
        return_intermediates: bool = False,
        progress: Callable[[int, int, int], None] | None = None,
    ) -> SampleOutput:
        """Generate a latent video [B, C, num_frames, height, width] (latent units, full resolution).

        cond / uncond: TextCondition with tokens [B,S,D], mask [B,S], pooled [B,P] (uncond may have B=1);
        uncond (the negative/empty prompt) is required when a used CFG scale is > 0.
        first_frame: optional [B, C, 1, H, W] normalised latent used as unit 0 (image-to-video, hybrid).
        key: PRNG key or int seed; the run is a deterministic function of it.
        progress: optional ``progress(unit, stage, num_units)`` called after each finished stage.
        """
        sch = self.schedule
        S, fpu = sch.num_stages, sch.frames_per_unit
        U = num_units(num_frames, fpu)
        sch.stage_hw(0, height, width)
        for name, steps in (("first_unit_steps", first_unit_steps), ("later_unit_steps", later_unit_steps)):
            if len(steps) != S or any(int(n) < 1 for n in steps):
                raise ValueError(f"{name} must give a positive step count for each of the {S} stages, got {steps}")
        cond = _check_condition(cond, "cond")
        B = cond.tokens.shape[0]
        start_unit = 0
        if first_frame is not None:
            first_frame = jnp.asarray(first_frame, jnp.float32)
            if first_frame.shape != (B, channels, 1, height, width):
                raise ValueError(
                    f"first_frame must be [B, C, 1, H, W] = {(B, channels, 1, height, width)}, got {first_frame.shape}"
                )
            start_unit = 1
        used_cfg = [
            unit_settings(u, first_unit_steps=first_unit_steps, later_unit_steps=later_unit_steps,
                          first_unit_cfg=first_unit_cfg, later_unit_cfg=later_unit_cfg)[1]
            for u in range(start_unit, U)
        ]
        cfg_cond = None
        if any(w > 0 for w in used_cfg):
            if uncond is None:
                raise ValueError(
                    "CFG scale > 0 needs uncond= (the negative/empty-prompt TextCondition); "
                    "pass it or set the CFG scales to 0"
                )
            uncond = _check_condition(uncond, "uncond", batch=B)
            if uncond.tokens.shape[1:] != cond.tokens.shape[1:] or uncond.pooled.shape != cond.pooled.shape:
                raise ValueError(f"uncond shapes {uncond.tokens.shape} / {uncond.pooled.shape} differ from cond's")
            cfg_cond = TextCondition(*(jnp.concatenate([u_, c_], axis=0) for u_, c_ in zip(uncond, cond)))

        if isinstance(self.model, nnx.Module):
            graphdef, state = nnx.split(self.model)
        else:
            graphdef, state = None, None

        key = _as_key(key)
        noise_key, jump_key = sampling_keys(key)
        eps0 = noise_pyramid(
            jax.random.normal(noise_key, (B, channels, num_frames, height, width), jnp.float32), S
        )[0]

        # One video buffer, filled unit by unit: every step of the run sees the same buffer shape.
        video = jnp.zeros((B, channels, num_frames, height, width), jnp.float32)
        if first_frame is not None:
            video = jax.lax.dynamic_update_slice(video, first_frame, (0, 0, 0, 0, 0))
        intermediates: dict[tuple[int, int], jax.Array] | None = {} if return_intermediates else None
        nfe = 0
        for u in range(start_unit, U):
            steps, w = unit_settings(
                u,
                first_unit_steps=first_unit_steps,
                later_unit_steps=later_unit_steps,
                first_unit_cfg=first_unit_cfg,
                later_unit_cfg=later_unit_cfg,
            )
            use_cfg = w > 0
            text = cfg_cond if use_cfg else cond
            a, b = unit_frames(u, fpu)
            x = jax.lax.dynamic_slice_in_dim(eps0, a, b - a, axis=2)
            for s in range(S):
                if s > 0:
                    x = _jump(x, jax.random.fold_in(jump_key, u * S + s), schedule=sch, stage=s)
                ts, sigmas = sch.inference_timesteps(s, steps[s])
                for j in range(steps[s]):
                    x = self._step(
                        state, x, video, text.tokens, text.mask, text.pooled,
                        ts[j], sigmas[j + 1] - sigmas[j], np.float32(w),
                        graphdef=graphdef, cfg=use_cfg, unit=u, stage=s,
                    )
                    nfe += 2 if use_cfg else 1
                if intermediates is not None:
                    intermediates[(u, s)] = x
                if progress is not None:
                    progress(u, s, U)
            video = jax.lax.dynamic_update_slice(video, x, (0, 0, a, 0, 0))
        return SampleOutput(video, nfe, intermediates)


def sample_video(
    model: Model,
    cond: TextCondition,
    *,
    schedule: PyramidSchedule,
    sampling: SamplingConfig,
    num_frames: int,
    height: int,
    width: int,
    uncond: TextCondition | None = None,
    first_frame: jax.Array | None = None,
    key: jax.Array | int | None = None,
    channels: int = 16,
    model_dtype: Any = None,
    sampler: PyramidSampler | None = None,
) -> SampleOutput:
    """``PyramidSampler.sample`` with steps/CFG from ``sampling``; key defaults to ``sampling.seed``.

    Pass a long-lived ``sampler`` to reuse its compiled steps across videos.
    """
    if sampler is None:
        sampler = PyramidSampler(model, schedule, model_dtype=model_dtype)
    elif sampler.model is not model or sampler.schedule != schedule:
        raise ValueError("the given sampler was built for another model or schedule")
    return sampler.sample(
        cond,
        num_frames=num_frames,
        height=height,
        width=width,
        key=sampling.seed if key is None else key,
        first_unit_steps=sampling.first_unit_steps,
        later_unit_steps=sampling.later_unit_steps,
        first_unit_cfg=sampling.first_unit_cfg,
        later_unit_cfg=sampling.later_unit_cfg,
        uncond=uncond,
        first_frame=first_frame,
        channels=channels,
    )
