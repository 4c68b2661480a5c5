"""Synthetic-domain captions: determinism, paraphrase variety, content, vocabulary and the held-out split."""

import re

import numpy as np
import pytest

from neodragon_jax.data import captions as C


def _scenes_and_captions(seed: int, n: int = 50):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = C.sample_scene(rng)
        out.append((scene, C.caption(scene, rng)))
    return out


def test_same_seed_same_scenes_and_captions():
    assert _scenes_and_captions(3) == _scenes_and_captions(3)
    assert list(C.caption_corpus(40, seed=5)) == list(C.caption_corpus(40, seed=5))


def test_different_seeds_differ():
    a, b = _scenes_and_captions(3), _scenes_and_captions(4)
    assert [s for s, _ in a] != [s for s, _ in b]
    assert [c for _, c in a] != [c for _, c in b]


def test_paraphrases_vary_but_keep_the_content():
    scene = C.SceneSpec(
        objects=(C.ObjectSpec("purple", "diamond", "regular", "up_left", "regular"),), background="gray"
    )
    rng = np.random.default_rng(0)
    texts = {C.caption(scene, rng) for _ in range(200)}
    assert len(texts) >= 50, f"only {len(texts)} distinct wordings"
    for text in texts:
        words = set(re.findall(r"[a-z]+", text))
        assert words & set(C.COLOUR_WORDS["purple"])
        assert words & set(C.SHAPE_WORDS["diamond"])
        assert words & set(C.BACKGROUND_COLOUR_WORDS["gray"])
        assert any(phrase in text for phrase in C.DIRECTION_WORDS["up_left"])
        # Nothing from other values of the same attributes.
        for colour, options in C.COLOUR_WORDS.items():
            if colour != "purple":
                assert not words & set(options), text
        for shape, options in C.SHAPE_WORDS.items():
            if shape != "diamond":
                assert not words & set(options), text


def test_captions_never_state_size_or_speed():
    """One size and one speed: their wordings are empty and captions read "a red circle moving left ..."."""
    assert list(C.SIZES) == ["regular"] and list(C.SPEEDS) == ["regular"]
    assert C.SIZE_WORDS == {"regular": ()} and C.SPEED_WORDS == {"regular": ()}
    scene = C.SceneSpec((C.ObjectSpec("red", "circle", "regular", "left", "regular"),), "black")
    assert C.canonical_caption(scene) == "a red circle moving to the left on a black background"
    orange = C.SceneSpec((C.ObjectSpec("orange", "square", "regular", "still", None),), "white")
    assert C.canonical_caption(orange) == "an orange square standing still on a white background"
    old_words = {"small", "little", "tiny", "large", "big", "slowly", "gently", "slow", "quickly", "fast",
                 "rapidly", "speed", "pace", "bouncing", "bounces", "hopping", "hops", "gradient", "checkerboard",
                 "checkered", "star", "cross", "ring", "hexagon"}
    assert not old_words & set(C.all_caption_words())
    for text in C.caption_corpus(500, seed=3):
        assert "  " not in text and text == text.strip(), repr(text)
        assert re.match(r"(a |an |on |over |against |two )", text), text


def test_domain_vocabularies():
    assert C.SHAPES == ("circle", "square", "triangle", "diamond")
    assert set(C.MOTIONS) == {"left", "right", "up", "down", "up_left", "up_right", "down_left", "down_right", "still"}
    assert {m.kind for m in C.MOTIONS.values()} == {"linear", "still"}
    assert C.BACKGROUNDS == {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
    assert len(C.COLOURS) == 8
    assert len(C.all_combinations()) == 8 * 4 * 9


def test_two_object_captions_name_both_objects():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = C.sample_scene(rng, num_objects=2)
        text = C.caption(scene, rng)
        words = set(re.findall(r"[a-z]+", text))
        for obj in scene.objects:
            assert words & set(C.COLOUR_WORDS[obj.colour]), text
        a, b = scene.objects
        assert (a.colour, a.shape) != (b.colour, b.shape)


def test_caption_words_are_the_known_vocabulary():
    vocab = set(C.all_caption_words())
    for text in C.caption_corpus(2000, seed=11):
        unknown = set(re.findall(r"[a-z]+", text)) - vocab
        assert not unknown, (text, unknown)
        assert re.fullmatch(r"[a-z ,:]+", text), text
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert set(re.findall(r"[a-z]+", C.canonical_caption(C.sample_scene(rng)))) <= vocab


def test_objects_are_never_invisible():
    rng = np.random.default_rng(2)
    for _ in range(500):
        scene = C.sample_scene(rng)
        assert all(o.colour != scene.background for o in scene.objects)
        assert all((o.speed is None) == (o.motion == "still") for o in scene.objects)


@pytest.mark.parametrize(
    "make",
    [
        lambda: C.ObjectSpec("pink", "circle", "regular", "left", "regular"),
        lambda: C.ObjectSpec("red", "circle", "regular", "still", "regular"),
        lambda: C.ObjectSpec("red", "circle", "regular", "left", None),
        lambda: C.ObjectSpec("red", "star", "regular", "left", "regular"),
        lambda: C.ObjectSpec("red", "circle", "small", "left", "regular"),
        lambda: C.ObjectSpec("red", "circle", "regular", "left", "fast"),
        lambda: C.ObjectSpec("red", "circle", "regular", "bounce", "regular"),
        lambda: C.SceneSpec((C.ObjectSpec("red", "circle", "regular", "up", "regular"),), "checkerboard"),
        lambda: C.SceneSpec((C.ObjectSpec("white", "square", "regular", "up", "regular"),), "white"),
        lambda: C.SceneSpec((), "black"),
    ],
)
def test_bad_scenes_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_held_out_split_is_disjoint_complete_and_deterministic():
    split = C.split_combinations(held_out_fraction=0.1, seed=0)
    everything = set(C.all_combinations())
    assert len(everything) == 288 and len(split.held_out) == 29
    assert not split.train & split.held_out
    assert split.train | split.held_out == everything
    assert len(split.held_out) == round(0.1 * len(everything))
    assert C.split_combinations(0.1, seed=0) == split
    assert C.split_combinations(0.1, seed=1).held_out != split.held_out
    # Every attribute pair of a held-out triple is still seen in training.
    for colour, shape, motion in split.held_out:
        assert any(c == colour and s == shape for c, s, _ in split.train)
        assert any(c == colour and m == motion for c, _, m in split.train)
        assert any(s == shape and m == motion for _, s, m in split.train)


def test_sampling_respects_the_split():
    split = C.split_combinations()
    rng = np.random.default_rng(4)
    for _ in range(300):
        assert not split.is_held_out(C.sample_scene(rng, combinations=split.train))
    held = C.held_out_scenes(split, 30, seed=0)
    assert all(split.is_held_out(s) and len(s.objects) == 1 for s in held)
    assert held == C.held_out_scenes(split, 30, seed=0)
