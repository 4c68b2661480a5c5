"""Has a flow teacher learned more than a per-patch linear denoiser? Its per-stage loss against that baseline.

For every pyramid stage, :func:`stage_baselines` builds the flow-matching targets of the training loss
(``neodragon_jax.pyramid.loss``: stage endpoints from the latent and noise pyramids, one sigma_l ~ U(0, 1) per
sample, v* = start - end) on clean latents, and fits the best map from one noisy patch (``patch_size`` x
``patch_size`` x C values: the MMDiT's token) to its velocity that is linear in the patch with coefficients
quadratic in sigma_l (features ``[1, sigma, sigma^2] (x) [patch, 1]``), by least squares on half the patches;
the other half gives the baseline's loss. The baseline knows the noise level but nothing of the text or of the
neighbouring patches, so a teacher that draws objects from captions must get well below it; a teacher at or
above it has learned no more than a linear filter, and samples from it are noise-like texture.

:func:`teacher_stage_losses` reads a training run's per-stage losses (``metrics.jsonl``, mean over the last
10% of logged steps) for the comparison. The teacher's loss is measured on per-unit clips with history, the
baseline on whole latents: both have the same targets and sigma distribution per element.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def patch_rows(a: np.ndarray, p: int) -> np.ndarray:
    """``[N, C, F, H, W] -> [N*F*(H/p)*(W/p), C*p*p]``: one row per MMDiT token (channel-major, then pixels)."""
    n, c, f, h, w = a.shape
    if h % p or w % p:
        raise ValueError(f"latent {h}x{w} is not a multiple of the patch size {p}")
    a = a.reshape(n, c, f, h // p, p, w // p, p).transpose(0, 2, 3, 5, 1, 4, 6)
    return a.reshape(-1, c * p * p)


def _features(x_rows: np.ndarray, sigma_rows: np.ndarray) -> np.ndarray:
    X = np.concatenate([x_rows.astype(np.float64), np.ones((len(x_rows), 1))], axis=1)
    s = sigma_rows.astype(np.float64)[:, None]
    return np.concatenate([X, s * X, s * s * X], axis=1)


def linear_patch_baseline(x: np.ndarray, v: np.ndarray, sigma: np.ndarray, p: int, *,
                          chunk: int = 32768) -> tuple[float, float]:
    """``(var(v), held-out MSE)`` of the least-squares per-patch map ``x -> v`` (linear in x, quadratic in sigma).

    ``x``, ``v`` ``[N, C, F, H, W]``; ``sigma`` ``[N]`` (one sigma_l per sample, as in training). Fitted on the
    first half of the patches (sample-major order) through the normal equations, accumulated ``chunk`` rows at
    a time in float64 (so 400 demo records need a few MB, not the GB of the whole design matrix), and scored on
    the second half.
    """
    X, Y = patch_rows(x, p), patch_rows(v, p)
    S = np.repeat(np.asarray(sigma, np.float64).ravel(), len(X) // len(np.asarray(sigma).ravel()))
    k = 3 * (X.shape[1] + 1)
    half = len(X) // 2
    if half < k:
        raise ValueError(f"{len(X)} patches are too few to fit {k} coefficients; use more latents")
    xtx, xty = np.zeros((k, k)), np.zeros((k, Y.shape[1]))
    for i in range(0, half, chunk):
        j = min(i + chunk, half)
        F = _features(X[i:j], S[i:j])
        xtx += F.T @ F
        xty += F.T @ Y[i:j].astype(np.float64)
    W = np.linalg.lstsq(xtx, xty, rcond=None)[0]
    sq, total, total_sq, n = 0.0, 0.0, 0.0, 0
    for i in range(half, len(X), chunk):
        j = min(i + chunk, len(X))
        y = Y[i:j].astype(np.float64)
        sq += float(np.sum(np.square(_features(X[i:j], S[i:j]) @ W - y)))
        total, total_sq, n = total + float(y.sum()), total_sq + float(np.square(y).sum()), n + y.size
    mean = total / n
    return total_sq / n - mean * mean, sq / n


def stage_baselines(latents: np.ndarray, schedule, patch_size: int, *, seed: int = 0) -> list[dict]:
    """Per stage: ``{"stage", "latent_hw", "target_var", "linear_baseline"}`` on clean normalised latents
    ``[N, C, F, H, W]`` (``schedule``: a ``PyramidSchedule``; ``patch_size``: the MMDiT's)."""
    import jax
    import jax.numpy as jnp

    from neodragon_jax.pyramid.pyramids import latent_pyramid, noise_pyramid, upsample_2x

    z = jnp.asarray(np.asarray(latents, np.float32))
    if z.ndim != 5:
        raise ValueError(f"latents must be [N, C, F, H, W], got shape {z.shape}")
    S = schedule.num_stages
    k_eps, k_sig = jax.random.split(jax.random.PRNGKey(seed))
    zp = latent_pyramid(z, S)
    eps = noise_pyramid(jax.random.normal(k_eps, z.shape, jnp.float32), S)
    sigmas = jax.random.uniform(k_sig, (S, z.shape[0]), jnp.float32)
    out = []
    for s in range(S):
        ss, se = schedule.start_sigmas[s], schedule.end_sigmas[s]
        start = eps[0] if s == 0 else ss * eps[s] + (1.0 - ss) * upsample_2x(zp[s - 1])
        end = zp[s] if s == S - 1 else se * eps[s] + (1.0 - se) * zp[s]
        sl = sigmas[s].reshape(-1, 1, 1, 1, 1)
        x = sl * start + (1.0 - sl) * end
        var, mse = linear_patch_baseline(np.asarray(x), np.asarray(start - end), np.asarray(sigmas[s]), patch_size)
        out.append({"stage": s, "latent_hw": [int(zp[s].shape[-2]), int(zp[s].shape[-1])], "target_var": var,
                    "linear_baseline": mse})
    return out


def teacher_stage_losses(metrics_jsonl: str | os.PathLike) -> dict[int, float]:
    """``{stage: mean loss/stage<k> over the last 10% of logged steps}`` of a run's ``metrics.jsonl`` ({} if none)."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if any(k.startswith("loss/stage") for k in r)]
    tail = rows[-max(1, len(rows) // 10):]
    keys = sorted({k for r in tail for k in r if k.startswith("loss/stage")})
    return {int(k[len("loss/stage"):]): float(np.mean([r[k] for r in tail if k in r])) for k in keys}


def teacher_vs_baseline(records_dir: str | os.PathLike, metrics_jsonl: str | os.PathLike, schedule,
                        patch_size: int, *, limit: int = 400, seed: int = 0) -> tuple[list[dict], tuple[int, ...]]:
    """:func:`stage_baselines` on the ``latents`` of the first ``limit`` ``*.npz`` records in ``records_dir``,
    each row with ``"teacher"`` (the run's stage loss, None if not logged). Returns ``(rows, shape of the
    stacked latents [N, C, F, H, W])``; ``([], ())`` when there is no record."""
    files = sorted(Path(records_dir).glob("*.npz"))[:limit]
    if not files:
        return [], ()
    latents = np.stack([np.load(f)["latents"] for f in files])
    teacher = teacher_stage_losses(metrics_jsonl)
    rows = stage_baselines(latents, schedule, patch_size, seed=seed)
    return [dict(r, teacher=teacher.get(r["stage"])) for r in rows], tuple(latents.shape)


__all__ = ["linear_patch_baseline", "patch_rows", "stage_baselines", "teacher_stage_losses", "teacher_vs_baseline"]
