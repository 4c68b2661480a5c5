"""Temporal-pyramid history: which past latent frames the MMDiT sees, at which resolution (spec §3.5).

Generation runs unit by unit (unit 0 = the first latent frame, an image; every later unit =
``frames_per_unit`` latent frames). For unit u at stage s the MMDiT input is a list of history clips,
oldest -> newest, followed by the current noisy clip. The most recent history unit is given at stage s
resolution, each unit further back one stage lower, until stage 0; every older unit is at stage 0. In
other words the history unit at distance d >= 1 is at stage max(s - d + 1, 0). Consecutive units at the
same stage are grouped into one clip (only stage 0 ever groups several units).

The official code keeps the most recent stage-0 unit as its own clip when s = 0 (two clips [older...],
[latest]); grouping them is the same MMDiT input, because clips are patchified frame by frame and the
temporal RoPE positions simply continue across clip borders.

Everything here is static Python arithmetic (the layout decides array shapes, so it must be known at
trace time), plus a gather that slices the pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax


@dataclass(frozen=True)
class HistoryClip:
    """Frames [start, stop) of the latent video, taken from pyramid stage ``stage``."""

    stage: int
    start: int
    stop: int

    @property
    def num_frames(self) -> int:
        return self.stop - self.start


def unit_frames(unit: int, frames_per_unit: int = 1) -> tuple[int, int]:
    """Latent-frame range [start, stop) of ``unit``: unit 0 is frame 0, unit u >= 1 has ``frames_per_unit``."""
    if unit < 0:
        raise ValueError(f"unit must be >= 0, got {unit}")
    if frames_per_unit < 1:
        raise ValueError(f"frames_per_unit must be >= 1, got {frames_per_unit}")
    if unit == 0:
        return 0, 1
    return 1 + (unit - 1) * frames_per_unit, 1 + unit * frames_per_unit


def num_units(num_frames: int, frames_per_unit: int = 1) -> int:
    """Number of generation units of a latent video with ``num_frames`` frames (1 + (F-1)/fpu)."""
    if num_frames < 1 or (num_frames - 1) % frames_per_unit:
        raise ValueError(
            f"a latent video has 1 + k * frames_per_unit frames; got {num_frames} frames with "
            f"frames_per_unit={frames_per_unit}"
        )
    return 1 + (num_frames - 1) // frames_per_unit


def history_layout(unit: int, stage: int, *, frames_per_unit: int = 1) -> tuple[HistoryClip, ...]:
    """History clips for ``unit`` at ``stage``, oldest first (empty for unit 0)."""
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    clips: list[HistoryClip] = []
    for j in range(unit):  # oldest history unit first
        distance = unit - j
        st = max(stage - distance + 1, 0)
        a, b = unit_frames(j, frames_per_unit)
        if clips and clips[-1].stage == st and clips[-1].stop == a:
            clips[-1] = HistoryClip(st, clips[-1].start, b)
        else:
            clips.append(HistoryClip(st, a, b))
    return tuple(clips)


def build_history(
    pyramid: Sequence[jax.Array], unit: int, stage: int, *, frames_per_unit: int = 1
) -> list[jax.Array]:
    """Slice the history clips of (unit, stage) out of a clean-latent pyramid.

    pyramid: coarsest-first list of [B, C, F, H_k, W_k] arrays (``latent_pyramid`` of the full latents);
    F must cover every history frame (F >= first frame of ``unit``). Returns [B, C, F_i, H_i, W_i] clips,
    oldest first.
    """
    layout = history_layout(unit, stage, frames_per_unit=frames_per_unit)
    if stage >= len(pyramid):
        raise ValueError(f"stage {stage} is out of range for a pyramid with {len(pyramid)} levels")
    need = unit_frames(unit, frames_per_unit)[0]
    have = pyramid[0].shape[2]
    if have < need:
        raise ValueError(f"unit {unit} needs {need} history frames but the latents have only {have}")
    return [pyramid[c.stage][:, :, c.start : c.stop] for c in layout]


def clip_shapes(
    unit: int,
    stage: int,
    *,
    num_stages: int,
    latent_hw: tuple[int, int],
    frames_per_unit: int = 1,
) -> list[tuple[int, int, int]]:
    """(F, H, W) of every clip of the MMDiT input for (unit, stage): history oldest first, then current."""
    H, W = latent_hw
    f = 2 ** (num_stages - 1)
    if H % f or W % f:
        raise ValueError(f"latent size {H}x{W} is not divisible by {f} (2**(num_stages-1))")

    def hw(st: int) -> tuple[int, int]:
        d = 2 ** (num_stages - 1 - st)
        return H // d, W // d

    shapes = [(c.num_frames, *hw(c.stage)) for c in history_layout(unit, stage, frames_per_unit=frames_per_unit)]
    a, b = unit_frames(unit, frames_per_unit)
    shapes.append((b - a, *hw(stage)))
    return shapes


def image_token_count(
    unit: int,
    stage: int,
    *,
    num_stages: int,
    latent_hw: tuple[int, int],
    patch_size: int = 2,
    frames_per_unit: int = 1,
) -> int:
    """Number of image tokens (history + current) the MMDiT processes for (unit, stage)."""
    total = 0
    for F, h, w in clip_shapes(
        unit, stage, num_stages=num_stages, latent_hw=latent_hw, frames_per_unit=frames_per_unit
    ):
        if h % patch_size or w % patch_size:
            raise ValueError(f"clip {h}x{w} is not divisible by the patch size {patch_size}")
        total += F * (h // patch_size) * (w // patch_size)
    return total
