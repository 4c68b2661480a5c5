"""Pixel scorer: caption parsing, ground-truth accuracy on the renderer's own videos (through mp4), chance
level with shuffled captions, two-object matching, quality figures."""

import collections

import numpy as np
import pytest

from neodragon_jax.data import captions as C
from neodragon_jax.data import synthetic as S
from neodragon_jax.data.video_io import read_video
from neodragon_jax.eval import scorer as E

N_VIDEOS = 50


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """50 generated videos at the tiny preset's 64x64, 17 frames, written as mp4 and read back."""
    out = S.write_dataset(tmp_path_factory.mktemp("synthetic"), N_VIDEOS, seed=11, height=64, width=64,
                          num_frames=17, fps=8, progress=False)
    rows = S.read_scenes(out)
    frames = [read_video(out / r["video"])[0] for r in rows]
    return out, rows, frames


@pytest.fixture(scope="module")
def ground_truth(dataset):
    out, rows, frames = dataset
    return E.score_pairs(zip(frames, [r["text"] for r in rows]))


def test_parse_recovers_every_generated_caption():
    rng = np.random.default_rng(7)
    for _ in range(1500):
        scene = C.sample_scene(rng)
        assert E.parse_caption(C.caption(scene, rng)) == E.ParsedCaption.from_scene(scene)
        assert E.parse_caption(C.canonical_caption(scene)) == E.ParsedCaption.from_scene(scene)


@pytest.mark.parametrize("text, expected", [
    ("A big violet hoop hopping quickly over a grey backdrop.", ("purple", "ring", "large", "bounce", "fast", "gray")),
    ("tiny aqua plus sign moving upwards and to the right fast, in front of a checkered background",
     ("cyan", "cross", "small", "up_right", "fast", "checkerboard")),
    ("Tiny red disk, stationary, on a white background", ("red", "circle", "small", "still", None, "white")),
    ("on black: one large block coloured white drifting leftwards slowly",
     ("white", "square", "large", "left", "slow", "black")),
])
def test_parse_paraphrases(text, expected):
    p = E.parse_caption(text)
    assert len(p.objects) == 1
    o = p.objects[0]
    assert (o.colour, o.shape, o.size, o.motion, o.speed, p.background) == expected


def test_parse_two_objects_and_unknowns():
    p = E.parse_caption("a large orange star slides to the left slowly and a small white square stays in place "
                        "on a black background")
    got = [(o.colour, o.shape, o.motion) for o in p.objects]
    assert got == [("orange", "star", "left"), ("white", "square", "still")]
    assert p.background == "black"
    vague = E.parse_caption("something wobbles")
    assert vague.objects == () and vague.background is None


def test_scores_the_generators_own_videos_near_perfectly(ground_truth, dataset):
    rep = ground_truth
    print("\n" + rep.table())
    assert set(rep.accuracy) == set(E.ATTRIBUTES)
    for attribute, acc in rep.accuracy.items():
        assert acc >= 0.95, (attribute, acc)
    assert rep.counts["background"] == N_VIDEOS
    assert rep.counts["colour"] == sum(len(r["scene"].objects) for r in dataset[1])
    # The pixel estimates agree with the ground-truth scenes directly too (no caption parsing involved).
    gt = E.report([E.judge(E.ParsedCaption.from_scene(r["scene"]), s.analysis)
                   for r, s in zip(dataset[1], rep.videos)])
    assert gt.accuracy == rep.accuracy


def test_shuffled_captions_score_near_chance(ground_truth, dataset):
    rows = dataset[1]
    perm = np.roll(np.arange(N_VIDEOS), 7)  # a derangement: no video keeps its caption
    shuffled = E.report([E.judge(E.parse_caption(rows[j]["text"]), ground_truth.videos[i].analysis)
                         for i, j in enumerate(perm)])
    print("\n" + shuffled.table())
    # Chance for an attribute: probability that two independently drawn values agree, from the data itself.
    values = collections.defaultdict(list)
    for r in rows:
        values["background"].append(r["scene"].background)
        values["count"].append(len(r["scene"].objects))
        for o in r["scene"].objects:
            for a in ("colour", "shape", "size", "motion"):
                values[a].append(getattr(o, a))
            if o.speed is not None:
                values["speed"].append(o.speed)
    for attribute, acc in shuffled.accuracy.items():
        freq = np.array(list(collections.Counter(values[attribute]).values()), float)
        chance = float(((freq / freq.sum()) ** 2).sum())
        # Two-object matching picks the better partner, which lifts chance a little.
        assert acc <= chance + 0.2, (attribute, acc, chance)
        assert acc < ground_truth.accuracy[attribute] - 0.3, attribute
    assert shuffled.all_correct == 0.0


def test_two_object_captions_in_either_order_and_count():
    a = C.ObjectSpec("yellow", "star", "large", "right", "fast")
    b = C.ObjectSpec("cyan", "ring", "small", "still", None)
    scene = C.SceneSpec(objects=(a, b), background="gray")
    video = S.render_scene(scene, seed=2)
    swapped = C.SceneSpec(objects=(b, a), background="gray")
    for s in (scene, swapped):
        score = E.score_video(video, C.canonical_caption(s))
        assert score.all_correct, score.judgements
        assert len(score.judgements["colour"]) == 2
    only_one = E.score_video(video, "a large yellow star moving quickly to the right on gray")
    assert only_one.judgements["count"] == [False]
    assert all(only_one.judgements[a] == [True] for a in ("colour", "shape", "size", "motion", "speed"))


def test_same_colour_objects_are_told_apart():
    scene = C.SceneSpec(objects=(C.ObjectSpec("green", "triangle", "small", "still", None),
                                 C.ObjectSpec("green", "circle", "small", "down", "slow")), background="black")
    score = E.score_video(S.render_scene(scene, seed=0), scene)
    assert score.all_correct, (score.judgements, score.analysis.objects)


def test_missing_object_counts_as_wrong():
    blank = S.render_scene(C.SceneSpec(objects=(C.ObjectSpec("red", "circle", "small", "still", None),),
                                       background="black"), seed=0) * 0
    score = E.score_video(blank, "a small red circle standing still on black")
    assert score.analysis.objects == []
    assert score.judgements["colour"] == [False] and score.judgements["background"] == [True]


def test_quality_figures_follow_degradation():
    scene = C.SceneSpec(objects=(C.ObjectSpec("red", "square", "large", "right", "slow"),), background="gray")
    clean = S.render_scene(scene, seed=0)
    rng = np.random.default_rng(0)
    x = clean.astype(np.float32)
    blurred = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5
    noisy = np.clip(blurred + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    q_clean = E.analyse_video(clean).quality
    q_bad = E.analyse_video(noisy).quality
    assert q_clean["flicker"] < 0.002 and q_bad["flicker"] > 5 * q_clean["flicker"]
    assert q_clean["palette_fraction"] > 0.98 and q_bad["palette_fraction"] < q_clean["palette_fraction"] - 0.05
    assert 0 < q_clean["frame_diff"] < 0.05
    assert q_clean["saturation"] > 0.05
    smooth = E.analyse_video(blurred.astype(np.uint8)).quality
    assert smooth["sharpness"] < q_clean["sharpness"]


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        E.analyse_video(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no videos"):
        E.report([])


def test_score_folder(dataset):
    rep = E.score_folder(dataset[0], limit=5)
    assert rep.num_videos == 5 and set(rep.to_dict()) >= {"accuracy", "quality", "all_correct"}
