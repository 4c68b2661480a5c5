"""Synthetic-domain renderer and dataset writer: determinism, what the pixels show, the folder format."""

import json

import numpy as np
import pytest

from neodragon_jax.data import captions as C
from neodragon_jax.data import synthetic as S
from neodragon_jax.data.video_io import read_video

H = W = 32
FRAMES = 9


def one(colour="red", shape="square", motion="right", background="black"):
    speed = None if motion == "still" else "regular"
    return C.SceneSpec(objects=(C.ObjectSpec(colour, shape, "regular", motion, speed),), background=background)


def render(scene, **kw):
    return S.render_scene(scene, **{"height": H, "width": W, "num_frames": FRAMES, **kw})


def colour_mask(frames, colour, tol=1.0):
    return np.linalg.norm(frames.astype(np.float64) - np.asarray(C.COLOURS[colour]), axis=-1) < tol


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def test_same_seed_same_video_other_seed_other_video():
    scene = one(background="gray")
    a = render(scene, seed=3)
    assert a.dtype == np.uint8 and a.shape == (FRAMES, H, W, 3)
    np.testing.assert_array_equal(a, render(scene, seed=3))
    assert not np.array_equal(a, render(scene, seed=4))
    assert S.render_scene(scene, height=32, width=48, num_frames=5, seed=3).shape == (5, 32, 48, 3)


@pytest.mark.parametrize("shape", C.SHAPES)
def test_shape_areas_and_antialiasing(shape):
    r = 10.0
    soft = S.shape_coverage(shape, 20.3, 19.7, r, 40, 40, supersample=8)
    crisp = S.shape_coverage(shape, 20.3, 19.7, r, 40, 40, supersample=1)
    assert soft.sum() == pytest.approx(S.shape_area(shape) * r * r, rel=0.02)
    assert crisp.sum() == pytest.approx(S.shape_area(shape) * r * r, rel=0.1)
    assert set(np.unique(crisp)) <= {0.0, 1.0}
    assert ((soft > 0) & (soft < 1)).any(), "antialiased edges have partial coverage"


def test_every_shape_has_a_drawing_and_nothing_else():
    assert set(S.SHAPE_POLYGONS) | {"circle"} == set(C.SHAPES)
    with pytest.raises(ValueError, match="unknown shape"):
        S.inside_shape("star", np.zeros(1), np.zeros(1))


def test_shapes_are_distinct_drawings_at_32x32():
    r = S.object_radius("regular", H, W)
    assert r == pytest.approx(6.4)
    masks = {s: S.shape_coverage(s, 16, 16, r, H, W) > 0.5 for s in C.SHAPES}
    for a in C.SHAPES:
        for b in C.SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.8, (a, b, iou)


@pytest.mark.parametrize("motion", [m for m in C.MOTIONS if C.MOTIONS[m].kind == "linear"])
def test_linear_motion_direction_and_distance(motion):
    video = render(one(motion=motion), seed=1, supersample=1)
    c0, c1 = centroid(colour_mask(video[0], "red")), centroid(colour_mask(video[-1], "red"))
    travel = S.linear_travel(motion, "regular", "regular", H, W)
    np.testing.assert_allclose(c1 - c0, np.asarray(C.MOTIONS[motion].direction) * travel, atol=1.0)


def test_the_one_speed_fits_every_direction_at_32x32():
    """0.4 x 32 = 12.8 px of travel, never shortened: the frame leaves the object's centre 17.2 px of room."""
    for motion, m in C.MOTIONS.items():
        if m.kind == "linear":
            assert S.linear_travel(motion, "regular", "regular", H, W) == pytest.approx(C.SPEEDS["regular"] * W)


def test_still_objects_do_not_move():
    still = render(one(motion="still"), seed=0)
    assert all(np.array_equal(still[0], f) for f in still)


@pytest.mark.parametrize("motion", ["up_left", "down_right", "left", "still"])
@pytest.mark.parametrize("shape", C.SHAPES)
def test_objects_stay_inside_the_frame(shape, motion):
    for seed in range(5):
        video = render(one(shape=shape, motion=motion), seed=seed)
        m = colour_mask(video, "red", tol=60)
        border = m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any() or m[:, :, -1].any()
        assert not border
        assert m.reshape(len(m), -1).any(-1).all(), "visible in every frame"


def test_backgrounds_are_solid():
    for name, rgb in C.BACKGROUNDS.items():
        bg = S.render_background(name, 8, 8)
        assert bg.shape == (8, 8, 3)
        np.testing.assert_array_equal(bg.reshape(-1, 3), np.tile(rgb, (64, 1)))
        video = render(one(background=name, colour="blue"), seed=0)
        corner = video[:, 0, 0]
        np.testing.assert_array_equal(corner, np.tile(rgb, (FRAMES, 1)))
    for gone in ("gradient", "checkerboard"):
        with pytest.raises(ValueError, match="unknown background"):
            S.render_background(gone, 8, 8)


def test_two_objects_are_kept_apart_when_the_frame_allows():
    scene = C.SceneSpec(objects=(C.ObjectSpec("red", "circle", "regular", "still", None),
                                 C.ObjectSpec("blue", "square", "regular", "still", None)), background="black")
    for seed in range(10):
        video = render(scene, seed=seed)
        assert colour_mask(video, "red").sum() > 50 * FRAMES and colour_mask(video, "blue").sum() > 30 * FRAMES
        d = np.linalg.norm(centroid(colour_mask(video[0], "red")) - centroid(colour_mask(video[0], "blue")))
        assert d >= 2 * S.object_radius("regular", H, W)


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
        np.testing.assert_array_equal(frames, rendered)  # lossless RGB H.264: the exact pixels
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
        S.render_background("plaid", 8, 8)
    with pytest.raises(ValueError, match="height, width >= 8"):
        S.render_scene(one(), height=4, width=8)
    assert S.render_scene(one(motion="up_left"), height=8, width=8).shape == (17, 8, 8, 3)
