"""Autoregressive pyramidal sampler (spec §1.3 steps 5-7, §3.6) with mock models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import PyramidConfig, SamplingConfig
from neodragon_jax.pyramid import (
    PyramidSampler,
    TextCondition,
    count_nfe,
    downsample_2x,
    history_layout,
    latent_pyramid,
    make_schedule,
    sample_video,
    sampling_noise,
    upsample_2x,
)

def rkey(seed: int) -> jax.Array:
    """Test PRNG key. 'rbg' compiles several times faster than threefry on CPU; the code is key-agnostic."""
    return jax.random.key(seed, impl="rbg")


B, C, H, W = 2, 4, 8, 8
S_TXT, D_TXT, P_DIM = 3, 4, 5


@pytest.fixture(scope="module")
def sch():
    return make_schedule(PyramidConfig())


def text(value: float, batch=B) -> TextCondition:
    return TextCondition(
        jnp.full((batch, S_TXT, D_TXT), value), jnp.ones((batch, S_TXT), jnp.int32), jnp.full((batch, P_DIM), value)
    )


def clean_video(F, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, C, F, H, W)), jnp.float32)


def strict_oracle(sch, z, key):
    """Velocity oracle that knows the clean video z and the run's noise, and checks what it is given.

    Stage 0 returns start - end with start = the coarsest noise of the unit (right only if the sampler
    started from exactly that slice). Stage k > 0 returns (x - end_k) / sigma_l (the straight path to
    end_k) plus, at sigma_l = 1, Up(pool(x) - alpha_k end_{k-1}), which is zero only if x is a correct jump
    of end_{k-1}. Any history clip that differs from the clean pyramid slice of §3.5 adds its squared error.
    Every wrong input therefore moves the result away from z.
    """
    S = sch.num_stages
    zp = latent_pyramid(z, S)
    eps = sampling_noise(key, z.shape, sch)

    def end_of(stage, unit):
        zc = zp[stage][:, :, unit : unit + 1]
        if stage == S - 1:
            return zc
        se = sch.end_sigmas[stage]
        return se * eps[stage][:, :, unit : unit + 1] + (1 - se) * zc

    def model(clips, tokens, mask, pooled, t):
        x = clips[-1].astype(jnp.float32)
        stage = [lvl.shape[-2:] for lvl in zp].index(x.shape[-2:])
        unit = sum(c.shape[2] for c in clips[:-1])
        end = end_of(stage, unit)
        sl = sch.local_sigma(stage, t)[:, None, None, None, None]
        if stage == 0:
            v = eps[0][:, :, unit : unit + 1] - end
        else:
            jump_err = upsample_2x(downsample_2x(x) - sch.jump_alpha[stage] * end_of(stage - 1, unit))
            v = (x - end) / sl + jnp.where(sl > 0.9999, jump_err, 0.0)
        for c, spec in zip(clips[:-1], history_layout(unit, stage)):
            v = v + jnp.mean(jnp.square(c - zp[spec.stage][:, :, spec.start : spec.stop]))
        return v

    return model, end_of


def test_one_step_oracle_reconstructs_the_clean_latent(sch):
    F = 4
    z = clean_video(F)
    key = rkey(7)
    model, end_of = strict_oracle(sch, z, key)
    sampler = PyramidSampler(model, sch)
    out = sampler.sample(
        text(1.0), num_frames=F, height=H, width=W, key=key, channels=C,
        first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1), return_intermediates=True,
    )
    assert out.latents.shape == (B, C, F, H, W) and out.latents.dtype == jnp.float32
    # Tolerance: float32 rounding through 3 jumps and Euler steps per unit.
    np.testing.assert_allclose(out.latents, z, atol=2e-5)
    for u in range(F):
        for s in range(3):
            np.testing.assert_allclose(out.intermediates[(u, s)], end_of(s, u), atol=2e-5)
    assert out.nfe == count_nfe(F, first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1)) == 12

    # The oracle is strict: built for another noise key it no longer leads to z.
    wrong_model, _ = strict_oracle(sch, z, rkey(8))
    bad = PyramidSampler(wrong_model, sch).sample(
        text(1.0), num_frames=2, height=H, width=W, key=key, channels=C,
        first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1),
    )
    assert float(jnp.abs(bad.latents - z[:, :, :2]).max()) > 0.1


def test_multistep_oracle_with_given_first_frame(sch):
    F = 3
    z = clean_video(F, seed=1)
    key = rkey(3)
    model, _ = strict_oracle(sch, z, key)
    first = z[:, :, :1]
    out = PyramidSampler(model, sch).sample(
        text(1.0), num_frames=F, height=H, width=W, key=key, channels=C,
        first_unit_steps=(5, 5, 5), later_unit_steps=(3, 2, 4), first_frame=first,
    )
    np.testing.assert_array_equal(out.latents[:, :, :1], first)
    # Tolerance: a 3/2/4-step Euler solve along the exact straight path, float32.
    np.testing.assert_allclose(out.latents, z, atol=5e-5)
    assert out.nfe == 2 * 9 == count_nfe(
        F, first_unit_steps=(5, 5, 5), later_unit_steps=(3, 2, 4), first_frame_given=True
    )


def test_nfe_accounting():
    teacher = dict(first_unit_steps=(20, 20, 20), later_unit_steps=(10, 10, 10), first_unit_cfg=7.0, later_unit_cfg=5.0)
    assert count_nfe(7, **teacher) == (3 * 20 + 6 * 3 * 10) * 2 == 480
    assert count_nfe(7, first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1)) == 21
    assert count_nfe(7, first_unit_steps=(4, 4, 4), later_unit_steps=(4, 4, 4)) == 84
    assert count_nfe(7, first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1), first_frame_given=True) == 18


def test_cfg_batch_order_and_scales(sch):
    """Mock velocity = pooled[:, 0]: cond 1.0, uncond -2.0, so guided v = -2 + 3 w reveals the order."""
    seen = []

    def model(clips, tokens, mask, pooled, t):
        seen.append(clips[-1].shape[0])
        return jnp.zeros_like(clips[-1]) + pooled[:, 0, None, None, None, None]

    key = rkey(11)
    F = 3
    out = PyramidSampler(model, sch).sample(
        text(1.0), uncond=text(-2.0, batch=1), num_frames=F, height=H, width=W, key=key, channels=C,
        first_unit_steps=(2, 1, 1), later_unit_steps=(1, 1, 1), first_unit_cfg=7.0, later_unit_cfg=5.0,
        return_intermediates=True,
    )
    assert set(seen) == {2 * B}  # [uncond, cond] batch
    eps0 = sampling_noise(key, (B, C, F, H, W), sch)[0]
    for u, w in [(0, 7.0), (1, 5.0), (2, 5.0)]:
        np.testing.assert_allclose(out.intermediates[(u, 0)], eps0[:, :, u : u + 1] - (-2 + 3 * w), atol=1e-5)
    assert out.nfe == 2 * (4 + 3 + 3)


def _toy(clips, tokens, mask, pooled, t):
    x = clips[-1]
    hist = sum(c.mean() for c in clips[:-1]) if len(clips) > 1 else 0.0
    return 0.5 * x + 0.1 * hist + pooled[:, :1, None, None, None] + 1e-4 * t[:, None, None, None, None]


def test_determinism_and_compile_cache(sch):
    # Integer seeds: the default (threefry) key path.
    sampler = PyramidSampler(_toy, sch)
    kw = dict(num_frames=2, height=H, width=W, channels=C, first_unit_steps=(2, 1, 1), later_unit_steps=(1, 1, 1))
    a = sampler.sample(text(0.3), uncond=text(0.0), key=1, first_unit_cfg=7.0, later_unit_cfg=5.0, **kw)
    traces, cached = sampler.num_traces, sampler.cache_size()
    assert traces > 0 and cached > 0
    b = sampler.sample(text(0.3), uncond=text(0.0), key=1, first_unit_cfg=7.0, later_unit_cfg=5.0, **kw)
    np.testing.assert_array_equal(a.latents, b.latents)
    c = sampler.sample(text(0.3), uncond=text(0.0), key=2, first_unit_cfg=4.0, later_unit_cfg=3.0, **kw)
    assert float(jnp.abs(a.latents - c.latents).max()) > 1e-3
    # Same shapes, new seed and new CFG scales: nothing is traced or compiled again.
    assert sampler.num_traces == traces and sampler.cache_size() == cached


class ToyVelocity(nnx.Module):
    def __init__(self, channels, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (channels, channels)) * 0.1)

    def __call__(self, clips, tokens, mask, pooled, t):
        return jnp.einsum("bcfhw,cd->bdfhw", clips[-1], self.w[...].astype(clips[-1].dtype))


def test_nnx_module_weights_are_arguments(sch):
    model = ToyVelocity(C, rngs=nnx.Rngs(0))
    sampler = PyramidSampler(model, sch)
    kw = dict(
        num_frames=2, height=H, width=W, channels=C, key=rkey(0), first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1)
    )
    a = sampler.sample(text(1.0), **kw)
    traces = sampler.num_traces
    model.w[...] = model.w[...] * 3.0
    b = sampler.sample(text(1.0), **kw)
    assert sampler.num_traces == traces  # new weights, no recompilation
    assert float(jnp.abs(a.latents - b.latents).max()) > 1e-3


def test_model_dtype_only_for_model_inputs(sch):
    dtypes = set()

    def model(clips, tokens, mask, pooled, t):
        dtypes.update(c.dtype for c in clips)
        return 0.5 * clips[-1]

    out = sample_video(
        model, text(1.0), schedule=sch, num_frames=2, height=H, width=W, channels=C,
        sampling=SamplingConfig(
            first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1), first_unit_cfg=0.0, later_unit_cfg=0.0
        ),
        model_dtype=jnp.bfloat16, key=rkey(0),
    )
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert out.latents.dtype == jnp.float32


def test_bad_arguments(sch):
    s = PyramidSampler(_toy, sch)
    kw = dict(num_frames=2, height=H, width=W, channels=C, key=0, later_unit_steps=(1, 1, 1))
    with pytest.raises(ValueError, match="uncond"):
        s.sample(text(1.0), first_unit_steps=(1, 1, 1), first_unit_cfg=7.0, **kw)
    with pytest.raises(ValueError, match="first_unit_steps"):
        s.sample(text(1.0), first_unit_steps=(1, 1), **kw)
    with pytest.raises(ValueError, match="first_frame"):
        s.sample(text(1.0), first_unit_steps=(1, 1, 1), first_frame=jnp.zeros((B, C, 1, H, W + 4)), **kw)
    with pytest.raises(ValueError, match="divisible"):
        s.sample(text(1.0), first_unit_steps=(1, 1, 1), **dict(kw, height=6))
