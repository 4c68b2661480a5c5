"""Pyramidal flow-matching training loss with temporal-pyramid history (spec §3.4-3.5).

One call of ``flow_matching_loss`` trains ONE (stage, unit) group: both are static Python ints because they
decide every clip shape, so a jitted train step compiles once per group layout. ``plan_loss_groups`` splits
a batch into stage columns (config ratios, deterministic by sample index) and draws the unit of each
column from the step key; ``pyramid_flow_matching_loss`` runs the groups and averages per-sample losses
over the whole batch (per-sample mean then batch mean, as the official code does).

Model interface (the MMDiT built elsewhere):
``model(clips, text_tokens [B,S,D], text_mask [B,S], pooled [B,P], timestep [B]) -> velocity [B,C,F,H,W]``
where ``clips`` = history clips oldest -> newest, then the current noisy clip, each [B,C,F_i,H_i,W_i].

Batch (a mapping; arrays are per sample unless stated):
  ``latents``      [B, C, F, H, W] clean, normalised, full-resolution latents (float32).
  ``text_tokens``  [B, S, D];  ``text_mask`` [B, S] (1 = real token);  ``pooled`` [B, P].
  ``null_text_tokens`` [S, D], ``null_text_mask`` [S], ``null_pooled`` [P] (optional, a leading 1 is
      allowed): the empty-prompt conditioning substituted for dropped samples (classifier-free guidance).
      If absent, dropped samples get the mask-based null condition of ``null_text_condition`` (zero tokens,
      all-masked, zero pooled); whichever is used in training must also be the unconditional branch at
      sampling time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neodragon_jax.pyramid.history import build_history, num_units, unit_frames
from neodragon_jax.pyramid.pyramids import latent_pyramid, noise_pyramid, upsample_2x
from neodragon_jax.pyramid.scheduler import PyramidSchedule

Model = Callable[..., jax.Array]

PER_SAMPLE_KEYS = ("latents", "text_tokens", "text_mask", "pooled")
NULL_KEYS = ("null_text_tokens", "null_text_mask", "null_pooled")


class TextCondition(NamedTuple):
    """Text conditioning of the MMDiT: tokens [B, S, D], mask [B, S], pooled [B, P]."""

    tokens: jax.Array
    mask: jax.Array
    pooled: jax.Array


def null_text_condition(like: TextCondition) -> TextCondition:
    """Mask-based null conditioning (zero tokens, mask all 0, zero pooled) shaped like ``like``.

    Used for CFG dropout when no empty-prompt encoding is supplied. With every text position masked the
    MMDiT's image tokens see no text at all (padded positions only attend to each other, spec §2.5), and
    the pooled MLP sees zeros.
    """
    return TextCondition(jnp.zeros_like(like.tokens), jnp.zeros_like(like.mask), jnp.zeros_like(like.pooled))


def _bcast_null(x: jax.Array, target: jax.Array, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim == target.ndim - 1:
        x = x[None]
    if x.ndim != target.ndim or x.shape[0] != 1 or x.shape[1:] != target.shape[1:]:
        raise ValueError(
            f"batch[{name!r}] has shape {x.shape}; expected {target.shape[1:]} (or with a leading 1) to "
            f"match the per-sample conditioning {target.shape}"
        )
    return jnp.broadcast_to(x, target.shape).astype(target.dtype)


def apply_text_dropout(
    cond: TextCondition, key: jax.Array, rate: float, null: TextCondition | None = None
) -> tuple[TextCondition, jax.Array]:
    """Replace each sample's conditioning by ``null`` with probability ``rate``; returns (cond, dropped [B])."""
    B = cond.tokens.shape[0]
    return _drop_text(cond, jax.random.uniform(key, (B,)) < rate, null)


def _drop_text(
    cond: TextCondition, dropped: jax.Array, null: TextCondition | None
) -> tuple[TextCondition, jax.Array]:
    B = cond.tokens.shape[0]
    null = null_text_condition(cond) if null is None else null

    def pick(n, c):
        sel = dropped.reshape((B,) + (1,) * (c.ndim - 1))
        return jnp.where(sel, n.astype(c.dtype), c)

    return TextCondition(*(pick(n, c) for n, c in zip(null, cond))), dropped


def _batch_condition(batch: Mapping[str, Any]) -> tuple[TextCondition, TextCondition | None]:
    missing = [k for k in PER_SAMPLE_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; expected keys {PER_SAMPLE_KEYS} (+ optional {NULL_KEYS})")
    cond = TextCondition(*(jnp.asarray(batch[k]) for k in ("text_tokens", "text_mask", "pooled")))
    present = [k in batch for k in NULL_KEYS]
    if any(present) and not all(present):
        raise KeyError(f"give all of {NULL_KEYS} or none of them (got only {[k for k in NULL_KEYS if k in batch]})")
    null = None
    if all(present):
        null = TextCondition(
            *(_bcast_null(batch[k], c, k) for k, c in zip(NULL_KEYS, cond))
        )
    return cond, null


def _bshape(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class FlowInputs(NamedTuple):
    """What the model sees for one (stage, unit) group, and what it should predict."""

    clips: list            # corrupted history clips oldest -> newest, then the noisy current clip x
    cond: TextCondition    # text condition after dropout
    timestep: jax.Array    # [B] model timestep
    target: jax.Array      # [B, C, F, H, W] velocity target start - end
    aux: dict              # timestep, sigma_l, history_sigma, text_dropped (each [B])


def flow_matching_inputs(
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: PyramidSchedule,
    stage: int,
    unit: int,
    text_dropout: float | None = None,
    history_corrupt_ratio: float | None = None,
) -> FlowInputs:
    """The noisy inputs and velocity target of one (stage, unit) group (jit with ``stage``/``unit`` static).

    For each sample: latent pyramid z_k of frames [0, end of ``unit``) by 2x2 mean; one noise draw eps for
    the current clip and its pyramid eps_k (2x2 mean x 2); stage endpoints (same eps_k at both ends)
    start = eps_0 (stage 0) or sigma_s eps_k + (1 - sigma_s) Up(z_{k-1});
    end = sigma_e eps_k + (1 - sigma_e) z_k (the last stage: end = z);
    n ~ U{0..N-1}, sigma_l = 1 - n/N, x = sigma_l start + (1 - sigma_l) end, target v* = start - end.
    History clips (layout of ``history.history_layout``) are corrupted as sigma_c eps' + (1 - sigma_c) h with
    one sigma_c ~ U(0, corrupt_ratio) per sample shared by its clips and fresh eps' per clip. Text is
    dropped to the null condition with probability ``text_dropout``. Every loss that trains on this
    construction (flow matching, pruning recovery, the DMD fake score) draws its inputs here.
    """
    s = schedule.check_stage(stage)
    S = schedule.num_stages
    fpu = schedule.frames_per_unit
    p_drop = schedule.text_dropout if text_dropout is None else float(text_dropout)
    corrupt = schedule.history_corrupt_ratio if history_corrupt_ratio is None else float(history_corrupt_ratio)

    z = jnp.asarray(batch["latents"]).astype(jnp.float32)
    if z.ndim != 5:
        raise ValueError(f"batch['latents'] must be [B, C, F, H, W], got shape {z.shape}")
    B, _, F, H, W = z.shape
    a, b = unit_frames(unit, fpu)
    if F < b:
        raise ValueError(f"unit {unit} needs latent frames [{a}, {b}) but batch['latents'] has only F={F}")
    schedule.stage_hw(s, H, W)  # validates divisibility
    cond, null = _batch_condition(batch)

    zp = latent_pyramid(z[:, :, :b], S)
    cur = [lvl[:, :, a:b] for lvl in zp]
    history = build_history(zp, unit, s, frames_per_unit=fpu)

    # Two random draws in all (one Gaussian, one uniform), sliced per use: each random call site costs
    # compile time, and the draws are independent anyway.
    k_normal, k_uniform = jax.random.split(rng)
    sizes = [math.prod(cur[-1].shape)] + [math.prod(h.shape) for h in history]
    flat = jax.random.normal(k_normal, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    draws = [flat[o : o + n] for o, n in zip(offsets[:-1], sizes)]
    u = jax.random.uniform(k_uniform, (3, B), jnp.float32)

    eps = noise_pyramid(draws[0].reshape(cur[-1].shape), S)
    sig_s, sig_e = schedule.start_sigmas[s], schedule.end_sigmas[s]
    if s == 0:
        start = eps[0]
    else:
        start = sig_s * eps[s] + (1.0 - sig_s) * upsample_2x(cur[s - 1])
    end = cur[s] if s == S - 1 else sig_e * eps[s] + (1.0 - sig_e) * cur[s]

    sigma_l, t = schedule.training_timesteps(schedule.uniform_to_index(u[0]), s)
    sl = _bshape(sigma_l, 5)
    x = sl * start + (1.0 - sl) * end
    target = start - end

    sig_c = u[1] * corrupt
    sc = _bshape(sig_c, 5)
    history = [sc * d.reshape(h.shape) + (1.0 - sc) * h for d, h in zip(draws[1:], history)]

    if p_drop > 0.0:
        cond, dropped = _drop_text(cond, u[2] < p_drop, null)
    else:
        dropped = jnp.zeros((B,), bool)
    aux = {"timestep": t, "sigma_l": sigma_l, "history_sigma": sig_c, "text_dropped": dropped}
    return FlowInputs(history + [x], cond, t, target, aux)


def per_sample_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 mean squared difference over every axis but the first: [B]."""
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def flow_matching_loss(
    model: Model,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: PyramidSchedule,
    stage: int,
    unit: int,
    text_dropout: float | None = None,
    history_corrupt_ratio: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss of one (stage, unit) group; jit with ``stage``/``unit`` static.

    Inputs and target from :func:`flow_matching_inputs`; the loss is float32 mean((v - v*)^2) per sample,
    then the batch mean.

    Returns (loss, aux) with aux: ``loss_per_sample`` [B], ``timestep`` [B], ``sigma_l`` [B],
    ``history_sigma`` [B], ``text_dropped`` [B].
    """
    inp = flow_matching_inputs(batch, rng, schedule=schedule, stage=stage, unit=unit, text_dropout=text_dropout,
                               history_corrupt_ratio=history_corrupt_ratio)
    v = model(inp.clips, inp.cond.tokens, inp.cond.mask, inp.cond.pooled, inp.timestep)
    if v.shape != inp.target.shape:
        raise ValueError(f"model returned velocity of shape {v.shape}; expected the current clip's {inp.target.shape}")
    per_sample = per_sample_mse(v, inp.target)
    return jnp.mean(per_sample), {"loss_per_sample": per_sample, **inp.aux}


# ------------------------------------------------------------------------------------------ batch driver
@dataclass(frozen=True)
class LossGroup:
    """Samples ``indices`` of the batch train ``stage`` with the current clip at ``unit`` (static ints)."""

    stage: int
    unit: int
    indices: tuple[int, ...]


def stage_assignment(batch_size: int, ratios: Sequence[int]) -> tuple[int, ...]:
    """Stage of each sample: sample i goes to column i mod sum(ratios); columns fill stages in order.

    Ratios (1, 2, 1) give columns (0, 1, 1, 2), so samples 0,4,8.. train stage 0, 1,2,5,6,.. stage 1 and
    3,7,.. stage 2 (the official ``index::column_size`` split). Ratios are exact when ``batch_size`` is a
    multiple of sum(ratios).
    """
    ratios = [int(r) for r in ratios]
    if batch_size < 1 or not ratios or any(r < 0 for r in ratios) or sum(ratios) < 1:
        raise ValueError(
            f"need batch_size >= 1 and non-negative ratios with a positive sum; got {batch_size}, {ratios}"
        )
    columns = [st for st, r in enumerate(ratios) for _ in range(r)]
    return tuple(columns[i % len(columns)] for i in range(batch_size))


def _concrete_int(x) -> int:
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError) as e:
        raise ValueError(
            "plan_loss_groups decides static shapes: call it outside jit with a concrete key "
            "(e.g. jax.random.fold_in(base_key, step)) and pass the plan as a static argument"
        ) from e


def plan_loss_groups(
    key: jax.Array,
    *,
    batch_size: int,
    num_frames: int,
    schedule: PyramidSchedule,
    unit_sampling: str = "complementary",
) -> tuple[LossGroup, ...]:
    """Deterministic (stage, unit) groups of one training step (hashable: use as a static jit argument).

    Stages come from ``stage_assignment`` with the schedule's ratios. Units are drawn from ``key``:
    ``"complementary"`` (default, the official balance): the finest stage gets u ~ U{0..U-1}, every other
    stage U-1-u, so the token count per step stays roughly constant and a run compiles at most U layouts;
    ``"independent"``: each stage draws its own unit.
    """
    U = num_units(num_frames, schedule.frames_per_unit)
    stages = stage_assignment(batch_size, schedule.stage_sample_ratios)
    S = schedule.num_stages
    if unit_sampling == "complementary":
        top = _concrete_int(jax.random.randint(key, (), 0, U))
        units = [U - 1 - top] * (S - 1) + [top]
    elif unit_sampling == "independent":
        units = [_concrete_int(jax.random.randint(jax.random.fold_in(key, st), (), 0, U)) for st in range(S)]
    else:
        raise ValueError(f"unit_sampling must be 'complementary' or 'independent', got {unit_sampling!r}")
    groups = []
    for st in range(S):
        idx = tuple(i for i, g in enumerate(stages) if g == st)
        if idx:
            groups.append(LossGroup(stage=st, unit=units[st], indices=idx))
    return tuple(groups)


def pyramid_flow_matching_loss(
    model: Model,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: PyramidSchedule,
    groups: Sequence[LossGroup],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of a whole batch split into (stage, unit) groups; mean of all per-sample losses.

    ``groups`` (from ``plan_loss_groups``) must be static under jit. Each group gets
    ``fold_in(rng, group_index)``. aux: ``loss/stage{k}`` (mean over that stage's samples) and
    ``loss_per_sample`` [B] in batch order.
    """
    B = jnp.shape(batch["latents"])[0]
    seen = sorted(i for g in groups for i in g.indices)
    if seen != list(range(B)):
        raise ValueError(f"groups must cover each of the {B} batch samples exactly once, got indices {seen}")
    losses, order = [], []
    stage_losses: dict[int, list] = {}
    for gi, g in enumerate(groups):
        idx = np.asarray(g.indices)
        sub = {k: (jnp.asarray(v)[idx] if k in PER_SAMPLE_KEYS else v) for k, v in batch.items()}
        _, aux = flow_matching_loss(
            model, sub, jax.random.fold_in(rng, gi), schedule=schedule, stage=g.stage, unit=g.unit
        )
        losses.append(aux["loss_per_sample"])
        order.extend(g.indices)
        stage_losses.setdefault(g.stage, []).append(aux["loss_per_sample"])
    per_sample = jnp.concatenate(losses)[np.argsort(np.asarray(order))]
    out = {f"loss/stage{st}": jnp.mean(jnp.concatenate(v)) for st, v in sorted(stage_losses.items())}
    out["loss_per_sample"] = per_sample
    return jnp.mean(per_sample), out
