"""``dmd``: Pyramidal Distribution Matching Distillation (spec §7.2): a generator that samples with ONE Euler step
per pyramid stage, trained against the frozen teacher's CFG velocity and a fake score that tracks the generator.

Roles: ``real_score`` (frozen teacher, queried with CFG), ``fake_score`` (trained, initialised from the teacher)
and ``generator`` (trained with EMA, initialised from the teacher, from a run, or pruned: ``generator_blocks``).
One train step runs, in order: the fake score ``fake_updates`` times, then the generator once. For each
(stage, unit) group of the batch (data: videos the teacher generated, ``neodragon synthesize``):

* the generator takes the stage start ``x_s`` (history = the data's past frames) at ``sigma_l = 1`` and its clean
  estimate of the stage's latent is ``z~ = x_s - sigma_s / (sigma_s - sigma_e) * v_G``;
* :func:`renoise` puts ``z~`` back on the stage's path at local level ``tau_l`` with the training construction
  (same noise at both ends: ``y_start = (1 - sigma_s) Up(Down(z~)) + sigma_s eps``, ``y_end = (1 - sigma_e) z~ +
  sigma_e eps``, ``x_tau = tau_l y_start + (1 - tau_l) y_end``);
* generator: ``tau_l`` from the fixed ``levels``; the DMD gradient ``w (v_real - v_fake) dz~/dtheta`` with
  ``w = 1 / mean|v_real - (y_start - y_end)|`` (samples where the teacher is accurate weigh more), written as the
  surrogate ``0.5 |z~ - sg(z~ - w (v_real - v_fake))|^2``, plus ``reg_weight * log(1 + mean|z~ - Down(z)|^2)``;
* fake score: pyramidal flow matching on the detached ``z~`` at ``tau_l ~ U(0, 1)``.

CFG convention (pinned; the sampler's): ``v = v_uncond + w (v_cond - v_uncond)`` with the empty prompt's
features as the unconditional branch, ``w`` = ``cfg_first`` on the first latent unit and ``cfg_later`` after it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.pyramid.history import build_history, unit_frames
from neodragon_jax.pyramid.loss import NULL_KEYS, LossGroup, TextCondition, null_text_condition, per_sample_mse
from neodragon_jax.pyramid.pyramids import downsample_2x, latent_pyramid, noise_pyramid, upsample_2x
from neodragon_jax.pyramid.scheduler import PyramidSchedule
from train.flow_matching import FlowMatchingStage, _sharded_model, switch_value_and_grad, take_rows
from train.roles import Frozen, Models, Trained, Update

DEFAULT_LEVELS = (0.125, 0.375, 0.625, 0.875)


@dataclasses.dataclass(frozen=True)
class DMDSettings:
    """``cfg.stages.dmd`` (``--set stages.dmd.fake_updates=5``)."""

    STUDENT_BLOCKS: ClassVar[str] = "generator_blocks"  # the field the plan's depth probe scales

    teacher: str = "release:tiny-teacher"  # the real score (frozen), and the default init of the other two
    generator_init: str = ""  # "" = the teacher (pruned to generator_blocks when set); or run:/official:
    fake_init: str = ""  # "" = the teacher
    generator_blocks: tuple[int, ...] = ()  # the generator keeps these teacher blocks (a pruned student)
    fake_updates: int = 2  # fake-score updates per generator update (the paper 2; DMD2 peers up to 5)
    levels: tuple[float, ...] = DEFAULT_LEVELS  # local levels tau_l of the generator's re-noising
    cfg_first: float = -1.0  # real-score CFG on the first latent unit; < 0 = sampling.first_unit_cfg
    cfg_later: float = -1.0  # on later units; < 0 = sampling.later_unit_cfg
    reg_weight: float = 0.5  # Cauchy regression log(1 + |z~ - Down(z)|^2)
    generator_lr: float = 0.0  # 0 = optim.lr
    fake_lr: float = 0.0  # 0 = optim.lr


def stage_endpoints(x0: jax.Array, eps: jax.Array, schedule: PyramidSchedule, stage: int):
    """``(y_start, y_end)`` of ``stage`` for the clean stage latent ``x0`` and noise ``eps`` at the stage's
    resolution, as the training construction builds them (the coarser clean latent is ``Down(x0)``)."""
    s, S = stage, schedule.num_stages
    sig_s, sig_e = schedule.start_sigmas[s], schedule.end_sigmas[s]
    y_start = eps if s == 0 else sig_s * eps + (1.0 - sig_s) * upsample_2x(downsample_2x(x0))
    y_end = x0 if s == S - 1 else sig_e * eps + (1.0 - sig_e) * x0
    return y_start, y_end


def renoise(x0: jax.Array, eps: jax.Array, tau_l: jax.Array, schedule: PyramidSchedule, stage: int):
    """``(x_tau, flow target y_start - y_end, timestep)``: ``x0`` put back on the stage's path at local level
    ``tau_l`` [B] with the same ``eps`` at both ends."""
    y_start, y_end = stage_endpoints(x0, eps, schedule, stage)
    tl = tau_l.reshape((-1,) + (1,) * (x0.ndim - 1))
    return tl * y_start + (1.0 - tl) * y_end, y_start - y_end, schedule.timestep(stage, tau_l)


def draw_levels(u: jax.Array, levels) -> jax.Array:
    """One of the fixed local ``levels`` per uniform draw ``u`` in [0, 1) (each with probability 1/len)."""
    lv = jnp.asarray(levels, jnp.float32)
    return lv[jnp.minimum((u * len(levels)).astype(jnp.int32), len(levels) - 1)]


def clean_estimate(x_start: jax.Array, v: jax.Array, schedule: PyramidSchedule, stage: int) -> jax.Array:
    """The generator's clean estimate of the stage latent from its velocity at the stage start (spec §7.2)."""
    sig_s, sig_e = schedule.start_sigmas[stage], schedule.end_sigmas[stage]
    return x_start - (sig_s / (sig_s - sig_e)) * v


def cfg_velocity(v_pair: jax.Array, scale: float) -> jax.Array:
    """Rows ``[uncond; cond]`` of one model call -> ``v_u + scale (v_c - v_u)`` (the sampler's convention)."""
    b = v_pair.shape[0] // 2
    v_u, v_c = v_pair[:b], v_pair[b:]
    return v_u + scale * (v_c - v_u)


def dmd_generator_terms(z_hat, v_real, v_fake, flow_target, target_latent, reg_weight: float):
    """Per-sample generator loss (surrogate whose gradient is ``w (v_real - v_fake) dz~``) and its parts."""
    v_real, v_fake, flow_target = (jax.lax.stop_gradient(x) for x in (v_real, v_fake, flow_target))
    axes = tuple(range(1, z_hat.ndim))
    weight = 1.0 / (jnp.mean(jnp.abs(v_real - flow_target), axis=axes, keepdims=True) + 1e-6)
    grad = weight * (v_real - v_fake)
    dmd = 0.5 * jnp.sum(jnp.square(z_hat - jax.lax.stop_gradient(z_hat - grad)), axis=axes) / z_hat[0].size
    reg = jnp.log1p(per_sample_mse(z_hat, target_latent))
    return dmd + reg_weight * reg, {"dmd": dmd, "regression": reg, "weight": weight.reshape(-1),
                                    "score_gap": jnp.mean(jnp.abs(v_real - v_fake), axis=axes)}


class PyramidalDMD(FlowMatchingStage):
    """See the module docstring."""

    name = "dmd"
    settings_class = DMDSettings

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        s = self.settings
        if s.fake_updates < 1:
            raise ValueError(f"stages.dmd.fake_updates must be >= 1, got {s.fake_updates}")
        if not s.levels or any(not 0.0 < float(t) <= 1.0 for t in s.levels):
            raise ValueError(f"stages.dmd.levels must be local levels in (0, 1], got {list(s.levels)}")
        if s.generator_blocks:
            from train.pruning import student_blocks

            student_blocks(dataclasses.replace(_Kept(), kept=tuple(s.generator_blocks)), cfg.model.mmdit.num_layers)
        self.cfg_scales = (float(cfg.sampling.first_unit_cfg) if s.cfg_first < 0 else float(s.cfg_first),
                           float(cfg.sampling.later_unit_cfg) if s.cfg_later < 0 else float(s.cfg_later))
        self.levels = tuple(float(t) for t in s.levels)

    # -- roles -------------------------------------------------------------------------------------------
    def roles(self, cfg: Config):
        s = self.settings
        overrides, gen_init = (), s.generator_init or s.teacher
        if s.generator_blocks:
            from train.pruning import student_overrides

            overrides = student_overrides(s.generator_blocks)
            gen_init = s.generator_init or f"prune:real_score[{','.join(map(str, s.generator_blocks))}]"
        lr = lambda x: {"lr": x} if x > 0 else None  # noqa: E731
        return {
            "real_score": Frozen(self._mmdit, init=s.teacher),
            "fake_score": Trained(self._mmdit, init=s.fake_init or s.teacher, optim=lr(s.fake_lr), ema=0.0),
            "generator": Trained(self._mmdit, overrides=overrides, init=gen_init, optim=lr(s.generator_lr)),
        }

    def updates(self, cfg: Config):
        return (Update(("fake_score",), self._update_loss("fake_score"), repeat=self.settings.fake_updates,
                       name="fake_score"),
                Update(("generator",), self._update_loss("generator"), name="generator"))

    # -- loss --------------------------------------------------------------------------------------------
    def _null(self, batch, cond: TextCondition) -> TextCondition:
        if self.with_null and all(k in batch for k in NULL_KEYS):
            return TextCondition(*(batch[k][:1] for k in NULL_KEYS))
        if self.null_text is not None:
            return TextCondition(*(jnp.asarray(self.null_text[k]) for k in NULL_KEYS))
        return null_text_condition(TextCondition(*(x[:1] for x in cond)))

    def group_losses(self, models, batch, null1: TextCondition, key, g: LossGroup, which: str):
        """Per-sample loss of role ``which`` on group ``g`` and its metrics (per-sample arrays)."""
        gen, fake, real = (_sharded_model(models[k]) for k in ("generator", "fake_score", "real_score"))
        sch = self.schedule
        s, S, fpu = g.stage, sch.num_stages, sch.frames_per_unit
        z = take_rows(batch["latents"], g.indices).astype(jnp.float32)
        cond = TextCondition(*(take_rows(batch[k], g.indices) for k in ("text_tokens", "text_mask", "pooled")))
        B = z.shape[0]
        null = TextCondition(*(jnp.broadcast_to(v, (B,) + v.shape[1:]).astype(c.dtype) for v, c in zip(null1, cond)))
        a, b = unit_frames(g.unit, fpu)
        zp = latent_pyramid(z[:, :, :b], S)
        cur = [lvl[:, :, a:b] for lvl in zp]
        hist = build_history(zp, g.unit, s, frames_per_unit=fpu)
        k_eps, k_eps2, k_u = jax.random.split(key, 3)
        eps = noise_pyramid(jax.random.normal(k_eps, cur[-1].shape, jnp.float32), S)
        sig_s = sch.start_sigmas[s]
        x_start = eps[0] if s == 0 else sig_s * eps[s] + (1.0 - sig_s) * upsample_2x(cur[s - 1])
        t_start = jnp.full((B,), sch.t_max[s], jnp.float32)

        v_g = gen(hist + [x_start], *cond, t_start)
        z_hat = clean_estimate(x_start, v_g, sch, s)
        u = jax.random.uniform(k_u, (B,), jnp.float32)
        eps2 = jax.random.normal(k_eps2, z_hat.shape, jnp.float32)
        if which == "generator":
            tau = draw_levels(u, self.levels)
            x_tau, flow_target, t_tau = renoise(z_hat, eps2, tau, sch, s)
            w_cfg = self.cfg_scales[0] if g.unit == 0 else self.cfg_scales[1]
            dup = lambda x: jnp.concatenate([x, x])  # noqa: E731
            both = TextCondition(*(jnp.concatenate([n, c]) for n, c in zip(null, cond)))
            v_real = cfg_velocity(real([dup(h) for h in hist] + [dup(x_tau)], *both, dup(t_tau)), w_cfg)
            v_fake = fake(hist + [x_tau], *cond, t_tau)
            return dmd_generator_terms(z_hat, v_real, v_fake, flow_target, cur[s], self.settings.reg_weight)
        # The fake score: flow matching on the detached generator sample at a uniform level.
        x_f, target_f, t_f = renoise(jax.lax.stop_gradient(z_hat), eps2, u, sch, s)
        loss = per_sample_mse(fake(hist + [x_f], *cond, t_f), target_f)
        return loss, {"flow": loss}

    def _loss_fns(self, models, batch, rng, which: str):
        """``(variants, loss_for, params, plan_key)`` for role ``which`` (the other roles are constants)."""
        graphdef, params, rest = nnx.split(models[which], nnx.Param, ...)
        b = jnp.shape(batch["latents"])[0]
        cond = TextCondition(batch["text_tokens"], batch["text_mask"], batch["pooled"])
        null1 = self._null(batch, cond)
        k_plan, k_loss = jax.random.split(rng)
        constants = {k: m for k, m in models.items() if k != which}

        def loss_for(groups):
            def run(p):
                mods = dict(constants, **{which: nnx.merge(graphdef, p, rest)})
                per, metrics = [], {}
                for gi, g in enumerate(groups):
                    loss, m = self.group_losses(mods, batch, null1, jax.random.fold_in(k_loss, gi), g, which)
                    per.append(loss)
                    for k, v in m.items():
                        metrics.setdefault(k, []).append(v)
                return jnp.mean(jnp.concatenate(per)), {k: jnp.mean(jnp.concatenate(v)) for k, v in metrics.items()}

            return run

        return self.variants(b), loss_for, params, k_plan

    def _update_loss(self, role: str):
        def loss(models: Models, batch, rng):
            variants, loss_for, params, k_plan = self._loss_fns(models, batch, rng, role)
            (value, metrics), _ = switch_value_and_grad(variants, k_plan, loss_for, params)
            return value, metrics

        return loss

    def loss_fns(self, trainable, frozen, batch, rng):
        """The generator update's loss functions (the larger of the two: ``activation_bytes`` sizes it)."""
        return self._loss_fns({**trainable, **frozen}, batch, rng, "generator")

    def loss(self, trainable, frozen, batch, rng):
        """``{role: loss}`` of both trained roles at the current weights (evaluation; training runs the
        updates in order)."""
        models = Models({**trainable, **frozen})
        out, metrics = {}, {}
        for role in ("fake_score", "generator"):
            out[role], m = self._update_loss(role)(models, batch, rng)
            metrics.update({f"{role}/{k}": v for k, v in m.items()})
        return out, metrics


@dataclasses.dataclass(frozen=True)
class _Kept:
    student: str = ""
    kept: tuple[int, ...] = ()


__all__ = ["DEFAULT_LEVELS", "DMDSettings", "PyramidalDMD", "cfg_velocity", "clean_estimate", "dmd_generator_terms",
           "draw_levels", "renoise", "stage_endpoints"]
