"""Temporal-pyramid history layout (spec §3.5)."""

import jax.numpy as jnp
import numpy as np
import pytest

from neodragon_jax.pyramid import (
    build_history,
    clip_shapes,
    history_layout,
    image_token_count,
    latent_pyramid,
    num_units,
    unit_frames,
)

# Spec §3.5 token table at 320x512 (latent 40x64, patch 2): image tokens per (unit, stage).
TOKEN_TABLE = {
    0: (40, 160, 640),
    1: (80, 320, 1280),
    2: (120, 360, 1440),
    3: (160, 400, 1480),
    6: (280, 520, 1600),
}


@pytest.mark.parametrize("unit", sorted(TOKEN_TABLE))
def test_token_table(unit):
    got = tuple(
        image_token_count(unit, s, num_stages=3, latent_hw=(40, 64), patch_size=2) for s in range(3)
    )
    assert got == TOKEN_TABLE[unit]


def test_stage2_layouts_of_the_table():
    shapes = lambda u: clip_shapes(u, 2, num_stages=3, latent_hw=(40, 64))  # noqa: E731
    assert shapes(0) == [(1, 40, 64)]
    assert shapes(1) == [(1, 40, 64), (1, 40, 64)]
    assert shapes(2) == [(1, 20, 32), (1, 40, 64), (1, 40, 64)]
    assert shapes(3) == [(1, 10, 16), (1, 20, 32), (1, 40, 64), (1, 40, 64)]
    assert shapes(6) == [(4, 10, 16), (1, 20, 32), (1, 40, 64), (1, 40, 64)]


def _official_layout(unit, stage, fpu):
    """Transcription of the official sampler's history loop, as (stage, start, stop) per unit-clip."""
    F = 1 + (unit - 1) * fpu  # frames generated so far
    frames = np.arange(F)
    out = [(stage, frames[-fpu:])]
    cur_stage, ptx = stage, 1
    while ptx < unit:
        cur_stage = max(cur_stage - 1, 0)
        if cur_stage == 0:
            break
        ptx += 1
        out.append((cur_stage, frames[-(ptx * fpu): -((ptx - 1) * fpu)]))
    if cur_stage == 0 and ptx < unit:
        out.append((0, frames[: -(ptx * fpu)]))
    out.reverse()
    # Per-frame (frame, stage) list; grouping into clips does not change it.
    return [(int(f), st) for st, fr in out for f in fr]


@pytest.mark.parametrize("fpu", [1, 2])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_layout_matches_official_loop(stages, fpu):
    for stage in range(stages):
        for unit in range(1, 9):
            layout = history_layout(unit, stage, frames_per_unit=fpu)
            per_frame = [(f, c.stage) for c in layout for f in range(c.start, c.stop)]
            assert per_frame == _official_layout(unit, stage, fpu), (stage, unit)
            # Grouping: neighbouring clips always differ in stage.
            assert all(a.stage != b.stage for a, b in zip(layout, layout[1:]))


def test_unit_frames_and_counts():
    assert [unit_frames(u) for u in range(3)] == [(0, 1), (1, 2), (2, 3)]
    assert [unit_frames(u, 2) for u in range(3)] == [(0, 1), (1, 3), (3, 5)]
    assert num_units(7) == 7 and num_units(7, 2) == 4
    with pytest.raises(ValueError, match="frames_per_unit"):
        num_units(6, 2)
    assert history_layout(0, 2) == ()


def test_build_history_slices_the_right_frames_and_levels():
    # Frame f of the full latent holds the value f; pyramid levels keep it (2x2 mean of constants).
    F, H, W = 7, 8, 16
    z = jnp.broadcast_to(jnp.arange(F, dtype=jnp.float32)[None, None, :, None, None], (2, 3, F, H, W))
    pyr = latent_pyramid(z, 3)
    clips = build_history(pyr, 6, 2)
    assert [c.shape for c in clips] == [(2, 3, 4, 2, 4), (2, 3, 1, 4, 8), (2, 3, 1, 8, 16)]
    np.testing.assert_array_equal(clips[0][0, 0, :, 0, 0], [0, 1, 2, 3])
    assert float(clips[1][0, 0, 0, 0, 0]) == 4 and float(clips[2][0, 0, 0, 0, 0]) == 5
    with pytest.raises(ValueError, match="history frames"):
        build_history([p[:, :, :2] for p in pyr], 6, 2)
