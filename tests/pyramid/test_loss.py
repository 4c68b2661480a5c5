"""Pyramidal flow-matching training loss (spec §3.4-3.5) with mock models."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import PyramidConfig
from neodragon_jax.pyramid import (
    TextCondition,
    apply_text_dropout,
    flow_matching_loss,
    latent_pyramid,
    make_schedule,
    plan_loss_groups,
    pyramid_flow_matching_loss,
    stage_assignment,
    upsample_2x,
)
from neodragon_jax.pyramid.history import history_layout

def rkey(seed: int) -> jax.Array:
    """Test PRNG key. 'rbg' compiles several times faster than threefry on CPU; the code is key-agnostic."""
    return jax.random.key(seed, impl="rbg")


S_TXT, D_TXT, P_DIM = 5, 8, 6


def make_batch(seed, B=4, C=3, F=4, H=8, W=16, *, null=False):
    """Random batch (numpy RNG: test data need no jitted random kernels)."""
    r = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)  # noqa: E731
    batch = {
        "latents": f32(B, C, F, H, W) * 0.8 + 0.2,
        "text_tokens": f32(B, S_TXT, D_TXT),
        "text_mask": jnp.ones((B, S_TXT), jnp.int32),
        "pooled": f32(B, P_DIM),
    }
    if null:
        batch["null_text_tokens"] = jnp.full((S_TXT, D_TXT), 7.0)
        batch["null_text_mask"] = jnp.zeros((S_TXT,), jnp.int32).at[0].set(1)
        batch["null_pooled"] = jnp.full((1, P_DIM), -3.0)
    return batch


def oracle_velocity(sch, zp_all, clips, t, sample_idx=None):
    """Exact v* = start - end from clean latents only: recovers the noise from x and the timestep.

    zp_all: latent pyramid of the clean batch (coarsest first). The stage is read from the current clip's
    size, the unit from the number of history frames (frames_per_unit = 1), sigma_l from t.
    """
    x = clips[-1].astype(jnp.float32)
    S = sch.num_stages
    stage = [lvl.shape[-2:] for lvl in zp_all].index(x.shape[-2:])
    unit = sum(c.shape[2] for c in clips[:-1])
    zc = [lvl[:, :, unit : unit + 1] for lvl in zp_all]
    if sample_idx is not None:
        zc = [jnp.take(lvl, sample_idx, axis=0) for lvl in zc]
    ss, se = sch.start_sigmas[stage], sch.end_sigmas[stage]
    c_s, sig_s = (1.0, 0.0) if stage == 0 else (ss, (1 - ss) * upsample_2x(zc[stage - 1]))
    c_e, sig_e = (0.0, zc[stage]) if stage == S - 1 else (se, (1 - se) * zc[stage])
    sl = sch.local_sigma(stage, t.astype(jnp.float32))[:, None, None, None, None]
    eps = (x - sl * sig_s - (1 - sl) * sig_e) / (sl * c_s + (1 - sl) * c_e)
    return (c_s - c_e) * eps + sig_s - sig_e


@pytest.fixture(scope="module")
def sch():
    return make_schedule(PyramidConfig())


@pytest.mark.parametrize("stage,unit", [(0, 0), (1, 2), (2, 3)])
def test_exact_velocity_oracle_has_zero_loss(sch, stage, unit):
    batch = make_batch(0, null=True)
    zp = latent_pyramid(batch["latents"], 3)

    def model(clips, tokens, mask, pooled, t):
        return oracle_velocity(sch, zp, clips, t)

    @jax.jit
    def run(batch, rng):
        loss, aux = flow_matching_loss(model, batch, rng, schedule=sch, stage=stage, unit=unit)
        # The same oracle with the target sign flipped must be far off.
        wrong, _ = flow_matching_loss(lambda c, *a: -model(c, *a), batch, rng, schedule=sch, stage=stage, unit=unit)
        return loss, wrong, aux

    loss, wrong, aux = run(batch, rkey(1))
    # float32 noise recovery divides by sigma >= 5e-4 at the end of the last stage: allow 1e-6.
    assert float(loss) < 1e-6
    assert float(wrong) > 0.05
    assert aux["loss_per_sample"].shape == (4,)


def test_loss_is_per_sample_mean_then_batch_mean(sch):
    batch = make_batch(2, B=3)
    zp = latent_pyramid(batch["latents"], 3)
    off = jnp.array([0.5, -1.0, 2.0])

    def model(clips, tokens, mask, pooled, t):
        return oracle_velocity(sch, zp, clips, t) + off[:, None, None, None, None]

    loss, aux = jax.jit(
        functools.partial(flow_matching_loss, model, schedule=sch, stage=1, unit=1, text_dropout=0.0)
    )(batch, rkey(3))
    np.testing.assert_allclose(aux["loss_per_sample"], off**2, rtol=1e-4)
    np.testing.assert_allclose(loss, jnp.mean(off**2), rtol=1e-4)
    assert loss.dtype == jnp.float32


@pytest.mark.parametrize("unit", [0, 1, 2, 3, 6])
def test_history_shapes_follow_the_token_table(sch, unit):
    table = {0: (40, 160, 640), 1: (80, 320, 1280), 2: (120, 360, 1440), 3: (160, 400, 1480), 6: (280, 520, 1600)}
    batch = make_batch(4, B=1, C=1, F=7, H=40, W=64)
    for stage in range(3):
        seen = []

        def model(clips, tokens, mask, pooled, t):
            seen.append([c.shape for c in clips])
            return jnp.zeros_like(clips[-1])

        jax.eval_shape(
            functools.partial(flow_matching_loss, model, schedule=sch, stage=stage, unit=unit),
            batch,
            rkey(0),
        )
        tokens = sum(f * (h // 2) * (w // 2) for (_, _, f, h, w) in seen[0])
        assert tokens == table[unit][stage]
        assert seen[0][-1] == (1, 1, 1, 40 >> (2 - stage), 64 >> (2 - stage))


def _capture(sch, batch, rng, **kw):
    """Run the loss under jit with a zero model; return (aux, the model's inputs)."""

    @jax.jit
    def run(batch, rng):
        seen = {}

        def model(clips, tokens, mask, pooled, t):
            seen.update(clips=clips, tokens=tokens, mask=mask, pooled=pooled, t=t)
            return jnp.zeros_like(clips[-1])

        _, aux = flow_matching_loss(model, batch, rng, schedule=sch, **kw)
        return aux, seen

    return run(batch, rng)


def test_history_is_corrupted_clean_pyramid(sch):
    batch = make_batch(5, B=2, C=4, F=4, H=16, W=32)
    zp = latent_pyramid(batch["latents"], 3)
    layout = history_layout(3, 2)

    _, got = _capture(sch, batch, rkey(6), stage=2, unit=3, history_corrupt_ratio=0.0)
    for c, spec in zip(got["clips"][:-1], layout):
        np.testing.assert_array_equal(c, zp[spec.stage][:, :, spec.start : spec.stop])

    aux, got = _capture(sch, batch, rkey(7), stage=2, unit=3)
    sig = np.asarray(aux["history_sigma"])
    assert np.all((sig >= 0) & (sig < 1 / 3))
    # One sigma_c per sample shared by all its clips; the added noise is unit Gaussian.
    resid = []
    for c, spec in zip(got["clips"][:-1], layout):
        clean = zp[spec.stage][:, :, spec.start : spec.stop]
        e = (c - (1 - sig[:, None, None, None, None]) * clean) / sig[:, None, None, None, None]
        resid.append(np.asarray(e).reshape(2, -1))
    e = np.concatenate(resid, axis=1)
    n = e.shape[1]
    assert np.all(np.abs(e.std(axis=1) - 1) < 6 / math.sqrt(2 * n))


def test_text_dropout_uses_the_empty_prompt_or_the_mask_fallback(sch):
    batch = make_batch(8, B=3, null=True)
    kw = dict(stage=0, unit=0)

    aux, got = _capture(sch, batch, rkey(9), text_dropout=1.0, **kw)
    assert bool(aux["text_dropped"].all())
    np.testing.assert_array_equal(got["tokens"], jnp.full((3, S_TXT, D_TXT), 7.0))
    np.testing.assert_array_equal(got["mask"], jnp.broadcast_to(batch["null_text_mask"], (3, S_TXT)))
    np.testing.assert_array_equal(got["pooled"], jnp.full((3, P_DIM), -3.0))

    aux, got = _capture(sch, batch, rkey(9), text_dropout=0.0, **kw)
    assert not bool(aux["text_dropped"].any())
    np.testing.assert_array_equal(got["tokens"], batch["text_tokens"])

    plain = {k: v for k, v in batch.items() if not k.startswith("null_")}
    _, got = _capture(sch, plain, rkey(9), text_dropout=1.0, **kw)
    assert not np.any(np.asarray(got["mask"])) and not np.any(np.asarray(got["pooled"]))

    partial = dict(plain, null_pooled=batch["null_pooled"])
    with pytest.raises(KeyError, match="all of"):
        jax.eval_shape(lambda b: flow_matching_loss(lambda c, *a: c[-1], b, rkey(0), schedule=sch, **kw), partial)


def test_text_dropout_rate():
    B = 20000
    cond = TextCondition(jnp.ones((B, 2, 3)), jnp.ones((B, 2)), jnp.ones((B, 4)))
    out, dropped = apply_text_dropout(cond, rkey(10), 0.1)
    frac = float(dropped.mean())
    assert abs(frac - 0.1) < 5 * math.sqrt(0.1 * 0.9 / B)
    np.testing.assert_array_equal(out.mask.sum(axis=1), np.where(dropped, 0, 2))


def test_stage_assignment_ratios():
    assert stage_assignment(8, (1, 2, 1)) == (0, 1, 1, 2, 0, 1, 1, 2)
    a = stage_assignment(40, (1, 2, 1))
    assert [a.count(s) for s in range(3)] == [10, 20, 10]
    assert stage_assignment(6, (1, 1, 1)) == (0, 1, 2, 0, 1, 2)
    with pytest.raises(ValueError):
        stage_assignment(4, (0, 0, 0))


def test_plan_loss_groups(sch):
    plans = [plan_loss_groups(rkey(i), batch_size=8, num_frames=7, schedule=sch) for i in range(30)]
    assert plans[3] == plan_loss_groups(rkey(3), batch_size=8, num_frames=7, schedule=sch)
    for p in plans:
        assert [g.stage for g in p] == [0, 1, 2]
        assert [len(g.indices) for g in p] == [2, 4, 2]
        assert p[0].unit == p[1].unit == 6 - p[2].unit  # complementary balance
    assert {p[2].unit for p in plans} == set(range(7))  # 30 draws of U{0..6} miss a value w.p. < 0.01
    hash(plans[0])  # static-argument ready
    ind = plan_loss_groups(rkey(0), batch_size=8, num_frames=7, schedule=sch, unit_sampling="independent")
    assert all(0 <= g.unit < 7 for g in ind)


def test_batch_driver_under_jit(sch):
    sch0 = make_schedule(PyramidConfig(text_dropout=0.0))
    B = 8
    batch = make_batch(11, B=B, F=4)
    batch["pooled"] = batch["pooled"].at[:, 0].set(jnp.arange(B, dtype=jnp.float32))
    zp = latent_pyramid(batch["latents"], 3)
    off = jnp.linspace(-1.0, 1.0, B)

    def model(clips, tokens, mask, pooled, t):
        idx = pooled[:, 0].astype(jnp.int32)  # which batch samples this group holds
        return oracle_velocity(sch0, zp, clips, t, sample_idx=idx) + off[idx][:, None, None, None, None]

    groups = plan_loss_groups(rkey(12), batch_size=B, num_frames=4, schedule=sch0)
    fn = jax.jit(
        functools.partial(pyramid_flow_matching_loss, model, schedule=sch0), static_argnames=("groups",)
    )
    loss, aux = fn(batch, rkey(13), groups=groups)
    np.testing.assert_allclose(aux["loss_per_sample"], off**2, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(loss, jnp.mean(off**2), rtol=1e-3)
    for st in range(3):
        idx = [i for i, s in enumerate(stage_assignment(B, (1, 2, 1))) if s == st]
        np.testing.assert_allclose(aux[f"loss/stage{st}"], jnp.mean(off[jnp.array(idx)] ** 2), rtol=1e-3)
    with pytest.raises(ValueError, match="exactly once"):
        pyramid_flow_matching_loss(model, batch, rkey(0), schedule=sch0, groups=groups[:2])


class ToyVelocity(nnx.Module):
    """Per-channel linear map of the noisy clip plus a history summary: enough to train."""

    def __init__(self, channels, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (channels, channels)) * 0.1)
        self.h = nnx.Param(jnp.zeros((channels,)))

    def __call__(self, clips, tokens, mask, pooled, t):
        x = clips[-1]
        v = jnp.einsum("bcfhw,cd->bdfhw", x, self.w[...])
        if len(clips) > 1:
            hist = sum(c.mean(axis=(2, 3, 4)) for c in clips[:-1])  # [B, C]
            v = v + (hist * self.h[...])[:, :, None, None, None]
        return v


def test_nnx_model_gradients(sch):
    batch = make_batch(14, B=4, C=3, F=3)
    model = ToyVelocity(3, rngs=nnx.Rngs(0))

    @nnx.jit(static_argnames=("stage", "unit"))
    def loss_and_grad(model, batch, rng, stage, unit):
        f = lambda m: flow_matching_loss(m, batch, rng, schedule=sch, stage=stage, unit=unit)  # noqa: E731
        return nnx.value_and_grad(f, has_aux=True)(model)

    rng = rkey(15)
    (loss, _), grads = loss_and_grad(model, batch, rng, stage=2, unit=2)
    g = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(grads)])
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    # A small step against the gradient lowers the loss on the same draw.
    nnx.update(model, jax.tree.map(lambda p, d: p - 1e-2 * d, nnx.state(model, nnx.Param), grads))
    (loss2, _), _ = loss_and_grad(model, batch, rng, stage=2, unit=2)
    assert float(loss2) < float(loss)


def test_bad_inputs(sch):
    batch = make_batch(0, F=2)
    model = lambda clips, *a: jnp.zeros_like(clips[-1])  # noqa: E731
    bad = lambda clips, *a: jnp.zeros_like(clips[-1])[:, :, :, :1]  # noqa: E731

    def shape_of(m, **kw):
        return jax.eval_shape(lambda b: flow_matching_loss(m, b, rkey(0), schedule=sch, **kw), batch)

    with pytest.raises(ValueError, match="needs latent frames"):
        shape_of(model, stage=0, unit=3)
    with pytest.raises(ValueError, match="stage"):
        shape_of(model, stage=3, unit=0)
    with pytest.raises(ValueError, match="velocity of shape"):
        shape_of(bad, stage=0, unit=0)
