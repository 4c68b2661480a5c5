"""The per-patch linear baseline of a flow teacher: exact on linear targets, blind to independent noise, the
MMDiT's token layout, per-stage figures and the run's per-stage losses."""

import json

import numpy as np
import pytest

from neodragon_jax.eval.flow_baseline import linear_patch_baseline, patch_rows, stage_baselines, teacher_stage_losses
from neodragon_jax.pyramid.scheduler import make_schedule


def test_patch_rows_are_the_mmdit_tokens():
    a = np.arange(2 * 3 * 1 * 4 * 4, dtype=np.float32).reshape(2, 3, 1, 4, 4)
    rows = patch_rows(a, 2)
    assert rows.shape == (2 * 1 * 2 * 2, 3 * 2 * 2)
    # Row 1 = sample 0, frame 0, patch row 0, patch column 1: channel-major, then the 2x2 pixels.
    np.testing.assert_array_equal(rows[1], a[0, :, 0, 0:2, 2:4].reshape(-1))
    with pytest.raises(ValueError, match="multiple of the patch size 3"):
        patch_rows(a, 3)


def test_baseline_is_exact_for_sigma_dependent_linear_targets_and_blind_to_independent_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 2, 2, 4, 4)).astype(np.float32)
    sigma = rng.uniform(size=1024).astype(np.float32)
    s = sigma[:, None, None, None, None]
    v = (1.0 - s) * x[:, ::-1] + s**2 * 0.5 * x + 0.3 * s       # linear in x, quadratic in sigma
    var, mse = linear_patch_baseline(x, v, sigma, 2)
    assert var > 0.1 and mse < 1e-8                               # float64 least squares: exact up to rounding
    noise = rng.standard_normal(x.shape).astype(np.float32)
    var, mse = linear_patch_baseline(x, noise, sigma, 2)
    assert mse == pytest.approx(var, rel=0.05)  # nothing to predict: 27 features on 4096 rows barely overfit
    assert linear_patch_baseline(x, noise, sigma, 2, chunk=1000) == pytest.approx((var, mse), rel=1e-9)
    with pytest.raises(ValueError, match="too few"):
        linear_patch_baseline(x[:2, :, :1], v[:2, :, :1], sigma[:2], 2)


def test_stage_baselines_follow_the_pyramid():
    sch = make_schedule()
    rng = np.random.default_rng(1)
    # Smooth latents (a random plane per channel and frame) are well predicted at every stage.
    yy, xx = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij")
    coef = rng.standard_normal((512, 4, 3, 3))
    z = coef[..., 0:1, None] * yy + coef[..., 1:2, None] * xx + coef[..., 2:3, None]
    z = z.reshape(512, 4, 3, 8, 8).astype(np.float32)
    rows = stage_baselines(z, sch, 2, seed=0)
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert [r["latent_hw"] for r in rows] == [[2, 2], [4, 4], [8, 8]]
    for r in rows:
        assert 0.0 < r["linear_baseline"] < r["target_var"]
    # The finest stage removes start-noise of std sigma_s = 0.5 that a per-patch map cannot tell from signal.
    assert rows[2]["linear_baseline"] > 0.01
    with pytest.raises(ValueError, match=r"\[N, C, F, H, W\]"):
        stage_baselines(z[0], sch, 2)


def test_teacher_stage_losses_average_the_last_tenth(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert teacher_stage_losses(path) == {}
    rows = [{"step": i, "loss": 1.0, "loss/stage0": float(i), "loss/stage2": 2.0 * i} for i in range(20)]
    rows.insert(5, {"step": 5, "eval/psnr": 3.0})  # lines without stage losses are ignored
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert teacher_stage_losses(path) == {0: 18.5, 2: 37.0}
