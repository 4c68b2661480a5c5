"""Pyramidal flow-matching schedule: stage windows, timesteps and the stage jump (spec §3.1-3.3).

Conventions: sigma is the noise fraction, x_sigma = (1 - sigma) * signal + sigma * eps. Stages are indexed
0 (coarsest) -> S-1 (finest). Inside stage k a local sigma_l runs 1 -> 0; the state is
x = sigma_l * start + (1 - sigma_l) * end, the model sees the global timestep
t = t_min + (t_max - t_min) * sigma_l (in [0, 1000], not normalised) and the global noise level is
sigma = sigma_e + sigma_l * (sigma_s - sigma_e).

The constants are derived exactly as the official scheduler does: a float32 global sigma table
s[n] = (N - n) / N and timestep table T[n] = N - n, stage borders at int(k / S * N), corrected start sigmas,
proportional split of the global time axis by flow length, and int() truncation when indexing T. The
algebra on those float32 table entries is done in Python double precision (as the official code does with
``.item()``); every array handed to JAX is float32.

Everything here is a pure function of ``PyramidConfig``: ``make_schedule(cfg)`` returns a frozen, hashable
``PyramidSchedule`` that can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from neodragon_jax.config.schema import PyramidConfig
from neodragon_jax.pyramid.pyramids import downsample_2x, upsample_2x


@dataclass(frozen=True)
class PyramidSchedule:
    """Per-stage constants of pyramidal flow matching (index k = stage k, coarsest first).

    original_start_sigmas: sigma at the stage's left border in the global table (before correction).
    start_sigmas: corrected start sigma_s (stage 0: 1.0).
    end_sigmas: end sigma_e (last stage: 0.0).
    time_fractions: cumulative fractions of the global time axis, length S+1 (0 ... 1).
    t_max, t_min: global timestep window of each stage (t_max at sigma_l = 1, t_min at sigma_l = 0).
    jump_alpha, jump_beta: renoising coefficients for the jump INTO stage k (stage 0: 1.0 and 0.0).
    The remaining fields are copied from ``PyramidConfig`` for the training loss.
    """

    num_stages: int
    gamma: float
    num_train_timesteps: int
    original_start_sigmas: tuple[float, ...]
    start_sigmas: tuple[float, ...]
    end_sigmas: tuple[float, ...]
    time_fractions: tuple[float, ...]
    t_max: tuple[float, ...]
    t_min: tuple[float, ...]
    jump_alpha: tuple[float, ...]
    jump_beta: tuple[float, ...]
    stage_sample_ratios: tuple[int, ...]
    history_corrupt_ratio: float
    text_dropout: float
    frames_per_unit: int

    # ----------------------------------------------------------------------------------------- helpers
    def check_stage(self, stage: int) -> int:
        if not isinstance(stage, (int, np.integer)) or not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be a Python int in [0, {self.num_stages - 1}], got {stage!r}")
        return int(stage)

    def downsample_factor(self, stage: int) -> int:
        """Spatial factor between the full-resolution latent and stage ``stage`` (finest stage: 1)."""
        return 2 ** (self.num_stages - 1 - self.check_stage(stage))

    def stage_hw(self, stage: int, height: int, width: int) -> tuple[int, int]:
        """Latent (H, W) of stage ``stage`` for a full-resolution latent of size (height, width)."""
        f = 2 ** (self.num_stages - 1)
        if height % f or width % f:
            raise ValueError(
                f"latent size {height}x{width} is not divisible by 2**(num_stages-1) = {f}; "
                "choose a video size whose latent halves cleanly at every stage"
            )
        d = self.downsample_factor(stage)
        return height // d, width // d

    # ------------------------------------------------------------------------------ sigma <-> timestep
    def timestep(self, stage: int, sigma_l):
        """Global timestep for local sigma_l in stage ``stage``: t_min + (t_max - t_min) * sigma_l."""
        s = self.check_stage(stage)
        return self.t_min[s] + (self.t_max[s] - self.t_min[s]) * sigma_l

    def local_sigma(self, stage: int, t):
        """Inverse of ``timestep``: local sigma_l of global timestep t within stage ``stage``."""
        s = self.check_stage(stage)
        return (t - self.t_min[s]) / (self.t_max[s] - self.t_min[s])

    def global_sigma(self, stage: int, sigma_l):
        """Global noise fraction sigma_e + sigma_l * (sigma_s - sigma_e) of local sigma_l in ``stage``."""
        s = self.check_stage(stage)
        return self.end_sigmas[s] + sigma_l * (self.start_sigmas[s] - self.end_sigmas[s])

    # ---------------------------------------------------------------------------------------- training
    def training_tables(self, stage: int) -> tuple[np.ndarray, np.ndarray]:
        """(sigma_l, t) float32 tables of length N indexed by n in {0..N-1} (spec §3.2 training)."""
        s = self.check_stage(stage)
        return _training_tables(self.t_max[s], self.t_min[s], self.num_train_timesteps)

    def training_timesteps(self, n: jax.Array, stage: int):
        """(sigma_l, t) float32 of integer table indices n in {0..N-1}: sigma_l = 1 - n/N, t from the table."""
        sig_table, t_table = self.training_tables(stage)
        return jnp.asarray(sig_table)[n], jnp.asarray(t_table)[n]

    def uniform_to_index(self, u: jax.Array) -> jax.Array:
        """n = floor(u * N) clipped to {0..N-1} for u ~ U[0, 1) (the official sampling of n)."""
        N = self.num_train_timesteps
        return jnp.clip(jnp.floor(u * N).astype(jnp.int32), 0, N - 1)

    def sample_training_timesteps(self, key: jax.Array, batch_size: int, stage: int):
        """Uniform n ~ U{0..N-1}; returns (sigma_l [B], t [B]) float32 with sigma_l = 1 - n/N."""
        u = jax.random.uniform(key, (batch_size,), jnp.float32)
        return self.training_timesteps(self.uniform_to_index(u), stage)

    # --------------------------------------------------------------------------------------- inference
    def inference_timesteps(self, stage: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(t [N], sigma_l [N+1]) float32 for an N-step Euler solve of stage ``stage``.

        t_j = linspace(t_max, t_max - (N_train-1)/N_train * (t_max - t_min), N);
        sigma_l = linspace(1, 1/N_train, N) followed by 0. N = 1 gives t = t_max and x_end = x - v.
        """
        s = self.check_stage(stage)
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        return _inference_tables(self.t_max[s], self.t_min[s], self.num_train_timesteps, int(num_steps))


@functools.lru_cache(maxsize=64)
def _training_tables(t_max: float, t_min: float, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(t_max, t_min, n_train + 1)[:-1]
    sig = np.linspace(1.0, 0.0, n_train + 1)[:-1]
    t32, sig32 = t.astype(np.float32), sig.astype(np.float32)
    t32.flags.writeable = False
    sig32.flags.writeable = False
    return sig32, t32


@functools.lru_cache(maxsize=256)
def _inference_tables(t_max: float, t_min: float, n_train: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    t_table = np.linspace(t_max, t_min, n_train + 1)[:-1]
    sig_table = np.linspace(1.0, 0.0, n_train + 1)[:-1]
    t = np.linspace(t_table[0], t_table[-1], num_steps).astype(np.float32)
    sig = np.concatenate([np.linspace(sig_table[0], sig_table[-1], num_steps), [0.0]]).astype(np.float32)
    t.flags.writeable = False
    sig.flags.writeable = False
    return t, sig


@functools.lru_cache(maxsize=32)
def make_schedule(cfg: PyramidConfig | None = None) -> PyramidSchedule:
    """Derive every pyramid constant from ``cfg`` (defaults: 3 stages, gamma 1/3, 1000 steps)."""
    cfg = PyramidConfig() if cfg is None else cfg
    S, N, gamma = int(cfg.num_stages), int(cfg.num_train_timesteps), float(cfg.gamma)
    if S < 1:
        raise ValueError(f"pyramid.num_stages must be >= 1, got {S}")
    if N < 2 * S:
        raise ValueError(f"pyramid.num_train_timesteps ({N}) is too small for {S} stages")
    if not 0.0 < gamma <= 1.0 / 3.0 + 1e-12:
        raise ValueError(
            f"pyramid.gamma must be in (0, 1/3], got {gamma}: the block-noise covariance "
            "(1+gamma) I - gamma 11^T of a 2x2 block is not positive semi-definite above 1/3"
        )
    if len(cfg.stage_sample_ratios) != S or any(int(r) < 0 for r in cfg.stage_sample_ratios):
        raise ValueError(
            f"pyramid.stage_sample_ratios must list {S} non-negative ints (one per stage), "
            f"got {cfg.stage_sample_ratios}"
        )
    if sum(cfg.stage_sample_ratios) < 1:
        raise ValueError("pyramid.stage_sample_ratios must not be all zero")
    if int(cfg.frames_per_unit) < 1:
        raise ValueError(f"pyramid.frames_per_unit must be >= 1, got {cfg.frames_per_unit}")

    # The official tables are float32 tensors; keep their exact float32 values.
    timesteps = np.linspace(1, N, N, dtype=np.float32)[::-1].copy()
    sigmas = timesteps / np.float32(N)
    T = sigmas * np.float32(N)
    root = math.sqrt(1.0 + 1.0 / gamma)

    ori_start, start, end, distance = [], [], [], []
    for k in range(S):
        i0 = max(int((k / S) * N), 0)
        i1 = min(int(((k + 1) / S) * N), N)
        s0 = float(sigmas[i0])
        s1 = float(sigmas[i1]) if i1 < N else 0.0
        ori_start.append(s0)
        if k > 0:
            # sigma_s = root * s_e' / (root * s_e' + 1 - s_e'), written as in the official code.
            ori_signal = 1.0 - s0
            s0 = 1.0 - ori_signal / (root * (1.0 - ori_signal) + ori_signal)
        start.append(s0)
        end.append(s1)
        distance.append(s0 - s1)
    if any(d <= 0 for d in distance):
        raise ValueError(f"degenerate stage windows (flow lengths {distance}); use fewer stages")

    total = sum(distance)
    fractions = [0.0] + [sum(distance[: k + 1]) / total for k in range(S - 1)] + [1.0]
    t_max = tuple(float(T[int(fractions[k] * N)]) for k in range(S))
    t_min = tuple(float(T[min(int(fractions[k + 1] * N), N - 1)]) for k in range(S))

    alpha, beta = [1.0], [0.0]
    for k in range(1, S):
        s_prev = ori_start[k]
        a = 1.0 / (root * s_prev + 1.0 - s_prev)
        alpha.append(a)
        beta.append(a * s_prev / math.sqrt(gamma))

    return PyramidSchedule(
        num_stages=S,
        gamma=gamma,
        num_train_timesteps=N,
        original_start_sigmas=tuple(ori_start),
        start_sigmas=tuple(start),
        end_sigmas=tuple(end),
        time_fractions=tuple(fractions),
        t_max=t_max,
        t_min=t_min,
        jump_alpha=tuple(alpha),
        jump_beta=tuple(beta),
        stage_sample_ratios=tuple(int(r) for r in cfg.stage_sample_ratios),
        history_corrupt_ratio=float(cfg.history_corrupt_ratio),
        text_dropout=float(cfg.text_dropout),
        frames_per_unit=int(cfg.frames_per_unit),
    )


def block_noise(key: jax.Array, shape: tuple[int, ...], gamma: float) -> jax.Array:
    """Noise n' [..., H, W] (float32): each 2x2 spatial block is an independent N(0, (1+g) I - g 11^T).

    Closed form (the covariance is singular for gamma = 1/3): n' = sqrt(1+g) (z - zbar) + sqrt(1-3g) zbar
    with z ~ N(0, I) and zbar its 2x2 block mean broadcast back, so for gamma = 1/3 block means vanish.
    """
    z = jax.random.normal(key, shape, jnp.float32)
    zbar = upsample_2x(downsample_2x(z))
    out = math.sqrt(1.0 + gamma) * (z - zbar)
    rest = 1.0 - 3.0 * gamma
    if rest > 1e-12:
        out = out + math.sqrt(rest) * zbar
    return out


def stage_jump(x_low: jax.Array, key: jax.Array, *, schedule: PyramidSchedule, stage: int) -> jax.Array:
    """Renoise the end of stage ``stage-1`` into the start of ``stage`` (spec §3.3), in float32.

    x_low: [B, C, F, H, W] at the previous stage's resolution and end sigma. Returns
    alpha * Up(x_low) + beta * n' [B, C, F, 2H, 2W], distributed like the training start point
    sigma_s * eps + (1 - sigma_s) * Up(clean_{stage-1}).
    """
    s = schedule.check_stage(stage)
    if s == 0:
        raise ValueError("stage_jump goes INTO a stage > 0; stage 0 starts from the coarsest noise")
    up = upsample_2x(x_low.astype(jnp.float32))
    noise = block_noise(key, up.shape, schedule.gamma)
    return schedule.jump_alpha[s] * up + schedule.jump_beta[s] * noise
