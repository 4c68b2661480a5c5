"""Strict pixel scorer: caption parsing, Lab and the named-colour tables, accuracy on the renderer's own videos
(32x32, 9 frames, through a lossless mp4), chance level with deranged captions, colour casts that must be
judged wrong, blur and lossy-codec robustness, two-object scenes, quality figures."""

import numpy as np
import pytest

from neodragon_jax.data import captions as C
from neodragon_jax.data import synthetic as S
from neodragon_jax.data.video_io import read_video, write_mp4
from neodragon_jax.eval import scorer as E

H = W = 32
FRAMES = 9
N_RENDERS = 200
JUDGED = ("colour", "shape", "motion", "background", "count")


def render(scene, seed=0):
    return S.render_scene(scene, height=H, width=W, num_frames=FRAMES, seed=seed)


def one(colour="red", shape="circle", motion="right", background="black"):
    speed = None if motion == "still" else "regular"
    return C.SceneSpec((C.ObjectSpec(colour, shape, "regular", motion, speed),), background)


def gaussian_blur(frames, sigma):
    """Separable Gaussian blur of uint8 ``[F, H, W, 3]`` over H and W (edges replicated)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = frames.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="edge")
        x = sum(w * np.take(xp, np.arange(i, i + frames.shape[axis]), axis=axis) for i, w in enumerate(k))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """200 one-object scenes (the domain's default) written by ``write_dataset`` as lossless mp4, read back."""
    out = S.write_dataset(tmp_path_factory.mktemp("synthetic"), N_RENDERS, seed=11, height=H, width=W,
                          num_frames=FRAMES, fps=8, two_object_prob=0.0, progress=False)
    rows = S.read_scenes(out)
    frames = [read_video(out / r["video"])[0] for r in rows]
    return out, rows, frames


@pytest.fixture(scope="module")
def renders_report(renders):
    _, rows, frames = renders
    return E.score_pairs(zip(frames, [r["text"] for r in rows]))


# -- colour science ---------------------------------------------------------------------------------------


def test_srgb_to_lab_reference_values():
    # Reference values (D65): white, black, the sRGB primaries and mid gray.
    expected = {(255, 255, 255): (100.0, 0.0, 0.0), (0, 0, 0): (0.0, 0.0, 0.0),
                (255, 0, 0): (53.24, 80.09, 67.20), (0, 255, 0): (87.73, -86.18, 83.18),
                (0, 0, 255): (32.30, 79.19, -107.86), (128, 128, 128): (53.59, 0.0, 0.0)}
    for rgb, lab in expected.items():
        np.testing.assert_allclose(E.srgb_to_lab(rgb), lab, atol=0.05, err_msg=str(rgb))
    assert E.srgb_to_lab(np.zeros((2, 3, 4, 3))).shape == (2, 3, 4, 3)


def test_named_colour_tables():
    objects, backgrounds = E.NamedColours(E.OBJECT_COLOUR_TABLE), E.NamedColours(E.BACKGROUND_COLOUR_TABLE)
    assert set(C.COLOURS) < set(E.OBJECT_COLOUR_TABLE) and set(C.BACKGROUNDS) < set(E.BACKGROUND_COLOUR_TABLE)
    # Each domain colour names itself and keeps a margin to every other entry (a cast under half of it is
    # tolerated); the smallest margins are documented in the module docstring.
    for table, names in ((objects, C.COLOURS), (backgrounds, C.BACKGROUNDS)):
        for name in names:
            rgb = (E.OBJECT_COLOUR_TABLE if table is objects else E.BACKGROUND_COLOUR_TABLE)[name]
            lab = E.srgb_to_lab(rgb)
            assert table.nearest(lab)[0] == name
            others = [n for n in table.names if n != name]
            margin = min(np.linalg.norm(table.lab[table.names.index(n)] - lab) for n in others)
            assert margin >= 13.0, (name, margin)
    # A distractor is never a word a caption could use for an object's colour.
    caption_colour_words = {w for words in C.COLOUR_WORDS.values() for w in words} | {"violet", "aqua", "turquoise"}
    assert not set(E.OBJECT_DISTRACTORS) & caption_colour_words


# -- caption parsing --------------------------------------------------------------------------------------


def test_parse_recovers_every_generated_caption():
    rng = np.random.default_rng(7)
    for _ in range(1500):
        scene = C.sample_scene(rng)
        assert E.parse_caption(C.caption(scene, rng)) == E.ParsedCaption.from_scene(scene)
        assert E.parse_caption(C.canonical_caption(scene)) == E.ParsedCaption.from_scene(scene)


@pytest.mark.parametrize("text, expected", [
    ("A violet rhombus drifting leftwards over a grey backdrop.", ("purple", "diamond", "left", "gray")),
    ("aqua disk moving upwards and to the right, in front of a white background",
     ("cyan", "circle", "up_right", "white")),
    ("Red disk, stationary, on a white background", ("red", "circle", "still", "white")),
    ("on black: one block coloured white drifting towards the bottom left", ("white", "square", "down_left", "black")),
    # Size and speed words this domain does not have are not understood, so never judged.
    ("a big yellow triangle moving quickly up on gray", ("yellow", "triangle", "up", "gray")),
])
def test_parse_paraphrases(text, expected):
    p = E.parse_caption(text)
    assert len(p.objects) == 1
    o = p.objects[0]
    assert (o.colour, o.shape, o.motion, p.background) == expected
    assert o.size is None and o.speed is None


def test_parse_two_objects_and_unknowns():
    p = E.parse_caption("an orange triangle slides to the left and a white square stays in place on a black background")
    got = [(o.colour, o.shape, o.motion) for o in p.objects]
    assert got == [("orange", "triangle", "left"), ("white", "square", "still")]
    assert p.background == "black"
    vague = E.parse_caption("something wobbles over a checkerboard")
    assert vague.objects == () and vague.background is None
    assert E.parse_caption("a red star bouncing on black").objects == ()  # shapes and motions of the old domain


# -- the renderer's own videos ----------------------------------------------------------------------------


def test_renders_score_near_perfectly(renders_report, renders):
    rep, rows = renders_report, renders[1]
    print("\n" + rep.table())
    assert set(rep.accuracy) == set(JUDGED), "captions state neither size nor speed: those are not judged"
    for attribute in JUDGED:
        assert rep.accuracy[attribute] >= 0.99, (attribute, rep.accuracy[attribute])
        assert rep.counts[attribute] == N_RENDERS
    # The pixel estimates agree with the ground-truth scenes directly too (no caption parsing involved).
    gt = E.report([E.judge(E.ParsedCaption.from_scene(r["scene"]), s.analysis) for r, s in zip(rows, rep.videos)])
    assert gt.accuracy == rep.accuracy
    # Lossless renders: each core colour and background is its named colour exactly.
    assert max(o.colour_distance for s in rep.videos for o in s.analysis.objects) < 0.5
    assert max(s.analysis.background_distance for s in rep.videos) < 0.5


def test_chance_level_with_deranged_captions(renders_report, renders):
    rows = renders[1]
    analyses = [s.analysis for s in renders_report.videos]
    texts = [r["text"] for r in rows]
    chance = E.chance_level(analyses, texts, shuffles=8, seed=0)
    print("\nchance", {a: round(v, 3) for a, v in chance.items()})
    assert set(chance) == set(JUDGED)
    for attribute, level in (("colour", 1 / 8), ("shape", 1 / 4), ("motion", 1 / 9), ("background", 1 / 3)):
        assert abs(chance[attribute] - level) <= 0.06, (attribute, chance[attribute], level)
        assert chance[attribute] < renders_report.accuracy[attribute] - 0.5
    assert chance["count"] == 1.0  # every scene has one object
    assert E.chance_level(analyses, texts, shuffles=8, seed=0) == chance
    assert E.chance_level(analyses, texts, shuffles=8, seed=1) != chance
    # Videos or their analyses: the same figures.
    from_videos = E.chance_level(renders[2][:12], texts[:12], shuffles=2)
    assert from_videos == E.chance_level(analyses[:12], texts[:12], shuffles=2)


def test_chance_level_arguments():
    video = render(one())
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        E.chance_level([video, video], ["a red circle"])
    with pytest.raises(ValueError, match="at least 2"):
        E.chance_level([video], ["a red circle"])
    with pytest.raises(ValueError, match="shuffles"):
        E.chance_level([video, video], ["a", "b"], shuffles=0)


def test_derangements_move_every_caption():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        for _ in range(20):
            perm = E._derangement(n, rng)
            assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()


# -- colour casts are wrong -------------------------------------------------------------------------------


def _recoloured(table, name, rgb, scene, monkeypatch):
    """``scene`` rendered with ``table[name]`` (a renderer colour) replaced by ``rgb``; the scorer's named
    colours were copied at import, so they keep the true values."""
    with monkeypatch.context() as m:
        m.setitem(table, name, rgb)
        return render(scene, seed=3)


def _mix(a, b, t):
    return tuple(int(round(v)) for v in (1 - t) * np.asarray(a, float) + t * np.asarray(b, float))


@pytest.mark.parametrize("background", list(C.BACKGROUNDS))
def test_red_tinted_towards_brown_is_wrong(background, monkeypatch):
    scene = one("red", "square", "left", background)
    brown = E.OBJECT_COLOUR_TABLE["brown"]
    halfway_rgb = _mix(C.COLOURS["red"], brown, 0.5)  # (185, 60, 40)
    halfway = E.score_video(_recoloured(C.COLOURS, "red", halfway_rgb, scene, monkeypatch), scene)
    assert halfway.judgements["colour"] == [False] and halfway.analysis.objects[0].colour == "rust"
    assert halfway.judgements["shape"] == halfway.judgements["motion"] == [True]  # only the colour is off
    browned = E.score_video(_recoloured(C.COLOURS, "red", brown, scene, monkeypatch), scene)
    assert browned.analysis.objects[0].colour == "brown"
    slight = E.score_video(_recoloured(C.COLOURS, "red", _mix(C.COLOURS["red"], brown, 0.2), scene, monkeypatch), scene)
    assert slight.judgements["colour"] == [True], "a slight cast stays within red's margin"


def test_white_object_rendered_gray_is_wrong(monkeypatch):
    scene = one("white", "circle", "still", "black")
    assert E.score_video(render(scene, seed=3), scene).judgements["colour"] == [True]
    gray = E.score_video(_recoloured(C.COLOURS, "white", (128, 128, 128), scene, monkeypatch), scene)
    assert gray.judgements["colour"] == [False] and gray.analysis.objects[0].colour == "gray"
    dim = E.score_video(_recoloured(C.COLOURS, "white", (192, 192, 192), scene, monkeypatch), scene)
    assert dim.analysis.objects[0].colour == "light gray"


def test_pink_tinted_white_backdrop_is_wrong(monkeypatch):
    scene = one("blue", "triangle", "down", "white")
    pinkish = _mix(C.BACKGROUNDS["white"], (255, 160, 180), 0.3)  # (255, 226, 232)
    score = E.score_video(_recoloured(C.BACKGROUNDS, "white", pinkish, scene, monkeypatch), scene)
    assert score.analysis.background == "pale pink" and score.judgements["background"] == [False]
    assert score.judgements["colour"] == score.judgements["motion"] == [True]
    faint = _mix(C.BACKGROUNDS["white"], (255, 160, 180), 0.1)
    faint_score = E.score_video(_recoloured(C.BACKGROUNDS, "white", faint, scene, monkeypatch), scene)
    assert faint_score.judgements["background"] == [True], "a faint tint stays within white's margin"


# -- degraded renders -------------------------------------------------------------------------------------


def _every_colour_on_every_background():
    scenes = []
    for i, (colour, background) in enumerate((c, b) for c in C.COLOURS for b in C.BACKGROUNDS if c != b):
        for j, motion in enumerate(("still", list(C.MOTIONS)[i % 8])):
            scenes.append((one(colour, C.SHAPES[(i + j) % 4], motion, background), i * 2 + j))
    return scenes


def test_blurred_renders_keep_colour_and_motion():
    """A Gaussian blur (sigma 0.7 px) mixes every edge pixel with the background; the core pixels keep the
    object's colour, so colour and motion stay right for every colour on every background."""
    scenes = _every_colour_on_every_background()
    rep = E.score_pairs((gaussian_blur(render(s, seed), 0.7), s) for s, seed in scenes)
    print("\n" + rep.table())
    assert rep.accuracy["colour"] == 1.0 and rep.accuracy["motion"] == 1.0
    assert rep.accuracy["shape"] >= 0.95 and rep.accuracy["count"] == 1.0 and rep.accuracy["background"] == 1.0


def test_lossy_yuv420_mp4(tmp_path):
    """What a lossy mp4 does (``write_mp4`` default: yuv420p, crf 18). Measured over these videos (and 200
    random ones): every attribute stays right and core colours move by under ~4 Delta E. 4:2:0 chroma bleeds
    into a rim of another colour along an object's edges (for a square moving down, a whole bottom row of
    navy under a blue square on black); the rim is too thin to be a second object. Heavier compression costs
    colour and shape first (module docstring), so the demo writes generated videos losslessly."""
    rims = [(one("blue", "square", "down", "black"), 4), (one("blue", "square", "right", "black"), 2),
            (one("purple", "square", "down", "gray"), 4), (one("yellow", "square", "down", "white"), 0)]
    scenes = _every_colour_on_every_background() + rims
    videos = []
    for s, seed in scenes:
        write_mp4(render(s, seed), tmp_path / "v.mp4", fps=8)
        videos.append(read_video(tmp_path / "v.mp4")[0])
    rep = E.score_pairs(zip(videos, [s for s, _ in scenes]))
    print("\n" + rep.table())
    for attribute in JUDGED:
        assert rep.accuracy[attribute] >= 0.97, (attribute, rep.accuracy[attribute])
    worst = max(o.colour_distance for v in rep.videos for o in v.analysis.objects)
    assert worst < 8.0, worst


# -- two objects ------------------------------------------------------------------------------------------


def test_two_object_scenes():
    """At 32x32 two objects often overlap; differently coloured ones are cut apart by colour, same-coloured
    ones that overlap in most frames count as one."""
    scenes = [S.dataset_item(i, seed=5, num_objects=2) for i in range(50)]
    rep = E.score_pairs((render(scene, seed), text) for scene, text, seed in scenes)
    print("\n" + rep.table())
    for attribute in JUDGED:
        assert rep.accuracy[attribute] >= 0.9, (attribute, rep.accuracy[attribute])
    assert rep.counts["colour"] == 100


def test_two_object_captions_in_either_order_and_count():
    a = C.ObjectSpec("yellow", "diamond", "regular", "right", "regular")
    b = C.ObjectSpec("cyan", "circle", "regular", "still", None)
    scene = C.SceneSpec(objects=(a, b), background="gray")
    video = render(scene, seed=2)
    swapped = C.SceneSpec(objects=(b, a), background="gray")
    for s in (scene, swapped):
        score = E.score_video(video, C.canonical_caption(s))
        assert score.all_correct, score.judgements
        assert len(score.judgements["colour"]) == 2
    only_one = E.score_video(video, "a yellow diamond moving to the right on gray")
    assert only_one.judgements["count"] == [False]
    assert all(only_one.judgements[a] == [True] for a in ("colour", "shape", "motion"))


def test_touching_objects_of_different_colours_are_cut_apart():
    """Two squares side by side with no background between them form one component; it is two objects."""
    frames = np.zeros((FRAMES, H, W, 3), np.uint8)
    for f in range(FRAMES):
        frames[f, 10:20, 4 + f:14 + f] = C.COLOURS["red"]
        frames[f, 10:20, 14 + f:24 + f] = C.COLOURS["blue"]
    score = E.score_video(frames, "a red square moving right and a blue square moving right on black")
    assert score.all_correct, (score.judgements, score.analysis.objects)


def test_same_colour_objects_are_told_apart():
    scene = C.SceneSpec(objects=(C.ObjectSpec("green", "triangle", "regular", "still", None),
                                 C.ObjectSpec("green", "circle", "regular", "down", "regular")), background="black")
    score = E.score_video(render(scene, seed=0), scene)
    assert score.all_correct, (score.judgements, score.analysis.objects)


def test_missing_object_counts_as_wrong():
    blank = render(one("red", "circle", "still", "black")) * 0
    score = E.score_video(blank, "a red circle standing still on black")
    assert score.analysis.objects == []
    assert score.judgements["colour"] == [False] and score.judgements["background"] == [True]
    assert score.judgements["count"] == [False]


# -- quality figures, errors, folders ---------------------------------------------------------------------


def test_quality_figures_follow_degradation():
    clean = render(one("red", "square", "right", "gray"))
    rng = np.random.default_rng(0)
    x = clean.astype(np.float32)
    blurred = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5
    noisy = np.clip(blurred + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    q_clean = E.analyse_video(clean).quality
    q_bad = E.analyse_video(noisy).quality
    assert q_clean["flicker"] < 0.002 and q_bad["flicker"] > 5 * q_clean["flicker"]
    assert q_clean["palette_fraction"] > 0.95 and q_bad["palette_fraction"] < q_clean["palette_fraction"] - 0.05
    assert 0 < q_clean["frame_diff"] < 0.05
    assert q_clean["saturation"] > 0.05
    smooth = E.analyse_video(blurred.astype(np.uint8)).quality
    assert smooth["sharpness"] < q_clean["sharpness"]


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        E.analyse_video(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no videos"):
        E.report([])


def test_score_folder(renders):
    rep = E.score_folder(renders[0], limit=5)
    assert rep.num_videos == 5 and set(rep.to_dict()) >= {"accuracy", "quality", "all_correct"}
    assert rep.accuracy["colour"] == 1.0
