"""Synthetic-domain renderer and dataset writer: determinism, what the pixels show, the folder format."""

import json

import numpy as np
import pytest

from neodragon_jax.data import captions as C
from neodragon_jax.data import synthetic as S
from neodragon_jax.data.video_io import read_video

PALETTE = np.asarray(list(C.COLOURS.values()), np.float64)


def one(colour="red", shape="square", size="small", motion="right", speed="slow", background="black"):
    return C.SceneSpec(objects=(C.ObjectSpec(colour, shape, size, motion, speed),), background=background)


def colour_mask(frames, colour, tol=1.0):
    return np.linalg.norm(frames.astype(np.float64) - np.asarray(C.COLOURS[colour]), axis=-1) < tol


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def test_same_seed_same_video_other_seed_other_video():
    scene = one(background="checkerboard")
    a = S.render_scene(scene, seed=3)
    assert a.dtype == np.uint8 and a.shape == (17, 64, 64, 3)
    np.testing.assert_array_equal(a, S.render_scene(scene, seed=3))
    assert not np.array_equal(a, S.render_scene(scene, seed=4))
    assert S.render_scene(scene, height=32, width=48, num_frames=9, seed=3).shape == (9, 32, 48, 3)


@pytest.mark.parametrize("shape", C.SHAPES)
def test_shape_areas_and_antialiasing(shape):
    r = 10.0
    soft = S.shape_coverage(shape, 20.3, 19.7, r, 40, 40, supersample=8)
    crisp = S.shape_coverage(shape, 20.3, 19.7, r, 40, 40, supersample=1)
    assert soft.sum() == pytest.approx(S.shape_area(shape) * r * r, rel=0.02)
    assert crisp.sum() == pytest.approx(S.shape_area(shape) * r * r, rel=0.1)
    assert set(np.unique(crisp)) <= {0.0, 1.0}
    assert ((soft > 0) & (soft < 1)).any(), "antialiased edges have partial coverage"


def test_shapes_are_distinct_drawings():
    masks = {s: S.shape_coverage(s, 16, 16, 12, 32, 32) > 0.5 for s in C.SHAPES}
    for a in C.SHAPES:
        for b in C.SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (a, b, iou)


@pytest.mark.parametrize("motion", [m for m in C.MOTIONS if C.MOTIONS[m].kind == "linear"])
@pytest.mark.parametrize("speed", list(C.SPEEDS))
def test_linear_motion_direction_and_distance(motion, speed):
    scene = one(motion=motion, speed=speed)
    video = S.render_scene(scene, seed=1, supersample=1)
    c0, c1 = centroid(colour_mask(video[0], "red")), centroid(colour_mask(video[-1], "red"))
    travel = S.linear_travel(motion, speed, "small", 64, 64)
    np.testing.assert_allclose(c1 - c0, np.asarray(C.MOTIONS[motion].direction) * travel, atol=1.0)
    assert travel == pytest.approx(min(C.SPEEDS[speed] * 64, travel))


def test_fast_travels_further_than_slow_even_when_shortened():
    for size in C.SIZES:
        for motion in ("right", "down", "up_left"):
            assert S.linear_travel(motion, "fast", size, 64, 64) > 1.3 * S.linear_travel(motion, "slow", size, 64, 64)


def test_still_and_bounce():
    still = S.render_scene(one(motion="still", speed=None), seed=0)
    assert all(np.array_equal(still[0], f) for f in still)
    video = S.render_scene(one(motion="bounce", speed="slow", shape="circle"), seed=0, supersample=1)
    cs = np.array([centroid(colour_mask(f, "red")) for f in video])
    assert np.ptp(cs[:, 0]) < 0.5, "a bounce is vertical"
    np.testing.assert_allclose(cs[-1], cs[0], atol=0.5)  # one hop per clip: back on the base line
    assert cs[:, 1].min() < cs[0, 1] - 0.8 * S.bounce_height("small", 64, 64)


@pytest.mark.parametrize("size", list(C.SIZES))
@pytest.mark.parametrize("motion", ["up_left", "down_right", "bounce", "left"])
def test_objects_stay_inside_the_frame(size, motion):
    for seed in range(5):
        video = S.render_scene(one(size=size, motion=motion, speed="fast", shape="circle"), seed=seed)
        m = colour_mask(video, "red", tol=60)
        border = m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any() or m[:, :, -1].any()
        assert not border
        assert m.reshape(len(m), -1).any(-1).all(), "visible in every frame"


def test_backgrounds():
    rng = np.random.default_rng(0)
    for name, rgb in C.BACKGROUNDS.items():
        if rgb is not None:
            np.testing.assert_array_equal(S.render_background(name, 8, 8, rng)[3, 3], rgb)
    worst = np.inf
    for _ in range(100):
        for name in ("gradient", "checkerboard"):
            px = S.render_background(name, 32, 32, rng).reshape(-1, 1, 3)
            worst = min(worst, np.linalg.norm(px - PALETTE[None], axis=-1).min())
    assert worst >= S.BACKGROUND_PALETTE_MARGIN
    checker = S.render_background("checkerboard", 64, 64, rng)
    assert len(np.unique(checker.reshape(-1, 3), axis=0)) == 2
    grad = S.render_background("gradient", 64, 64, rng)
    assert len(np.unique(grad.reshape(-1, 3), axis=0)) > 20


def test_two_objects_are_kept_apart_when_the_frame_allows():
    scene = C.SceneSpec(objects=(C.ObjectSpec("red", "circle", "small", "still", None),
                                 C.ObjectSpec("blue", "square", "small", "still", None)), background="black")
    for seed in range(10):
        video = S.render_scene(scene, seed=seed)
        assert colour_mask(video, "red").sum() > 100 and colour_mask(video, "blue").sum() > 100
        d = np.linalg.norm(centroid(colour_mask(video[0], "red")) - centroid(colour_mask(video[0], "blue")))
        assert d >= 2 * S.object_radius("small", 64, 64)


def test_write_dataset_format_and_determinism(tmp_path):
    out = S.write_dataset(tmp_path / "a", 6, seed=5, height=32, width=32, num_frames=9, fps=8, progress=False)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(set(r) == {"video", "text"} for r in rows)
    scenes = S.read_scenes(out)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["n"] == 6 and meta["num_frames"] == 9
    for r, s in zip(rows, scenes):
        assert s["video"] == r["video"] and s["text"] == r["text"]
        frames, fps = read_video(out / r["video"])
        assert frames.shape == (9, 32, 32, 3) and fps == pytest.approx(8)
        rendered = S.render_scene(s["scene"], height=32, width=32, num_frames=9, seed=s["render_seed"])
        assert np.abs(frames.astype(float) - rendered).mean() < 6.0  # H.264 at 32x32
    again = S.write_dataset(tmp_path / "b", 6, seed=5, height=32, width=32, num_frames=9, progress=False)
    assert (again / "scenes.jsonl").read_text() == (out / "scenes.jsonl").read_text()
    other = S.write_dataset(tmp_path / "c", 6, seed=6, height=32, width=32, num_frames=9, progress=False)
    assert (other / "captions.jsonl").read_text() != (out / "captions.jsonl").read_text()


def test_held_out_and_train_splits(tmp_path):
    split = C.split_combinations(0.1, seed=0)
    held = S.write_dataset(tmp_path / "held", 8, seed=0, height=16, width=16, num_frames=1, split=split,
                           held_out=True, video_format="gif", progress=False)
    rows = S.read_scenes(held)
    assert all(r["held_out"] and len(r["scene"].objects) == 1 for r in rows)
    assert all(r["scene"].objects[0].combination in split.held_out for r in rows)
    assert all(r["video"].endswith(".gif") for r in rows)
    train = S.write_dataset(tmp_path / "train", 8, seed=0, height=16, width=16, num_frames=1, split=split,
                            two_object_prob=0.5, progress=False)
    assert not any(r["held_out"] for r in S.read_scenes(train))
    assert all(c in split.train for r in S.read_scenes(train) for c in r["scene"].combinations)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        S.write_dataset("/nonexistent/never", 0)
    with pytest.raises(ValueError, match="supersample"):
        S.render_scene(one(), supersample=0)
    with pytest.raises(ValueError, match="unknown background"):
        S.render_background("plaid", 8, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="height, width >= 8"):
        S.render_scene(one(), height=4, width=8)
    assert S.render_scene(one(size="large", motion="up_left", speed="fast"), height=8, width=8).shape == (17, 8, 8, 3)
