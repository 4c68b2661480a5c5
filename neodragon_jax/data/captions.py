"""Caption side of the synthetic captioned-video domain.

A scene is one or two coloured shapes, each with a size and a motion (a direction at a speed, or standing
still), over a solid background. Everything the renderer needs is data here (vocabularies with their
numeric meaning); everything a caption says comes from the phrase tables below, so the set of words a
caption can contain is known exactly (``all_caption_words``) and the tiny tokenizers are trained on it.

All randomness goes through a caller-supplied ``numpy.random.Generator``: the same seed gives the same
scenes and the same captions on every platform.

Held-out prompts for compositional generalisation come from ``split_combinations``: a deterministic set of
(colour, shape, motion) triples never used in training, chosen so that every pair of attribute values still
appears in the training triples.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Vocabularies (data the renderer uses)
# ---------------------------------------------------------------------------------------------------------

#: Object colours and their sRGB values.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (245, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
}

#: Shapes of the domain: four outlines that stay distinct at the tiny preset's 32x32 pixels.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

#: Object size as a fraction of the shorter frame side (circumscribed radius). One size: at 32x32 an object
#: of radius 6.4 px leaves its centre 17 px of room, enough to travel ``SPEEDS`` in every direction.
SIZES: dict[str, float] = {"regular": 0.2}

#: Speed as the fraction of the frame width travelled over the whole clip (linear motions); unused for
#: ``still``. One speed: 0.4 x 32 = 12.8 px over the clip.
SPEEDS: dict[str, float] = {"regular": 0.4}

MotionKind = Literal["linear", "still"]


@dataclass(frozen=True)
class Motion:
    """How an object moves: ``direction`` is a unit (dx, dy) in image coordinates (x right, y down)."""

    name: str
    kind: MotionKind
    direction: tuple[float, float] = (0.0, 0.0)


_D = float(np.sqrt(0.5))
MOTIONS: dict[str, Motion] = {
    m.name: m
    for m in (
        Motion("left", "linear", (-1.0, 0.0)),
        Motion("right", "linear", (1.0, 0.0)),
        Motion("up", "linear", (0.0, -1.0)),
        Motion("down", "linear", (0.0, 1.0)),
        Motion("up_left", "linear", (-_D, -_D)),
        Motion("up_right", "linear", (_D, -_D)),
        Motion("down_left", "linear", (-_D, _D)),
        Motion("down_right", "linear", (_D, _D)),
        Motion("still", "still"),
    )
}

#: Backgrounds: solid sRGB colours.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}

# ---------------------------------------------------------------------------------------------------------
# Phrase tables (what captions may say). Several wordings per value give paraphrases with the same content.
# ---------------------------------------------------------------------------------------------------------

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "white": ("white",),
    "cyan": ("cyan", "aqua"),
}

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}

#: Size and speed wordings. A domain with one size (one speed) never states it: its words are empty and
#: captions read "a red circle moving left on a black background".
SIZE_WORDS: dict[str, tuple[str, ...]] = {"regular": ()}
SPEED_WORDS: dict[str, tuple[str, ...]] = {"regular": ()}

#: (participle, finite) verb pairs for linear motion.
MOVE_VERBS: tuple[tuple[str, str], ...] = (
    ("moving", "moves"),
    ("drifting", "drifts"),
    ("sliding", "slides"),
    ("gliding", "glides"),
    ("travelling", "travels"),
)

DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left", "left", "leftward"),
    "right": ("to the right", "right", "rightward"),
    "up": ("up", "upward", "towards the top"),
    "down": ("down", "downward", "towards the bottom"),
    "up_left": ("up and to the left", "diagonally up and left", "towards the top left"),
    "up_right": ("up and to the right", "diagonally up and right", "towards the top right"),
    "down_left": ("down and to the left", "diagonally down and left", "towards the bottom left"),
    "down_right": ("down and to the right", "diagonally down and right", "towards the bottom right"),
}

#: (participle, finite) phrases for an object that does not move.
STILL_PHRASES: tuple[tuple[str, str], ...] = (
    ("standing still", "stands still"),
    ("not moving", "does not move"),
    ("staying in place", "stays in place"),
    ("resting in place", "rests in place"),
)

#: Background phrases; ``{c}`` is the background's colour word.
SOLID_BACKGROUND_PHRASES: tuple[str, ...] = (
    "on a {c} background",
    "against a {c} backdrop",
    "over a plain {c} background",
    "on {c}",
)
BACKGROUND_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",),
    "gray": ("gray", "grey"),
    "white": ("white",),
}

#: Sentence templates. ``{o}``/``{o1}``/``{o2}``: noun phrase, ``{p}``: participle motion phrase,
#: ``{f}``: finite motion phrase, ``{bg}``: background phrase.
ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{o} {p} {bg}",
    "{o} {f} {bg}",
    "{bg}, {o} {f}",
    "a video of {o} {p} {bg}",
    "{bg}: {o} {p}",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{o1} {p1} and {o2} {p2} {bg}",
    "{bg}, {o1} {f1} while {o2} {f2}",
    "{o1} {f1} and {o2} {f2} {bg}",
    "two shapes {bg}: {o1} {p1}, {o2} {p2}",
)
#: Noun-phrase forms; ``{a}`` is the article chosen for the word that follows it.
NOUN_PHRASES: tuple[str, ...] = (
    "{a} {size} {colour} {shape}",
    "{a} {size} {shape} in {colour}",
)

# Captions longer than this many words (only two-object ones get there) fall back to the shortest wording of
# the same template, so that captions fit the tiny preset's 32-token text windows without truncation.
MAX_WORDS = 24


# ---------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene. ``speed`` is None exactly when the motion is ``still``."""

    colour: str
    shape: str
    size: str
    motion: str
    speed: str | None

    def __post_init__(self):
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("size", self.size, SIZES)
        _check_choice("motion", self.motion, MOTIONS)
        if MOTIONS[self.motion].kind == "still":
            if self.speed is not None:
                raise ValueError(f"a still object has no speed, got speed={self.speed!r}; pass speed=None")
        else:
            _check_choice("speed", self.speed, SPEEDS)

    @property
    def combination(self) -> tuple[str, str, str]:
        """The (colour, shape, motion) triple that train/held-out splits are defined on."""
        return (self.colour, self.shape, self.motion)


@dataclass(frozen=True)
class SceneSpec:
    """One or two objects over a background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))  # a list would make the spec unhashable
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        _check_choice("background", self.background, BACKGROUNDS)
        for obj in self.objects:
            if obj.colour == self.background:
                raise ValueError(
                    f"object colour {obj.colour!r} equals the background: it would be invisible; "
                    "pick another colour or background"
                )
        if len(self.objects) == 2 and _same_look(*self.objects):
            raise ValueError("the two objects share colour and shape, so a caption could not tell them apart")

    @property
    def combinations(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(o.combination for o in self.objects)


def _check_choice(what: str, value, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


def _same_look(a: ObjectSpec, b: ObjectSpec) -> bool:
    return a.colour == b.colour and a.shape == b.shape


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, motion) triple, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, MOTIONS))


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator, combos: Sequence[tuple[str, str, str]]) -> ObjectSpec:
    colour, shape, motion = _pick(rng, combos)
    size = _pick(rng, tuple(SIZES))
    speed = None if MOTIONS[motion].kind == "still" else _pick(rng, tuple(SPEEDS))
    return ObjectSpec(colour=colour, shape=shape, size=size, motion=motion, speed=speed)


@functools.lru_cache(maxsize=16)
def _combination_table(combinations: frozenset | None) -> tuple[tuple[str, str, str], ...]:
    """Sorted, validated triples (cached: sampling draws from the same few sets many times)."""
    combos = sorted(all_combinations() if combinations is None else combinations)
    if not combos:
        raise ValueError("combinations is empty: nothing to sample from")
    for c in combos:
        if len(c) != 3 or c[0] not in COLOURS or c[1] not in SHAPES or c[2] not in MOTIONS:
            raise ValueError(f"bad combination {c!r}: expected a (colour, shape, motion) triple")
    return tuple(combos)


def sample_scene(
    rng: np.random.Generator,
    *,
    combinations: Collection[tuple[str, str, str]] | None = None,
    num_objects: int | None = None,
    two_object_prob: float = 0.3,
) -> SceneSpec:
    """Draw a scene. Each object's (colour, shape, motion) is drawn uniformly from ``combinations``
    (default: all triples; pass ``split.train`` or ``split.held_out``). ``num_objects`` fixes the object
    count, otherwise two objects appear with probability ``two_object_prob``.
    """
    combos = _combination_table(None if combinations is None else frozenset(combinations))
    if num_objects is None:
        num_objects = 2 if rng.random() < two_object_prob else 1
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")

    first = _sample_object(rng, combos)
    objects = [first]
    if num_objects == 2:
        others = [c for c in combos if not (c[0] == first.colour and c[1] == first.shape)]
        if not others:
            raise ValueError("two objects need combinations with at least two different colour/shape pairs")
        objects.append(_sample_object(rng, others))
    colours = {o.colour for o in objects}
    backgrounds = [b for b in BACKGROUNDS if b not in colours]
    return SceneSpec(objects=tuple(objects), background=_pick(rng, backgrounds))


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _choose(options: Sequence[str], rng: np.random.Generator | None, mode: str) -> str:
    """One wording: drawn with ``rng``, or the first (``mode='canonical'``), or the fewest words."""
    if mode == "short":
        return min(options, key=lambda o: len(o.split()))
    if rng is None:
        return options[0]
    return _pick(rng, options)


def _noun_phrase(obj: ObjectSpec, rng: np.random.Generator | None, mode: str) -> str:
    form = NOUN_PHRASES[0] if mode != "random" else _pick(rng, NOUN_PHRASES)
    size = _choose(SIZE_WORDS[obj.size], rng, mode) if SIZE_WORDS[obj.size] else ""
    colour = _choose(COLOUR_WORDS[obj.colour], rng, mode)
    shape = _choose(SHAPE_WORDS[obj.shape], rng, mode)
    text = form.format(a="{a}", size=size, colour=colour, shape=shape)
    words = text.split()
    return " ".join(words).replace("{a}", _article(words[1]))


def _motion_phrases(obj: ObjectSpec, rng: np.random.Generator | None, mode: str) -> tuple[str, str]:
    """(participle, finite) phrases for the object's motion."""
    motion = MOTIONS[obj.motion]
    pair = _choose_pair
    if motion.kind == "still":
        return pair(STILL_PHRASES, rng, mode)
    speed = _choose(SPEED_WORDS[obj.speed], rng, mode) if SPEED_WORDS[obj.speed] else ""
    part, fin = pair(MOVE_VERBS, rng, mode)
    direction = _choose(DIRECTION_WORDS[obj.motion], rng, mode)
    # The speed adverb goes before or after the direction: same content, different word order.
    if speed and mode == "random" and rng.random() < 0.5:
        return _join(part, direction, speed), _join(fin, direction, speed)
    return _join(part, speed, direction), _join(fin, speed, direction)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _choose_pair(options: Sequence[tuple[str, str]], rng, mode: str) -> tuple[str, str]:
    if mode == "short":
        return min(options, key=lambda o: len(o[1].split()))
    return options[0] if mode == "canonical" else _pick(rng, options)


def _background_phrase(background: str, rng: np.random.Generator | None, mode: str) -> str:
    form = _choose(SOLID_BACKGROUND_PHRASES, rng, mode)
    return form.format(c=_choose(BACKGROUND_COLOUR_WORDS[background], rng, mode))


def _fill(template: str, scene: SceneSpec, rng: np.random.Generator | None, mode: str) -> str:
    slots = {"bg": _background_phrase(scene.background, rng, mode)}
    for i, obj in enumerate(scene.objects, start=1):
        suffix = "" if len(scene.objects) == 1 else str(i)
        slots["o" + suffix] = _noun_phrase(obj, rng, mode)
        slots["p" + suffix], slots["f" + suffix] = _motion_phrases(obj, rng, mode)
    return template.format(**slots)


def canonical_caption(scene: SceneSpec) -> str:
    """The one fixed wording of a scene (first template, first synonym everywhere)."""
    templates = ONE_OBJECT_TEMPLATES if len(scene.objects) == 1 else TWO_OBJECT_TEMPLATES
    return _fill(templates[0], scene, None, "canonical")


def caption(scene: SceneSpec, rng: np.random.Generator) -> str:
    """A caption of ``scene`` in a randomly drawn wording (template, synonyms, word order).

    A wording over ``MAX_WORDS`` words is replaced by the same template with the shortest phrases.
    """
    templates = ONE_OBJECT_TEMPLATES if len(scene.objects) == 1 else TWO_OBJECT_TEMPLATES
    template = _pick(rng, templates)
    text = _fill(template, scene, rng, "random")
    if len(text.split()) > MAX_WORDS:
        text = _fill(template, scene, None, "short")
    return text


def caption_corpus(num_captions: int, seed: int = 0) -> Iterator[str]:
    """``num_captions`` captions of freshly sampled scenes, deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(num_captions):
        yield caption(sample_scene(rng), rng)


def phrase_inventory() -> list[str]:
    """Every phrase any caption can be assembled from (with both articles), in a fixed order."""
    phrases: list[str] = ["a", "an"]
    for table in (COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, SPEED_WORDS, DIRECTION_WORDS, BACKGROUND_COLOUR_WORDS):
        for options in table.values():
            phrases.extend(options)
    for pairs in (MOVE_VERBS, STILL_PHRASES):
        for pair in pairs:
            phrases.extend(pair)
    phrases.extend(p.format(c="") for p in SOLID_BACKGROUND_PHRASES)
    blank = {k: "" for k in ("o", "p", "f", "bg", "o1", "p1", "f1", "o2", "p2", "f2")}
    phrases.extend(t.format(**blank) for t in ONE_OBJECT_TEMPLATES + TWO_OBJECT_TEMPLATES)
    phrases.extend(t.format(a="", size="", colour="", shape="") for t in NOUN_PHRASES)
    return phrases


def all_caption_words() -> list[str]:
    """Every word (whitespace-separated, punctuation stripped) a caption can contain, sorted."""
    words = set()
    for phrase in phrase_inventory():
        for w in phrase.split():
            w = w.strip(",:")
            if w:
                words.add(w)
    return sorted(words)


# ---------------------------------------------------------------------------------------------------------
# Train / held-out split
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CombinationSplit:
    """Disjoint (colour, shape, motion) triples for training and for held-out evaluation prompts."""

    train: frozenset[tuple[str, str, str]]
    held_out: frozenset[tuple[str, str, str]]

    def is_held_out(self, scene: SceneSpec) -> bool:
        """True when any object of the scene uses a held-out triple."""
        return any(c in self.held_out for c in scene.combinations)


def split_combinations(held_out_fraction: float = 0.1, seed: int = 0) -> CombinationSplit:
    """Hold out about ``held_out_fraction`` of all (colour, shape, motion) triples, deterministically.

    A triple is only held out if every pair it contains ((colour, shape), (colour, motion), (shape, motion))
    keeps at least one other triple in training, so held-out prompts test new combinations of pairs the
    model has seen, never an unseen pair.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    combos = all_combinations()
    target = int(round(held_out_fraction * len(combos)))
    pair_counts: dict[tuple, int] = {}
    for c in combos:
        for key in _pairs(c):
            pair_counts[key] = pair_counts.get(key, 0) + 1
    order = np.random.default_rng(seed).permutation(len(combos))
    held: set[tuple[str, str, str]] = set()
    for i in order:
        if len(held) >= target:
            break
        c = combos[int(i)]
        keys = _pairs(c)
        if all(pair_counts[k] > 1 for k in keys):
            for k in keys:
                pair_counts[k] -= 1
            held.add(c)
    return CombinationSplit(train=frozenset(set(combos) - held), held_out=frozenset(held))


def _pairs(c: tuple[str, str, str]) -> tuple[tuple, ...]:
    colour, shape, motion = c
    return (("cs", colour, shape), ("cm", colour, motion), ("sm", shape, motion))


def held_out_scenes(split: CombinationSplit, num_scenes: int, seed: int = 0) -> list[SceneSpec]:
    """Single-object scenes whose triple is held out (evaluation prompts), deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, combinations=split.held_out, num_objects=1) for _ in range(num_scenes)]


__all__ = [
    "BACKGROUNDS", "COLOURS", "MOTIONS", "SHAPES", "SIZES", "SPEEDS",
    "CombinationSplit", "Motion", "ObjectSpec", "SceneSpec",
    "all_caption_words", "all_combinations", "canonical_caption", "caption", "caption_corpus",
    "held_out_scenes", "phrase_inventory", "sample_scene", "split_combinations",
]
