"""Strict pixel scorer of the synthetic captioned-video domain: does a video show what its caption says?

No learned model is involved; everything is measured from uint8 frames ``[F, H, W, 3]`` and works at the
tiny preset's 32x32 (any size works). The scorer is strict about colour: every colour judgement is the
NEAREST NAMED COLOUR in CIE Lab (sRGB D65, Euclidean Delta E 1976) among a table that holds the domain's
colours AND distractor names, so a colour cast that a person would name differently ("that red is brown",
"that white backdrop is pink") is wrong. Nothing is found through a palette tolerance.

**Caption side** (:func:`parse_caption`): the caption is parsed back to attributes with the vocabularies
and synonyms of ``neodragon_jax.data.captions``, by keywords rather than templates, so paraphrases parse too
("on black: one rhombus coloured violet drifting leftwards"). The background phrase (``on white``,
``... gray backdrop``) is found first and removed; each shape word then anchors one object, its colour (and
size, when the domain has size words) from the words just before it (or ``in / coloured <colour>`` just
after), its motion from the words up to the next object (still / in place / not moving, otherwise the up /
down / left / right / top / bottom words give one of the 8 directions) and its speed from speed adverbs.
Size and speed are judged only when a caption states them: this domain has one size and one speed and its
captions never do.

**Pixel side** (:func:`analyse_video`):

* *background*: the dominant colour (per-channel median of every pixel of every frame: objects cover well
  under half the frame) gives a first object mask; the background estimate is then the per-pixel temporal
  median of the pixels away from that mask (pixels an object never leaves take the dominant colour). Its
  median over the frame is named with :data:`BACKGROUND_COLOUR_TABLE`; the video's background is correct
  only if that name is the caption's background.
* *objects*: pixels whose Lab distance from the per-pixel background estimate exceeds ``OBJECT_DELTA_E``;
  4-connected components per frame with at least ``MIN_OBJECT_FRACTION`` of the frame and a non-empty core
  (they survive a 1-pixel erosion). A component is cut in two where two objects of different colours touch:
  its core splits (2-means in Lab) into two colours ``SPLIT_DELTA_E`` apart whose parts are object-like
  (thick, side by side); the mixed rim of a blurred or chroma-bled object is thin or all round it. The
  object count is the largest ``k`` such that at least ``MIN_SEEN_FRACTION`` of the frames show ``k``
  components; in every frame with at least ``k`` components the ``k`` largest are matched to the tracks
  (cost: centroid distance in pixels plus ``TRACK_COLOUR_WEIGHT`` times the Lab distance of their colours,
  so differently coloured objects that cross keep their identities; same-coloured ones are told apart by
  position). Frames with fewer components (same-coloured objects touching, or hidden) are left out.
* *colour*: the per-channel median, in Lab, of the object's core pixels over the frames it is seen (its
  masks eroded by ``CORE_EROSION`` = 2 pixels, or 1, or 0 when that leaves under ``MIN_CORE_PIXELS``, so
  anti-aliased or blurred edges, which mix in the background, do not count), named with
  :data:`OBJECT_COLOUR_TABLE`. The object's colour is right only if that name is the caption's colour.
* *shape*: template matching against the renderer's own shapes: in up to 4 frames where the object is
  largest (unoccluded) its soft coverage (the projection of pixel minus background on its measured colour
  minus background) is compared with each shape drawn at its centroid with the radius that gives the
  observed area (x 0.94 / 1 / 1.06); the best summed IoU wins. *Size*: the fitted circumscribed radius over
  ``min(H, W)``, the nearest ``SIZES`` value in log space.
* *motion*: the least-squares displacement of the centroid over the clip: shorter than ``STILL_FRACTION *
  min(H, W)`` is ``still``, otherwise its angle quantised to the 8 directions. *Speed*: the displacement's
  length compared (in log space) with the renderer's travel for each ``SPEEDS`` value.

**Named-colour tables** (sRGB values; each distractor sits where a realistic cast lands):

* :data:`OBJECT_COLOUR_TABLE`: the 8 palette colours (``captions.COLOURS``) and the distractors of
  :data:`OBJECT_DISTRACTORS`: ``rust`` (red halfway to brown), ``brown`` and ``maroon`` (red darkened or
  yellowed), ``salmon`` and ``pink`` (red or white washed out), ``magenta`` (purple drifting to red),
  ``peach`` (orange washed out), ``amber`` (orange drifting to yellow), ``mustard`` (yellow or orange
  darkened), ``olive`` (yellow / green muddied), ``lime`` (green drifting to yellow), ``dark green``, ``teal``
  and ``navy`` (green, cyan and blue darkened), ``sky blue`` (between cyan and blue), ``lavender`` (purple or
  blue washed out), ``beige`` (white with a yellow cast), ``light gray``, ``gray``, ``dark gray``, ``black``
  (an object that lost its colour: a white object that comes back gray is wrong). Each palette colour's
  nearest other entry (Delta E): white 19 (light gray), yellow 23 (mustard), orange 26 (amber), purple 28
  (magenta), red 31 (rust), blue 31 (purple), green 31 (lime), cyan 35 (teal); a colour stays right while
  its cast is under about half of that (a red mixed 30% of the way to brown is still red, 40% is rust).
* :data:`BACKGROUND_COLOUR_TABLE`: black, gray, white and the distractors of :data:`BACKGROUND_DISTRACTORS`:
  ``dark gray`` and ``light gray`` (a backdrop too dark or too light), ``pale pink``, ``cream`` and ``pale
  blue`` (the red, yellow and blue casts of white), ``slate`` and ``taupe`` (blue and brown casts of gray),
  ``navy`` and ``dark brown`` (blue and brown casts of black). Nearest other entry: white 17 (cream), gray 14
  (taupe), black 27 (dark gray); a white backdrop mixed 30% of the way to pink (255, 226, 232) is pale pink.

Measured on the renderer's own one-object videos (``tests/eval/test_scorer.py``, 32x32, 9 frames): through
a lossless mp4, after a Gaussian blur of sigma 0.7 px (or 1.0), and through a lossy yuv420 mp4 at
``write_mp4``'s default crf 18, colour, shape, motion, background and count all score 1.0 (a core colour
moves by at most ~4 Delta E at crf 18). Heavier loss costs colour and shape first (crf 28: shape 0.97; crf
35: colour 0.99, shape 0.95; crf 40: colour 0.96, shape 0.87, green read as dark green and red as salmon;
a blur of sigma 1.5: colour 0.88). Two-object scenes score 0.96 to 0.99 per attribute: at 32x32 two
objects often overlap, and two of the same colour that overlap in most frames count as one. Scoring takes
~30 ms per 9-frame video on one CPU core.

**Scoring** (:func:`score_video`): caption objects are matched one-to-one to detected objects by the
assignment with the most agreeing attributes (so a two-object caption may name its objects in any order).
Per attribute: ``colour``, ``shape``, ``size``, ``motion``, ``speed`` (objects that move) per caption
object; ``background`` and ``count`` (number of objects) per video. A caption object with no detected
partner counts as wrong on all its attributes; an attribute the caption does not state is not judged. A
report (:func:`score_pairs`, :func:`score_folder`) gives per-attribute accuracy, ``all_correct`` (videos
with every judged attribute right) and the means of the quality figures. :func:`chance_level` scores the
same videos against deranged captions (no video keeps its own): the chance column to print beside an
accuracy (about 1/8 for colour, 1/4 for shape, 1/9 for motion, 1/3 for background in this domain).

**Quality figures** (per video, caption-free): ``frame_diff`` mean absolute frame-to-frame change (0..1);
``flicker`` the same on background pixels only (a static background gives ~0; codec noise ~0.005);
``sharpness`` the variance of the luminance Laplacian (0..1 units); ``saturation`` mean HSV saturation;
``palette_fraction`` the fraction of pixels within ``QUALITY_TOLERANCE`` (RGB distance) of a palette colour
or of the estimated background at that pixel (near 1 for clean renders, lower for blurry or off-palette
output). These grade cleanliness only; no judgement uses them.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neodragon_jax.data.captions import (
    BACKGROUND_COLOUR_WORDS,
    BACKGROUNDS,
    COLOUR_WORDS,
    COLOURS,
    MOTIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    SPEED_WORDS,
    SPEEDS,
    SceneSpec,
)
from neodragon_jax.data.synthetic import linear_travel, shape_area, shape_coverage

# ---------------------------------------------------------------------------------------------------------
# Colour science: sRGB (D65) -> CIE Lab, named-colour tables
# ---------------------------------------------------------------------------------------------------------

# sRGB primaries -> XYZ (D65), and the D65 white point (IEC 61966-2-1 / CIE 15).
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_LAB_EPSILON = 216.0 / 24389.0
_LAB_KAPPA = 24389.0 / 27.0


def srgb_to_lab(rgb) -> np.ndarray:
    """CIE L*a*b* (D65) of sRGB values in 0..255, ``[..., 3]`` -> float32 ``[..., 3]`` (L in 0..100)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = (linear @ _SRGB_TO_XYZ.T) / _D65_WHITE
    f = np.where(xyz > _LAB_EPSILON, np.cbrt(xyz), (_LAB_KAPPA * xyz + 16.0) / 116.0)
    lab = np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)
    return lab.astype(np.float32)


#: Distractor names for object colours, chosen by measuring (see the module docstring): each sits where a
#: realistic cast of a palette colour lands, at least 18.8 Delta E (light gray to white) from every palette
#: colour. None is a word captions use for a colour, so a distractor never matches a caption.
OBJECT_DISTRACTORS: dict[str, tuple[int, int, int]] = {
    "rust": (180, 75, 45),        # red halfway to brown
    "brown": (140, 80, 40),       # red / orange darkened and yellowed
    "maroon": (128, 20, 30),      # red darkened
    "salmon": (245, 120, 110),    # red washed out
    "pink": (250, 150, 180),      # red or white washed towards pink
    "magenta": (220, 50, 190),    # purple drifting to red
    "peach": (250, 190, 140),     # orange washed out
    "amber": (250, 185, 40),      # orange drifting to yellow
    "mustard": (200, 170, 30),    # yellow / orange darkened
    "olive": (128, 128, 20),      # yellow or green muddied
    "lime": (160, 230, 50),       # green drifting to yellow
    "dark green": (20, 100, 30),  # green darkened
    "teal": (20, 128, 128),       # cyan darkened
    "sky blue": (120, 180, 240),  # between cyan and blue
    "navy": (20, 30, 120),        # blue darkened
    "lavender": (190, 160, 230),  # purple or blue washed out
    "beige": (235, 225, 190),     # white with a yellow cast
    "light gray": (192, 192, 192),  # a white object that lost contrast
    "gray": (128, 128, 128),      # an object that lost its colour
    "dark gray": (64, 64, 64),
    "black": (0, 0, 0),
}
#: Named colours an object's core is classified with: the palette first, then the distractors.
OBJECT_COLOUR_TABLE: dict[str, tuple[int, int, int]] = {**COLOURS, **OBJECT_DISTRACTORS}

#: Distractor names for backgrounds: too dark / too light, and the warm and cool casts of each backdrop; at
#: least 14.5 Delta E (taupe to gray) from every background.
BACKGROUND_DISTRACTORS: dict[str, tuple[int, int, int]] = {
    "dark gray": (64, 64, 64),        # black lifted, or gray darkened
    "light gray": (192, 192, 192),    # white dimmed, or gray lightened
    "pale pink": (255, 205, 215),     # white with a red cast
    "cream": (245, 235, 205),         # white with a yellow cast
    "pale blue": (205, 225, 250),     # white with a blue cast
    "slate": (105, 120, 145),         # gray with a blue cast
    "taupe": (145, 125, 105),         # gray with a brown cast
    "navy": (20, 25, 70),             # black with a blue cast
    "dark brown": (70, 45, 30),       # black with a brown cast
}
#: Named colours the background estimate is classified with.
BACKGROUND_COLOUR_TABLE: dict[str, tuple[int, int, int]] = {**BACKGROUNDS, **BACKGROUND_DISTRACTORS}


class NamedColours:
    """A named-colour table in Lab: :meth:`nearest` names a Lab colour by its nearest entry."""

    def __init__(self, table: dict[str, tuple[int, int, int]]):
        self.names = tuple(table)
        self.lab = srgb_to_lab(np.asarray([table[n] for n in self.names], np.float64)).astype(np.float64)

    def nearest(self, lab) -> tuple[str, float]:
        """(name, Delta E) of the entry nearest to one Lab colour."""
        d = np.linalg.norm(self.lab - np.asarray(lab, np.float64), axis=-1)
        i = int(d.argmin())
        return self.names[i], float(d[i])


_OBJECT_NAMES = NamedColours(OBJECT_COLOUR_TABLE)
_BACKGROUND_NAMES = NamedColours(BACKGROUND_COLOUR_TABLE)

# ---------------------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------------------

#: A pixel belongs to an object when its Lab distance from the background estimate exceeds this. The
#: weakest object / background contrast of the domain is ~43 (white on gray), so anti-aliased edge pixels
#: count from about half coverage; codec and generation noise stay well under it.
OBJECT_DELTA_E = 20.0
#: Smallest object component, as a fraction of the frame (5.1 pixels at 32x32; the smallest shape has 53).
MIN_OBJECT_FRACTION = 0.005
#: Core pixels: the object mask eroded this many pixels (fewer when that leaves under ``MIN_CORE_PIXELS``).
CORE_EROSION = 2
MIN_CORE_PIXELS = 6
#: An object whose fitted displacement over the clip is shorter than this fraction of min(H, W) is still
#: (2.6 px at 32x32; a moving object travels 12.8).
STILL_FRACTION = 0.08
#: Fraction of the frames in which an object must be seen.
MIN_SEEN_FRACTION = 0.3
#: A component whose core shows two colours at least this far apart (Lab), each object-sized, is two
#: touching objects. The closest palette pair (blue, purple) is 31 apart; one flat object's noise is far less.
SPLIT_DELTA_E = 25.0
#: Lab distance that counts as much as one pixel of centroid distance when matching components to tracks.
TRACK_COLOUR_WEIGHT = 0.5
#: RGB distance for the ``palette_fraction`` quality figure (a cleanliness grade; no judgement uses it).
QUALITY_TOLERANCE = 30.0
#: Radius factors tried around the area-matched radius when fitting a shape template.
_SCALES = (0.94, 1.0, 1.06)

OBJECT_ATTRIBUTES = ("colour", "shape", "size", "motion", "speed")
VIDEO_ATTRIBUTES = ("background", "count")
ATTRIBUTES = OBJECT_ATTRIBUTES + VIDEO_ATTRIBUTES

_PALETTE = np.asarray(list(COLOURS.values()), np.float32)
_SHAPE_AREAS = {s: shape_area(s) for s in SHAPES}

# ---------------------------------------------------------------------------------------------------------
# Caption parsing
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedObject:
    """Attributes a caption states about one object (None: not stated / not understood)."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    motion: str | None = None
    speed: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[ParsedObject, ...]
    background: str | None

    @classmethod
    def from_scene(cls, scene: SceneSpec) -> "ParsedCaption":
        """The attributes a caption of a ground-truth scene states (what a perfect parse of it gives): size
        and speed only where the domain has words for them."""
        objs = tuple(ParsedObject(o.colour, o.shape, o.size if SIZE_WORDS[o.size] else None, o.motion,
                                  o.speed if o.speed is not None and SPEED_WORDS[o.speed] else None)
                     for o in scene.objects)
        return cls(objs, scene.background)


def _word_table(table: dict[str, tuple[str, ...]], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Single-word synonyms -> value; ``extra`` words only for values the domain has."""
    out = {w: value for value, words in table.items() for w in words if " " not in w}
    out.update({w: value for w, value in (extra or {}).items() if value in table})
    return out


_COLOUR_OF = _word_table(COLOUR_WORDS, {"violet": "purple", "aqua": "cyan", "turquoise": "cyan"})
_SHAPE_OF = _word_table(SHAPE_WORDS, {"disk": "circle"})
_SIZE_OF = _word_table(SIZE_WORDS)
_BG_COLOUR_OF = _word_table(BACKGROUND_COLOUR_WORDS)
_SPEED_OF = _word_table(SPEED_WORDS)
_UP = {"up", "upward", "upwards", "top", "upper"}
_DOWN = {"down", "downward", "downwards", "bottom", "lower"}
_LEFT = {"left", "leftward", "leftwards"}
_RIGHT = {"right", "rightward", "rightwards"}
_BG_NOUNS = {"background", "backdrop", "backdrops", "backgrounds", "scene"}
_ARTICLES = {"a", "an", "the", "one"}
_BREAK = {",", ":", ";", "."}
_MODIFIERS = set(_SIZE_OF) | set(_COLOUR_OF) | _ARTICLES | {"coloured", "colored"}

# The direction (dx, dy) -> motion name table, from the captions vocabulary.
_DIRECTION_NAME = {tuple(int(np.sign(round(v, 3))) for v in m.direction): name
                   for name, m in MOTIONS.items() if m.kind == "linear"}


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[,:;.]", text.lower())


def _find_background(tok: list[str]) -> tuple[str | None, set[int]]:
    """Background value and the token positions its phrase uses ("on white", "a gray backdrop")."""
    for i, w in enumerate(tok):
        if w in _BG_COLOUR_OF:
            nxt = tok[i + 1] if i + 1 < len(tok) else None
            prev = tok[i - 1] if i > 0 else None
            if nxt in _BG_NOUNS or (prev == "on" and (nxt is None or nxt in _BREAK)):
                return _BG_COLOUR_OF[w], {i, i + 1} if nxt in _BG_NOUNS else {i}
    return None, set()


def _motion_of(words: list[str]) -> tuple[str | None, str | None]:
    """(motion, speed) from the words of one object's motion phrase."""
    text = " ".join(words)
    speed = next((_SPEED_OF[w] for w in words if w in _SPEED_OF), None)
    if ("still" in words or "in place" in text or "not mov" in text or "does not move" in text
            or any(w in {"stationary", "motionless", "static", "unmoving"} for w in words)):
        return "still", None
    dx = (any(w in _RIGHT for w in words)) - (any(w in _LEFT for w in words))
    dy = (any(w in _DOWN for w in words)) - (any(w in _UP for w in words))
    return _DIRECTION_NAME.get((dx, dy)), speed


def parse_caption(text: str) -> ParsedCaption:
    """Attributes stated by a caption (see the module docstring); unknown attributes are None."""
    tok = _tokens(text)
    background, used = _find_background(tok)
    tok = [None if i in used else w for i, w in enumerate(tok)]  # None keeps positions, breaks phrases
    # Each shape word anchors one object; its noun phrase spans the modifiers before it and "in <colour>"
    # (or "coloured <colour>") after it.
    spans = []
    for i in (i for i, w in enumerate(tok) if w in _SHAPE_OF):
        j = i
        while j - 1 >= 0 and tok[j - 1] in _MODIFIERS:
            j -= 1
        k = i + 1
        if k + 1 < len(tok) and tok[k] in ("in", "coloured", "colored") and tok[k + 1] in _COLOUR_OF:
            k += 2
        spans.append((j, i, k))
    objects = []
    for n, (start, anchor, end) in enumerate(spans):
        np_words = [w for w in tok[start:end] if w is not None]
        colours = [_COLOUR_OF[w] for w in np_words if w in _COLOUR_OF]
        sizes = [_SIZE_OF[w] for w in np_words if w in _SIZE_OF]
        stop = spans[n + 1][0] if n + 1 < len(spans) else len(tok)
        motion, speed = _motion_of([w for w in tok[end:stop] if w is not None and w not in _BREAK])
        objects.append(ParsedObject(colour=colours[-1] if colours else None, shape=_SHAPE_OF[tok[anchor]],
                                    size=sizes[-1] if sizes else None, motion=motion,
                                    speed=None if motion == "still" else speed))
    return ParsedCaption(tuple(objects), background)


# ---------------------------------------------------------------------------------------------------------
# Pixel analysis
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DetectedObject:
    """One object found in the pixels. ``trajectory`` is ``[F, 2]`` (x, y) with NaN where not seen;
    ``lab`` the median Lab colour of its core pixels and ``colour_distance`` its Delta E from the named
    colour it was given."""

    colour: str
    shape: str | None
    size: str | None
    motion: str | None
    speed: str | None
    area: float
    radius: float
    trajectory: np.ndarray = field(repr=False)
    shape_scores: dict[str, float] = field(default_factory=dict, repr=False)
    lab: tuple[float, float, float] = (0.0, 0.0, 0.0)
    colour_distance: float = 0.0

    def attributes(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in OBJECT_ATTRIBUTES}


@dataclass
class VideoAnalysis:
    """Objects (largest first), the background's name, its median Lab colour and Delta E from that name."""

    objects: list[DetectedObject]
    background: str | None
    quality: dict[str, float]
    background_lab: tuple[float, float, float] = (0.0, 0.0, 0.0)
    background_distance: float = 0.0


def _shift(x: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``x`` shifted along its last two axes, edges filled with ``fill``."""
    out = np.full_like(x, fill)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _erode(m: np.ndarray, steps: int = 1) -> np.ndarray:
    out = m
    for _ in range(steps):
        shrunk = out.copy()
        for dy, dx in _NEIGHBOURS:
            shrunk &= _shift(out, dy, dx, False)
        out = shrunk
    return out


def _dilate(m: np.ndarray, steps: int = 1) -> np.ndarray:
    out = m
    for _ in range(steps):
        grown = out.copy()
        for dy, dx in _NEIGHBOURS:
            grown |= _shift(out, dy, dx, False)
        out = grown
    return out


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean ``[..., H, W]`` stack (per 2-D slice): 0 = off, else one
    positive id per component. Min-label propagation with pointer jumping (a label is the flat index + 1 of
    a pixel of the same component, so adopting that pixel's label is safe and halves the iterations)."""
    big = mask.size + 1
    lab = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), big)
    while True:
        new = lab.copy()
        for dy, dx in _NEIGHBOURS:
            np.minimum(new, _shift(lab, dy, dx, big), out=new)
        new = np.where(mask, new, big)
        flat = new.reshape(-1)
        on = flat < big
        flat[on] = np.minimum(flat[on], flat[flat[on] - 1])
        if np.array_equal(new, lab):
            return np.where(mask, lab, 0)
        lab = new


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def _core(masks: np.ndarray) -> np.ndarray:
    """The pixels of ``masks`` (any shape ``[..., H, W]``) away from their edges: eroded ``CORE_EROSION``
    pixels, or fewer when that leaves under ``MIN_CORE_PIXELS`` (a thin or tiny object)."""
    for steps in range(CORE_EROSION, 0, -1):
        core = _erode(masks, steps)
        if core.sum() >= MIN_CORE_PIXELS:
            return core
    return masks


def _median_lab(lab: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.median(lab[mask], axis=0)


def _background(x: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel background estimate in RGB and Lab ``[H, W, 3]``, and which pixels were seen uncovered."""
    dominant = np.median(x.reshape(-1, 3), axis=0)
    near_objects = _dilate(np.linalg.norm(lab - srgb_to_lab(dominant), axis=-1) > OBJECT_DELTA_E, 1)
    masked = np.where(near_objects[..., None], np.nan, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: under an object all clip long
        bg = np.nanmedian(masked, axis=0)
    seen = ~np.isnan(bg[..., 0])
    bg = np.where(seen[..., None], bg, dominant).astype(np.float32)
    return bg, srgb_to_lab(bg), seen


@dataclass
class _Component:
    mask: np.ndarray
    centroid: np.ndarray
    lab: np.ndarray
    area: int


def _two_colours(lab_px: np.ndarray, iterations: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """2-means of Lab pixels ``[N, 3]``: the two centres ``[2, 3]`` and each pixel's cluster."""
    median = np.median(lab_px, axis=0)
    a = lab_px[np.argmax(np.linalg.norm(lab_px - median, axis=-1))]
    b = lab_px[np.argmax(np.linalg.norm(lab_px - a, axis=-1))]
    centres = np.stack([a, b])
    for _ in range(iterations):
        which = np.linalg.norm(lab_px[:, None] - centres[None], axis=-1).argmin(-1)
        if which.min() == which.max():
            break
        centres = np.stack([np.median(lab_px[which == k], axis=0) for k in (0, 1)])
    return centres, which


def _split_by_colour(lab_f: np.ndarray, comp: np.ndarray, min_area: float) -> list[np.ndarray]:
    """``comp`` cut into its colour parts when it is two touching objects of different colours: its core
    shows two colours ``SPLIT_DELTA_E`` apart, and the two parts are objects side by side: each at least
    ``min_area`` pixels after a 1-pixel erosion, their centroids at least the smaller part's radius apart.
    A blurred or chroma-bled object also shows two colours, its pure core and a rim mixed with the
    background, but a rim along one edge is thin and a rim all round shares the core's centroid: no cut."""
    core = _erode(comp)
    if core.sum() < 2 * min_area:
        return [comp]
    centres, which = _two_colours(lab_f[core])
    smaller_cluster = min(int((which == 0).sum()), int((which == 1).sum()))
    if np.linalg.norm(centres[0] - centres[1]) < SPLIT_DELTA_E or smaller_cluster < min_area:
        return [comp]
    nearest = np.linalg.norm(lab_f[..., None, :] - centres, axis=-1).argmin(-1)
    parts = [comp & (nearest == k) for k in (0, 1)]
    if min(int(_erode(p).sum()) for p in parts) < min_area:
        return [comp]
    areas = [int(p.sum()) for p in parts]
    separation = float(np.linalg.norm(_centroid(parts[0]) - _centroid(parts[1])))
    return parts if separation >= math.sqrt(min(areas) / math.pi) else [comp]


def _frame_components(lab_f: np.ndarray, labels: np.ndarray, min_area: float) -> list[_Component]:
    """Object-sized components of one frame's foreground (``labels``: its component labels, 0 = background),
    touching objects of different colours cut apart; largest first."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    out = []
    for i, n in zip(ids, counts):
        if n < min_area:
            continue
        for part in _split_by_colour(lab_f, labels == i, min_area):
            pieces = _components(part) if part.sum() < n else part.astype(np.int64)  # a cut may leave pieces
            for j in np.unique(pieces[pieces > 0]):
                piece = pieces == j
                core = _erode(piece)
                area = int(piece.sum())
                if area >= min_area and core.any():
                    out.append(_Component(piece, _centroid(piece), _median_lab(lab_f, core), area))
    out.sort(key=lambda c: -c.area)
    return out


def _tracks(comps: list[list[_Component]], min_frames: int) -> list[list[_Component | None]]:
    """Per object, its component per frame (None where not seen). The count is the largest ``k`` that at
    least ``min_frames`` frames show; frames with fewer components (touching, hidden) are left out."""
    n_per_frame = np.array([len(c) for c in comps])
    count = 0
    while (n_per_frame >= count + 1).sum() >= min_frames:
        count += 1
    if count == 0:
        return []
    tracks: list[list[_Component | None]] = [[None] * len(comps) for _ in range(count)]
    last: list[_Component | None] = [None] * count
    for f, cands in enumerate(comps):
        if len(cands) < count:
            continue
        cands = cands[:count]
        if last[0] is None:
            order = sorted(cands, key=lambda c: tuple(c.centroid))
        else:
            def cost(perm):
                return sum(float(np.linalg.norm(c.centroid - t.centroid))
                           + TRACK_COLOUR_WEIGHT * float(np.linalg.norm(c.lab - t.lab)) for c, t in zip(perm, last))
            # Every assignment for small counts (the domain has 1 or 2 objects); beyond 5 (clutter, never a
            # rendered scene) the permutations get too many and components keep their size order.
            order = min(itertools.permutations(cands), key=cost) if count <= 5 else cands
        for k, c in enumerate(order):
            tracks[k][f] = c
            last[k] = c
    return tracks


def _alpha(x_f: np.ndarray, bg: np.ndarray, colour: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Soft coverage of ``colour`` over the background ``bg`` per pixel of ``region`` (0 elsewhere): the
    projection of (pixel - bg) on (colour - bg), luma and chroma together."""
    d = colour[None, None] - bg
    a = ((x_f - bg) * d).sum(-1) / np.maximum((d * d).sum(-1), 1.0)
    return np.where(region, np.clip(a, 0.0, 1.0), 0.0)


def _fit_shape(alphas: list[np.ndarray], height: int, width: int) -> tuple[str | None, float, dict[str, float]]:
    """Best template shape, its circumscribed radius and each shape's mean soft IoU over the coverage maps."""
    alphas = [a for a in alphas if a.sum() >= 1.0]
    if not alphas:
        return None, 0.0, {}
    scores = {s: 0.0 for s in _SHAPE_AREAS}
    radii: dict[str, list[float]] = {s: [] for s in _SHAPE_AREAS}
    ys, xs = np.mgrid[0:height, 0:width]
    for a in alphas:
        area = float(a.sum())
        cx, cy = float((a * (xs + 0.5)).sum() / area), float((a * (ys + 0.5)).sum() / area)
        for s, unit in _SHAPE_AREAS.items():
            r0 = math.sqrt(area / unit)
            best, best_r = -1.0, r0
            for k in _SCALES:
                t = shape_coverage(s, cx, cy, r0 * k, height, width, supersample=4)
                iou = float(np.minimum(t, a).sum() / max(float(np.maximum(t, a).sum()), 1e-9))
                if iou > best:
                    best, best_r = iou, r0 * k
            scores[s] += best / len(alphas)
            radii[s].append(best_r)
    shape = max(scores, key=scores.get)
    return shape, float(np.median(radii[shape])), scores


def _angle_name(dx: float, dy: float) -> str:
    sector = int(round(math.atan2(dy, dx) / (math.pi / 4))) % 8
    vec = (round(math.cos(sector * math.pi / 4)), round(math.sin(sector * math.pi / 4)))
    return _DIRECTION_NAME[vec]


def _nearest_in_log(value: float, table: dict[str, float]) -> str:
    return min(table, key=lambda k: abs(math.log(max(value, 1e-6) / max(table[k], 1e-6))))


def _motion(traj: np.ndarray, size: str | None, height: int, width: int) -> tuple[str | None, str | None]:
    ok = ~np.isnan(traj[:, 0])
    t = np.nonzero(ok)[0]
    if len(t) < 2:
        return None, None
    # Fitted displacement over the whole clip (least squares, robust to a noisy endpoint).
    span = (len(traj) - 1) or 1
    disp = np.polyfit(t.astype(np.float64), traj[ok], 1)[0] * span
    dist = float(np.linalg.norm(disp))
    if dist < STILL_FRACTION * min(height, width):
        return "still", None
    motion = _angle_name(float(disp[0]), float(disp[1]))
    size = size or min(SIZES, key=SIZES.get)
    return motion, _nearest_in_log(dist, {s: linear_travel(motion, s, size, height, width) for s in SPEEDS})


def _quality(x: np.ndarray, bg: np.ndarray, objects_px: np.ndarray) -> dict[str, float]:
    f = x.shape[0]
    diff = np.abs(np.diff(x, axis=0)) / 255.0 if f > 1 else np.zeros((1,) + x.shape[1:], np.float32)
    quiet = ~_dilate(objects_px, 2)
    quiet_pairs = (quiet[1:] & quiet[:-1]) if f > 1 else np.zeros_like(quiet[:1])
    flicker = float(diff.mean(-1)[quiet_pairs].mean()) if quiet_pairs.any() else float("nan")
    lum = (x @ np.asarray([0.299, 0.587, 0.114], np.float32)) / 255.0
    lap = (lum[:, 1:-1, :-2] + lum[:, 1:-1, 2:] + lum[:, :-2, 1:-1] + lum[:, 2:, 1:-1] - 4 * lum[:, 1:-1, 1:-1])
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    palette_dist = np.sqrt(((x[..., None, :] - _PALETTE) ** 2).sum(-1)).min(-1)
    near_bg = np.sqrt(((x - bg[None]) ** 2).sum(-1)) < QUALITY_TOLERANCE
    return {
        "frame_diff": float(diff.mean()),
        "flicker": flicker,
        "sharpness": float(lap.reshape(f, -1).var(axis=1).mean()),
        "saturation": float(sat.mean()),
        "palette_fraction": float(((palette_dist < QUALITY_TOLERANCE) | near_bg).mean()),
    }


def analyse_video(frames: np.ndarray) -> VideoAnalysis:
    """Objects (largest first), background and quality figures of uint8 ``frames`` ``[F, H, W, 3]``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got shape {frames.shape}")
    x = frames.astype(np.float32)
    n, height, width = frames.shape[:3]
    lab = srgb_to_lab(x)
    bg, bg_lab, seen = _background(x, lab)
    background_lab = _median_lab(bg_lab, seen) if seen.any() else bg_lab.reshape(-1, 3).mean(0)
    background, background_distance = _BACKGROUND_NAMES.nearest(background_lab)

    foreground = np.linalg.norm(lab - bg_lab[None], axis=-1) > OBJECT_DELTA_E
    min_area = max(4.0, MIN_OBJECT_FRACTION * height * width)
    labels = _components(foreground)  # every frame at once: labels are unique across the stack
    comps = [_frame_components(lab[f], labels[f], min_area) for f in range(n)]
    min_frames = max(1, int(math.ceil(MIN_SEEN_FRACTION * n)))
    tracks = _tracks(comps, min_frames)
    all_objects = np.zeros_like(foreground)
    for f, cands in enumerate(comps):
        for c in cands:
            all_objects[f] |= c.mask

    objects: list[DetectedObject] = []
    for track in tracks:
        seen_frames = [(f, c) for f, c in enumerate(track) if c is not None]
        masks = np.stack([c.mask for _, c in seen_frames])
        idx = [f for f, _ in seen_frames]
        core = _core(masks)
        obj_lab = _median_lab(lab[idx], core)
        colour, colour_distance = _OBJECT_NAMES.nearest(obj_lab)
        obj_rgb = np.median(x[idx][core], axis=0)
        traj = np.full((n, 2), np.nan)
        for f, c in seen_frames:
            traj[f] = c.centroid
        # Shape from the frames where the object is largest (unoccluded); its soft coverage is taken within
        # 2 pixels of its mask, away from other objects' pixels.
        areas = np.array([c.area for _, c in seen_frames], np.float64)
        order = np.argsort(-areas, kind="stable")
        alphas = []
        for i in order[:4]:
            if areas[i] < 0.9 * areas[order[0]]:
                break
            f, c = seen_frames[i]
            region = _dilate(c.mask, 2) & ~(all_objects[f] & ~c.mask)
            alphas.append(_alpha(x[f], bg, obj_rgb, region))
        shape, radius, scores = _fit_shape(alphas, height, width)
        size = _nearest_in_log(radius / min(height, width), SIZES)
        motion, speed = _motion(traj, size, height, width)
        objects.append(DetectedObject(colour, shape, size, motion, speed, float(np.median(areas)), radius, traj,
                                      scores, tuple(float(v) for v in obj_lab), colour_distance))
    objects.sort(key=lambda o: -o.area)
    return VideoAnalysis(objects, background, _quality(x, bg, all_objects),
                         tuple(float(v) for v in background_lab), background_distance)


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------


@dataclass
class VideoScore:
    """Judgements of one (video, caption) pair: attribute -> list of True/False (one per judged item)."""

    text: str
    parsed: ParsedCaption
    analysis: VideoAnalysis
    judgements: dict[str, list[bool]]

    @property
    def all_correct(self) -> bool:
        return all(all(v) for v in self.judgements.values())


def _agreement(p: ParsedObject, d: DetectedObject | None) -> dict[str, bool]:
    out = {}
    for a in OBJECT_ATTRIBUTES:
        want = getattr(p, a)
        if want is None:
            continue  # not stated (a still object has no speed)
        out[a] = d is not None and getattr(d, a) == want
    return out


def judge(parsed: ParsedCaption, analysis: VideoAnalysis, text: str = "") -> VideoScore:
    """Compare parsed caption attributes with a video analysis (see the module docstring)."""
    dets = analysis.objects
    best, best_n = None, -1
    slots = list(range(len(dets))) + [None] * len(parsed.objects)
    for assign in itertools.permutations(slots, len(parsed.objects)):
        if any(a is not None and assign.count(a) > 1 for a in assign):
            continue
        agree = [_agreement(p, dets[a] if a is not None else None) for p, a in zip(parsed.objects, assign)]
        n = sum(sum(g.values()) for g in agree)
        if n > best_n:
            best, best_n = agree, n
    judgements: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for g in best or []:
        for a, ok in g.items():
            judgements[a].append(ok)
    if parsed.background is not None:
        judgements["background"].append(analysis.background == parsed.background)
    if parsed.objects:
        judgements["count"].append(len(dets) == len(parsed.objects))
    return VideoScore(text, parsed, analysis, {a: v for a, v in judgements.items() if v})


def _parse(text: str | ParsedCaption | SceneSpec) -> tuple[ParsedCaption, str]:
    if isinstance(text, SceneSpec):
        return ParsedCaption.from_scene(text), ""
    if isinstance(text, ParsedCaption):
        return text, ""
    return parse_caption(text), text


def score_video(frames: np.ndarray, text: str | ParsedCaption | SceneSpec) -> VideoScore:
    """Judge one video against a caption (or already parsed attributes, or a ground-truth scene)."""
    parsed, text = _parse(text)
    return judge(parsed, analyse_video(frames), text)


@dataclass
class ScoreReport:
    accuracy: dict[str, float]
    counts: dict[str, int]
    all_correct: float
    quality: dict[str, float]
    num_videos: int
    videos: list[VideoScore] = field(repr=False)

    def to_dict(self) -> dict:
        return {"num_videos": self.num_videos, "accuracy": self.accuracy, "counts": self.counts,
                "all_correct": self.all_correct, "quality": self.quality}

    def table(self) -> str:
        rows = [f"{'attribute':<17}{'accuracy':>9}{'n':>6}"]
        rows += [f"{a:<17}{self.accuracy[a]:>9.3f}{self.counts[a]:>6d}" for a in self.accuracy]
        rows.append(f"{'all correct':<17}{self.all_correct:>9.3f}{self.num_videos:>6d}")
        rows += [f"{q:<17}{v:>9.4f}" for q, v in self.quality.items()]
        return "\n".join(rows)


def report(scores: Sequence[VideoScore]) -> ScoreReport:
    if not scores:
        raise ValueError("no videos to score")
    acc, counts = {}, {}
    for a in ATTRIBUTES:
        vals = [ok for s in scores for ok in s.judgements.get(a, [])]
        if vals:
            acc[a], counts[a] = float(np.mean(vals)), len(vals)
    quality = {}
    for q in scores[0].analysis.quality:
        vals = [s.analysis.quality[q] for s in scores if not math.isnan(s.analysis.quality[q])]
        quality[q] = float(np.mean(vals)) if vals else float("nan")
    return ScoreReport(acc, counts, float(np.mean([s.all_correct for s in scores])), quality, len(scores),
                       list(scores))


def score_pairs(pairs: Iterable[tuple[np.ndarray, str | ParsedCaption | SceneSpec]]) -> ScoreReport:
    """Score (uint8 frames [F, H, W, 3], caption) pairs."""
    return report([score_video(frames, text) for frames, text in pairs])


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of ``range(n)`` with no fixed point (rejection: ~e draws)."""
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def chance_level(frames_list: Sequence[np.ndarray | VideoAnalysis], texts: Sequence[str | ParsedCaption | SceneSpec],
                 *, shuffles: int = 8, seed: int = 0) -> dict[str, float]:
    """Per-attribute accuracy of the same videos against deranged captions (no video keeps its own),
    averaged over ``shuffles`` derangements: the chance column to print beside :func:`score_pairs`' accuracy.

    ``frames_list`` holds uint8 videos, or their :func:`analyse_video` results (to reuse a scoring pass:
    ``[v.analysis for v in report.videos]``). Returns ``{attribute: accuracy}`` like ``ScoreReport.accuracy``.
    """
    if len(frames_list) != len(texts):
        raise ValueError(f"{len(frames_list)} videos but {len(texts)} captions")
    if len(texts) < 2:
        raise ValueError("chance level needs at least 2 videos (a caption may not stay on its own video)")
    if shuffles < 1:
        raise ValueError(f"shuffles must be >= 1, got {shuffles}")
    analyses = [v if isinstance(v, VideoAnalysis) else analyse_video(v) for v in frames_list]
    parsed = [_parse(t) for t in texts]
    rng = np.random.default_rng(seed)
    totals: dict[str, list[float]] = {}
    for _ in range(shuffles):
        perm = _derangement(len(texts), rng)
        rep = report([judge(parsed[j][0], analyses[i], parsed[j][1]) for i, j in enumerate(perm)])
        for a, acc in rep.accuracy.items():
            totals.setdefault(a, []).append(acc)
    return {a: float(np.mean(totals[a])) for a in ATTRIBUTES if a in totals}


def score_folder(folder: str | os.PathLike, *, limit: int | None = None, progress: bool = False) -> ScoreReport:
    """Score every readable video of a ``captions.jsonl`` folder (at its own resolution) against its caption."""
    import logging

    from neodragon_jax.data.video_folder import read_captions
    from neodragon_jax.data.video_io import read_video

    log = logging.getLogger(__name__)
    entries = read_captions(Path(folder))[:limit]
    scores = []
    from tqdm.auto import tqdm

    for e in tqdm(entries, desc="scoring", unit="video", disable=not progress):
        try:
            frames, _ = read_video(e.path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, as in training
            log.warning("skipping %s: %s", e.path, err)
            continue
        scores.append(score_video(frames, e.text))
    return report(scores)


__all__ = [
    "ATTRIBUTES", "BACKGROUND_COLOUR_TABLE", "BACKGROUND_DISTRACTORS", "DetectedObject", "NamedColours",
    "OBJECT_COLOUR_TABLE", "OBJECT_DISTRACTORS", "ParsedCaption", "ParsedObject", "ScoreReport", "VideoAnalysis",
    "VideoScore", "analyse_video", "chance_level", "judge", "parse_caption", "report", "score_folder",
    "score_pairs", "score_video", "srgb_to_lab",
]
