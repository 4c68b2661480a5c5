"""Scheduler constants, timesteps, pyramids and the stage jump (spec §3.2-3.3, §10.1-2).

Golden numbers come from NEODRAGON.md §3.2-3.3; they are printed there with 5 decimals, so the tolerance
is half a unit of the last printed digit (5e-6) unless stated otherwise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neodragon_jax.config.schema import PyramidConfig
from neodragon_jax.pyramid import (
    block_noise,
    downsample_2x,
    latent_pyramid,
    make_schedule,
    noise_pyramid,
    stage_jump,
    upsample_2x,
)

def rkey(seed: int) -> jax.Array:
    """Test PRNG key. 'rbg' compiles several times faster than threefry on CPU; the code is key-agnostic."""
    return jax.random.key(seed, impl="rbg")


HALF_ULP5 = 5e-6


@pytest.fixture(scope="module")
def sch():
    return make_schedule(PyramidConfig())


def test_golden_stage_constants(sch):
    assert sch.num_stages == 3 and sch.num_train_timesteps == 1000
    assert sch.original_start_sigmas == pytest.approx([1.0, 0.667, 0.334], abs=1e-7)
    assert sch.start_sigmas == pytest.approx([1.0, 0.80024, 0.50075], abs=HALF_ULP5)
    assert sch.end_sigmas == pytest.approx([0.667, 0.334, 0.0], abs=1e-7)
    assert sch.jump_alpha[1:] == pytest.approx([0.59988, 0.74963], abs=HALF_ULP5)
    assert sch.jump_beta[1:] == pytest.approx([0.69303, 0.43366], abs=HALF_ULP5)
    assert sch.time_fractions == pytest.approx([0.0, 0.25616, 0.61480, 1.0], abs=HALF_ULP5)
    lengths = [a - b for a, b in zip(sch.start_sigmas, sch.end_sigmas)]
    assert lengths == pytest.approx([0.333, 0.4662, 0.5007], abs=5e-5)  # 4 decimals in the spec
    # Global windows use int() truncation into T[n] = 1000 - n: exact integers.
    assert sch.t_max == (1000.0, 744.0, 386.0)
    assert sch.t_min == (744.0, 386.0, 1.0)


def test_gamma_one_third_closed_forms(sch):
    for k in (1, 2):
        se = sch.end_sigmas[k - 1]
        assert sch.start_sigmas[k] == pytest.approx(2 * se / (1 + se), abs=1e-12)
        assert sch.jump_alpha[k] == pytest.approx(1 / (1 + se), abs=1e-12)
        assert sch.jump_beta[k] == pytest.approx(math.sqrt(3) * se / (1 + se), abs=1e-12)


@pytest.mark.parametrize("stages,gamma", [(1, 1 / 3), (2, 1 / 3), (4, 1 / 3), (3, 0.25), (5, 0.1)])
def test_schedule_invariants_any_stages_and_gamma(stages, gamma):
    s = make_schedule(PyramidConfig(num_stages=stages, gamma=gamma, stage_sample_ratios=(1,) * stages))
    assert s.start_sigmas[0] == 1.0 and s.end_sigmas[-1] == 0.0
    assert s.t_max[0] == 1000.0 and s.t_min[-1] == 1.0
    for k in range(stages - 1):
        assert s.t_min[k] == s.t_max[k + 1]  # windows tile the global time axis
        assert s.original_start_sigmas[k + 1] == s.end_sigmas[k]
    assert all(a < b for a, b in zip(s.time_fractions, s.time_fractions[1:]))
    for k in range(1, stages):
        se, ss, a, b = s.end_sigmas[k - 1], s.start_sigmas[k], s.jump_alpha[k], s.jump_beta[k]
        # Signal coefficient and total noise variance after the jump equal the training start point's.
        assert a * (1 - se) == pytest.approx(1 - ss, abs=1e-12)
        assert (a * se) ** 2 * (1 + 1 / gamma) == pytest.approx(ss**2, abs=1e-12)
        assert b == pytest.approx(a * se / math.sqrt(gamma), abs=1e-12)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="gamma"):
        make_schedule(PyramidConfig(gamma=0.5))
    with pytest.raises(ValueError, match="stage_sample_ratios"):
        make_schedule(PyramidConfig(num_stages=2))


def test_sigma_timestep_mapping_and_training_tables(sch):
    for s in range(3):
        sig, t = sch.training_tables(s)
        assert sig.dtype == np.float32 and t.dtype == np.float32 and sig.shape == (1000,)
        n = np.arange(1000)
        np.testing.assert_allclose(sig, 1 - n / 1000, atol=1e-7)
        np.testing.assert_allclose(t, np.linspace(sch.t_max[s], sch.t_min[s], 1001)[n], rtol=1e-7)
        np.testing.assert_allclose(sch.timestep(s, sig.astype(np.float64)), t, rtol=1e-6)
        np.testing.assert_allclose(sch.local_sigma(s, t.astype(np.float64)), sig, atol=1e-6)
        assert sch.global_sigma(s, 1.0) == pytest.approx(sch.start_sigmas[s])
        assert sch.global_sigma(s, 0.0) == pytest.approx(sch.end_sigmas[s])


def test_sample_training_timesteps_is_uniform_on_the_table(sch):
    sig, t = sch.sample_training_timesteps(rkey(0), 20000, 1)
    assert sig.dtype == jnp.float32 and t.dtype == jnp.float32
    n = np.rint((1 - np.asarray(sig)) * 1000).astype(int)
    assert n.min() >= 0 and n.max() <= 999
    np.testing.assert_allclose(np.asarray(t), sch.training_tables(1)[1][n], rtol=0)
    # Mean of U{0..999} is 499.5 with std 288.7 / sqrt(20000) ~= 2.04: allow 5 sigma.
    assert abs(n.mean() - 499.5) < 5 * 288.7 / math.sqrt(20000)


def test_inference_timesteps(sch):
    for s in range(3):
        t, sig = sch.inference_timesteps(s, 1)
        assert t.tolist() == [sch.t_max[s]] and sig.tolist() == [1.0, 0.0]  # x_end = x - v
    assert [sch.inference_timesteps(s, 1)[0][0] for s in range(3)] == [1000.0, 744.0, 386.0]
    for s, N in [(0, 20), (1, 10), (2, 7)]:
        t, sig = sch.inference_timesteps(s, N)
        tmax, tmin = sch.t_max[s], sch.t_min[s]
        np.testing.assert_allclose(t, np.linspace(tmax, tmax - 0.999 * (tmax - tmin), N), rtol=1e-6)
        np.testing.assert_allclose(sig[:-1], np.linspace(1, 0.001, N), atol=1e-7)
        assert sig[-1] == 0.0 and sig.shape == (N + 1,)


# ------------------------------------------------------------------------------------------ pyramids
def test_downsample_upsample_exact():
    x = jnp.arange(2 * 3 * 4 * 6, dtype=jnp.float32).reshape(1, 2, 3, 4, 6)
    d = downsample_2x(x)
    assert d.shape == (1, 2, 3, 2, 3)
    np.testing.assert_array_equal(d[0, 0, 0], (x[0, 0, 0, 0::2, 0::2] + x[0, 0, 0, 0::2, 1::2]
                                               + x[0, 0, 0, 1::2, 0::2] + x[0, 0, 0, 1::2, 1::2]) / 4)
    u = upsample_2x(d)
    assert u.shape == x.shape
    np.testing.assert_array_equal(u[..., 1::2, 0::2], d)
    np.testing.assert_array_equal(downsample_2x(u), d)
    with pytest.raises(ValueError, match="even"):
        downsample_2x(jnp.zeros((1, 3, 4)))


def test_latent_and_noise_pyramids():
    z = jax.random.normal(rkey(1), (2, 4, 3, 32, 64))
    lp = latent_pyramid(z, 3)
    assert [a.shape[-2:] for a in lp] == [(8, 16), (16, 32), (32, 64)]
    np.testing.assert_allclose(lp[0], downsample_2x(downsample_2x(z)), rtol=1e-6)
    npyr = noise_pyramid(z, 3)
    np.testing.assert_allclose(npyr[0], 4 * lp[0], rtol=1e-6)
    # Unit variance kept: 2*16*... elements at the coarsest level = 3072; var std ~ sqrt(2/n) = 0.026.
    coarse = np.asarray(npyr[0]).ravel()
    assert abs(coarse.var() - 1.0) < 5 * math.sqrt(2 / coarse.size)


@pytest.mark.needs_torch
@pytest.mark.parity
def test_pyramid_ops_match_torch_interpolate():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(0).standard_normal((3, 5, 8, 12)).astype(np.float32)
    tx = torch.from_numpy(x)
    down = F.interpolate(tx, size=(4, 6), mode="bilinear").numpy()
    up = F.interpolate(tx, size=(16, 24), mode="nearest").numpy()
    # Tolerance: float32 rounding of a 4-term mean.
    np.testing.assert_allclose(np.asarray(downsample_2x(jnp.asarray(x))), down, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(upsample_2x(jnp.asarray(x))), up)


# ------------------------------------------------------------------------------------ block noise, jump
def _block_vectors(n):
    """[..., H, W] -> [M, 4] rows (p, q) in raster order of each 2x2 block."""
    *lead, h, w = n.shape
    b = np.asarray(n).reshape(-1, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4)
    return b.reshape(-1, 4)


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_block_noise_covariance(gamma):
    n = block_noise(rkey(2), (4, 8, 2, 64, 64), gamma)
    assert n.dtype == jnp.float32
    v = _block_vectors(n).astype(np.float64)
    M = v.shape[0]
    cov = v.T @ v / M
    expected = (1 + gamma) * np.eye(4) - gamma * np.ones((4, 4))
    # Each covariance entry has std <= ~sqrt(2)*(1+g)/sqrt(M) ~ 0.004 at M = 65536: allow 6 sigma.
    np.testing.assert_allclose(cov, expected, atol=6 * math.sqrt(2) * (1 + gamma) / math.sqrt(M))
    if gamma == 1 / 3:
        # Singular covariance: every block mean is zero up to float32 rounding.
        assert np.abs(v.mean(axis=1)).max() < 1e-6


def test_stage_jump_keeps_the_training_marginal(sch):
    """End of stage k-1 -> jump -> must be distributed like the training start of stage k."""
    key = rkey(3)
    kz, ke, kj = jax.random.split(key, 3)
    shape = (4, 8, 2, 64, 64)  # 262144 elements at the fine level
    z_fine = 0.7 * jax.random.normal(kz, shape) + 0.3
    z_coarse = downsample_2x(z_fine)
    for stage in (1, 2):
        se = sch.end_sigmas[stage - 1]
        ss = sch.start_sigmas[stage]
        x_low = se * jax.random.normal(jax.random.fold_in(ke, stage), z_coarse.shape) + (1 - se) * z_coarse
        x_start = stage_jump(x_low, jax.random.fold_in(kj, stage), schedule=sch, stage=stage)
        assert x_start.shape == shape and x_start.dtype == jnp.float32
        # Training start: ss * eps + (1 - ss) * Up(z_coarse). Residual noise must be iid N(0, ss^2).
        r = np.asarray(x_start - (1 - ss) * upsample_2x(z_coarse), np.float64)
        n = r.size
        assert abs(r.mean()) < 6 * ss / math.sqrt(n)
        assert abs(r.var() - ss**2) < 6 * ss**2 * math.sqrt(2 / n)
        # No correlation inside a 2x2 block (plain upsampling would give correlation ~ se^2*a^2/ss^2).
        v = _block_vectors(r)
        corr = np.corrcoef(v.T)
        off = corr[~np.eye(4, dtype=bool)]
        assert np.abs(off).max() < 6 / math.sqrt(v.shape[0])
        # Noise is independent of the signal.
        up_z = np.asarray(upsample_2x(z_coarse), np.float64).ravel()
        assert abs(np.corrcoef(up_z, r.ravel())[0, 1]) < 6 / math.sqrt(n)


def test_stage_jump_rejects_stage_zero(sch):
    with pytest.raises(ValueError, match="stage > 0"):
        stage_jump(jnp.zeros((1, 1, 1, 2, 2)), rkey(0), schedule=sch, stage=0)
