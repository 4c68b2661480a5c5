"""Pixel scorer of the synthetic captioned-video domain: does a video show what its caption says?

No learned model is involved; everything is measured from uint8 frames ``[F, H, W, 3]`` and works at the
tiny preset's 64x64. The measurement relies on facts the renderer (``neodragon_jax.data.synthetic``)
guarantees: objects are flat fills of palette colours, backgrounds stay far from the palette, shapes have a
canonical orientation, motion is linear at constant speed, still, or a vertical ``|sin|`` bounce.

**Caption side** (:func:`parse_caption`): the caption is parsed back to attributes with the vocabularies
and synonyms of ``neodragon_jax.data.captions``, by keywords rather than templates, so paraphrases parse too
("a big violet hoop hopping quickly over a grey backdrop"). Background phrases are found first (``on white``,
``... gray backdrop``, ``checkered``, ``gradient``) and removed; each shape word then anchors one object,
its size and colour words come from the words just before it (or ``in / coloured <colour>`` just after), its motion
from the words up to the next object (bounce / hop, still / in place / not moving, otherwise the up / down /
left / right / top / bottom words give one of the 8 directions), its speed from the speed adverbs.

**Pixel side** (:func:`analyse_video`):

* *objects*: every pixel within ``PALETTE_TOLERANCE`` (RGB distance) of its nearest palette colour is
  labelled with that colour. Per colour, 4-connected components per frame that survive a 1-pixel erosion
  (so antialiased seams between two objects do not count) and have at least ``min_area`` pixels are
  objects; a colour showing two such components in at least a quarter of its frames holds two objects,
  tracked by nearest centroid (frames where they touch are left out). An object must appear in 30% of the
  frames.
* *colour*: the palette colour of the object's pixels; objects are ordered by median area, so the first
  is the dominant foreground colour.
* *shape* and *size*: template matching against the renderer's own shapes: in up to 4 frames where the
  object is largest (unoccluded), each of the 8 shapes is drawn centred on the object's centroid with the
  radius that gives the observed area (x 0.9 / 1 / 1.1), and the shape with the best summed IoU wins. The
  fitted circumscribed radius over ``min(H, W)`` gives the size (threshold: the geometric mean of the two
  ``SIZES``).
* *motion*: the centroid trajectory. Range below ``STILL_FRACTION * min(H, W)`` -> ``still``; net
  displacement below ``BOUNCE_STRAIGHTNESS`` of the path length -> ``bounce``; otherwise the fitted
  displacement's angle, quantised to 8 directions. *Speed*: the displacement compared (in log space) with
  the distances the renderer would use for ``slow`` and ``fast`` at the fitted size and direction; for a
  bounce, path length over hop height (2 per hop).
* *background*: the per-pixel temporal median of the pixels away from objects, fitted by a plane per
  channel: a small spread is a solid colour (the nearest of black / gray / white), a spread the plane
  explains (R^2 > ``GRADIENT_R2``) a gradient, anything else a checkerboard.

**Scoring** (:func:`score_video`): caption objects are matched one-to-one to detected objects by the
assignment with the most agreeing attributes (so a two-object caption may name its objects in any order),
and both objects of two-object scenes are scored. Per attribute: ``colour``, ``shape``, ``size``,
``motion`` (the 8 directions, still or bounce), ``speed`` (objects that move) per caption object;
``background`` and ``count`` (number of objects) per video. A caption object with no detected partner
counts as wrong on all its attributes; an attribute the caption does not state is not judged. A report
(:func:`score_pairs`, :func:`score_folder`) gives per-attribute accuracy, ``all_correct`` (videos with every
judged attribute right) and the means of the quality figures.

**Quality figures** (per video, caption-free): ``frame_diff`` mean absolute frame-to-frame change (0..1);
``flicker`` the same on background pixels only (a static background should give ~0; codec noise ~0.005);
``sharpness`` the variance of the luminance Laplacian (0..1 units); ``saturation`` mean HSV saturation;
``palette_fraction`` the fraction of pixels within ``QUALITY_TOLERANCE`` of a palette colour or of the
estimated background at that pixel (near 1 for clean renders, lower for blurry or off-palette output).

Chance level: scoring videos against shuffled captions gives about the chance of drawing the same value
(e.g. ~1/8 for colour and shape, ~1/10 for motion), a little higher with two-object scenes because the
matching picks the better of two partners.
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
    BOUNCES_PER_CLIP,
    COLOUR_WORDS,
    COLOURS,
    MOTIONS,
    SHAPE_WORDS,
    SIZE_WORDS,
    SHAPES,
    SIZES,
    SPEED_WORDS,
    SPEEDS,
    SceneSpec,
)
from neodragon_jax.data.synthetic import linear_travel, shape_area, shape_coverage

#: RGB distance within which a pixel counts as showing a palette colour.
PALETTE_TOLERANCE = 70.0
#: RGB distance for the ``palette_fraction`` quality figure (tighter than detection: it grades cleanliness).
QUALITY_TOLERANCE = 30.0
#: An object whose centroid moves less than this fraction of min(H, W) is still.
STILL_FRACTION = 0.04
#: Net displacement / path length below this is a bounce (a linear motion gives ~1).
BOUNCE_STRAIGHTNESS = 0.6
#: Background colour spread (RGB std) below which the background is solid.
SOLID_STD = 6.0
#: A solid background is recognised first when this fraction of the temporal-median frame is within
#: ``SOLID_MATCH`` of its colour.
SOLID_COVER = 0.25
SOLID_MATCH = 10.0
#: Fraction of background variance a plane must explain for a gradient.
GRADIENT_R2 = 0.8

#: Two objects share a colour when their components are apart in at least this fraction of the frames.
TWO_SAME_COLOUR_FRACTION = 0.15
#: Radius factors tried around the area-matched radius when fitting a shape template.
_SCALES = (0.94, 1.0, 1.06)

OBJECT_ATTRIBUTES = ("colour", "shape", "size", "motion", "speed")
VIDEO_ATTRIBUTES = ("background", "count")
ATTRIBUTES = OBJECT_ATTRIBUTES + VIDEO_ATTRIBUTES

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in _PALETTE_NAMES], np.float32)
_SHAPE_AREAS = {s: shape_area(s) for s in SHAPES}
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])
_SOLID = {name: np.asarray(rgb, np.float32) for name, rgb in BACKGROUNDS.items() if rgb is not None}

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
        """The attributes of a ground-truth scene (what a perfect parse of its caption gives)."""
        objs = tuple(ParsedObject(o.colour, o.shape, o.size, o.motion, o.speed) for o in scene.objects)
        return cls(objs, scene.background)


def _word_table(table: dict[str, tuple[str, ...]], extra: dict[str, str] | None = None) -> dict[str, str]:
    out = {w: value for value, words in table.items() for w in words if " " not in w}
    out.update(extra or {})
    return out


_COLOUR_OF = _word_table(COLOUR_WORDS, {"violet": "purple", "aqua": "cyan", "turquoise": "cyan"})
_SHAPE_OF = _word_table(SHAPE_WORDS, {"disk": "circle", "plus": "cross", "hoop": "ring"})
_SIZE_OF = _word_table(SIZE_WORDS, {"huge": "large", "larger": "large", "smaller": "small"})
_BG_COLOUR_OF = _word_table(BACKGROUND_COLOUR_WORDS)
# Speed phrases ("at a slow pace", "at high speed") are recognised by their key word.
_SPEED_OF = _word_table(SPEED_WORDS, {"slow": "slow", "leisurely": "slow", "quick": "fast", "rapid": "fast",
                                      "high": "fast", "swiftly": "fast"})
_UP = {"up", "upward", "upwards", "top", "upper"}
_DOWN = {"down", "downward", "downwards", "bottom", "lower"}
_LEFT = {"left", "leftward", "leftwards"}
_RIGHT = {"right", "rightward", "rightwards"}
_BG_NOUNS = {"background", "backdrop", "backdrops", "backgrounds", "scene"}
_PATTERN_OF = {"checkerboard": "checkerboard", "checkered": "checkerboard", "chequered": "checkerboard",
               "checker": "checkerboard", "checkers": "checkerboard", "gradient": "gradient"}
_ARTICLES = {"a", "an", "the", "one"}
_BG_FILLER = {"on", "over", "against", "in", "front", "of", "a", "an", "the", "smooth", "colour", "color", "plain",
              "soft", "subtle", "linear"}
_BREAK = {",", ":", ";", "."}
_MODIFIERS = set(_SIZE_OF) | set(_COLOUR_OF) | _ARTICLES | {"coloured", "colored"}

# The direction (dx, dy) -> motion name table, from the captions vocabulary.
_DIRECTION_NAME = {tuple(int(np.sign(round(v, 3))) for v in m.direction): name
                   for name, m in MOTIONS.items() if m.kind == "linear"}


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[,:;.]", text.lower())


def _find_background(tok: list[str]) -> tuple[str | None, set[int]]:
    """Background value and the token positions its phrase uses."""
    for i, w in enumerate(tok):
        for key, value in _PATTERN_OF.items():
            if w.startswith(key):
                used = {i}
                j = i - 1  # swallow the filler before the pattern word ("over a smooth colour gradient")
                while j >= 0 and tok[j] in _BG_FILLER:
                    used.add(j)
                    j -= 1
                if i + 1 < len(tok) and tok[i + 1] in _BG_NOUNS | {"pattern"}:
                    used.add(i + 1)
                return value, used
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
    if any(w.startswith("bounc") or w.startswith("hop") for w in words):
        return "bounce", speed
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
        if tok[i] == "plus" and k < len(tok) and tok[k] == "sign":
            k += 1
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
    """One object found in the pixels. ``trajectory`` is ``[F, 2]`` (x, y) with NaN where not seen."""

    colour: str
    shape: str | None
    size: str | None
    motion: str | None
    speed: str | None
    area: float
    radius: float
    trajectory: np.ndarray = field(repr=False)
    shape_scores: dict[str, float] = field(default_factory=dict, repr=False)

    def attributes(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in OBJECT_ATTRIBUTES}


@dataclass
class VideoAnalysis:
    objects: list[DetectedObject]
    background: str | None
    quality: dict[str, float]


def _shift(x: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``x`` shifted along its last two axes, edges filled with ``fill``."""
    out = np.full_like(x, fill)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    for dy, dx in _NEIGHBOURS:
        out &= _shift(m, dy, dx, False)
    return out


def _dilate(m: np.ndarray, steps: int = 1) -> np.ndarray:
    out = m.copy()
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


def _solid_background(x: np.ndarray) -> str | None:
    """A solid background colour covering at least ``SOLID_COVER`` of the temporal-median frame, or None."""
    med = np.median(x, axis=0)
    cover = {n: float((np.linalg.norm(med - rgb, axis=-1) < SOLID_MATCH).mean()) for n, rgb in _SOLID.items()}
    best = max(cover, key=cover.get)
    return best if cover[best] >= SOLID_COVER else None


def _palette_labels(x: np.ndarray, disabled: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette index per pixel (-1 beyond the tolerance) and that distance; ``x`` float [F,H,W,3].
    ``disabled`` palette entries are never chosen (colours the background itself matches)."""
    d = np.sqrt(((x[..., None, :] - _PALETTE) ** 2).sum(-1))
    if len(disabled):
        d[..., list(disabled)] = np.inf
    idx = d.argmin(-1)
    dist = np.take_along_axis(d, idx[..., None], -1)[..., 0]
    return np.where(dist < PALETTE_TOLERANCE, idx, -1), dist


def _frame_components(mask_f: np.ndarray, min_area: float) -> list[np.ndarray]:
    """Boolean masks of the object-sized components of one frame's colour mask."""
    eroded = _erode(mask_f)
    lab = _components(mask_f)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    out = []
    for i, c in zip(ids, counts):
        comp = lab == i
        if c >= min_area and (eroded & comp).any():
            out.append(comp)
    out.sort(key=lambda m: -int(m.sum()))
    return out


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def _tracks_for_colour(comps: list[list[np.ndarray]], others: np.ndarray,
                       min_frames: int) -> list[list[np.ndarray | None]]:
    """Per object of one colour, its mask per frame (None where not seen). ``comps``: the colour's
    object-sized components per frame; ``others``: the other colours' components, ``[F, H, W]``."""
    seen = sum(len(c) > 0 for c in comps)
    if seen < min_frames:
        return []
    union = [np.logical_or.reduce(c) if c else None for c in comps]
    # Two objects of this colour show as two components away from any other object; pieces of one object
    # cut apart by another object passing over it touch that object.
    clean_two = sum(len(c) >= 2 and not (_dilate(union[f], 1) & others[f]).any() for f, c in enumerate(comps))
    if clean_two < max(2, TWO_SAME_COLOUR_FRACTION * seen):
        return [union]  # one object: its pixels are the union of its pieces
    tracks: list[list[np.ndarray | None]] = [[None] * len(comps), [None] * len(comps)]
    last = None
    for f, c in enumerate(comps):
        if len(c) < 2:
            continue  # touching or hidden: ambiguous, left out
        a, b = c[0], c[1]
        ca, cb = _centroid(a), _centroid(b)
        if last is None:
            order = (a, b) if tuple(ca) <= tuple(cb) else (b, a)
        else:
            keep = np.linalg.norm(ca - last[0]) + np.linalg.norm(cb - last[1])
            swap = np.linalg.norm(ca - last[1]) + np.linalg.norm(cb - last[0])
            order = (a, b) if keep <= swap else (b, a)
        tracks[0][f], tracks[1][f] = order
        last = (_centroid(order[0]), _centroid(order[1]))
    if min(sum(m is not None for m in t) for t in tracks) < 2:
        return [union]
    return tracks


def _alpha(x_f: np.ndarray, bg: np.ndarray, colour: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Soft coverage of ``colour`` over the background ``bg`` per pixel of ``region`` (0 elsewhere): the
    projection of (pixel - bg) on (colour - bg). Uses luma and chroma together, which matters for 4:2:0
    video where the chroma of small shapes is blurred."""
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


def _motion(traj: np.ndarray, size: str | None, height: int, width: int) -> tuple[str | None, str | None]:
    ok = ~np.isnan(traj[:, 0])
    t = np.nonzero(ok)[0]
    if len(t) < 2:
        return None, None
    c = traj[ok]
    extent = float(np.max(np.ptp(c, axis=0)))
    if extent < max(1.5, STILL_FRACTION * min(height, width)):
        return "still", None
    path = float(np.linalg.norm(np.diff(c, axis=0), axis=-1).sum())
    net = float(np.linalg.norm(c[-1] - c[0]))
    size = size or "small"
    if net < BOUNCE_STRAIGHTNESS * path:
        hops = path / max(float(np.ptp(c[:, 1])), 1e-6) / 2.0
        speed = min(BOUNCES_PER_CLIP, key=lambda s: abs(math.log(hops / BOUNCES_PER_CLIP[s])))
        return "bounce", speed
    # Fitted displacement over the whole clip (least squares, robust to a noisy endpoint).
    span = (len(traj) - 1) or 1
    slope = np.polyfit(t.astype(np.float64), c, 1)[0]
    disp = slope * span
    motion = _angle_name(float(disp[0]), float(disp[1]))
    dist = float(np.linalg.norm(disp))
    expected = {s: linear_travel(motion, s, size, height, width) for s in SPEEDS}
    speed = min(expected, key=lambda s: abs(math.log(max(dist, 1e-6) / max(expected[s], 1e-6))))
    return motion, speed


def _background(x: np.ndarray, objects_px: np.ndarray) -> tuple[str | None, np.ndarray]:
    """Background value and the per-pixel background estimate ``[H, W, 3]``: the temporal median of the
    pixels away from objects, holes (under still objects) filled by the plane fit."""
    keep = ~_dilate(objects_px, 2)
    masked = np.where(keep[..., None], x, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: never visible
        bg = np.nanmedian(masked, axis=0)
    valid = ~np.isnan(bg[..., 0])
    if valid.sum() < 16:
        return None, np.nan_to_num(np.median(x, axis=0))
    px = bg[valid].astype(np.float64)
    h, w = valid.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([xx, yy, np.ones_like(xx)], -1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design[valid], px, rcond=None)
    plane = design @ coef
    bg = np.where(valid[..., None], bg, plane).astype(np.float32)
    spread = float(np.sqrt(px.var(axis=0).sum()))
    if spread < SOLID_STD:
        mean = px.mean(0)
        return min(_SOLID, key=lambda n: float(np.linalg.norm(mean - _SOLID[n]))), bg
    resid = px - plane[valid]
    r2 = 1.0 - float((resid ** 2).sum()) / max(float(((px - px.mean(0)) ** 2).sum()), 1e-9)
    return ("gradient" if r2 > GRADIENT_R2 else "checkerboard"), bg


def _quality(x: np.ndarray, bg: np.ndarray, objects_px: np.ndarray, palette_dist: np.ndarray) -> dict[str, float]:
    f = x.shape[0]
    diff = np.abs(np.diff(x, axis=0)) / 255.0 if f > 1 else np.zeros((1,) + x.shape[1:], np.float32)
    quiet = ~_dilate(objects_px, 2)
    quiet_pairs = (quiet[1:] & quiet[:-1]) if f > 1 else np.zeros_like(quiet[:1])
    flicker = float(diff.mean(-1)[quiet_pairs].mean()) if quiet_pairs.any() else float("nan")
    lum = (x @ np.asarray([0.299, 0.587, 0.114], np.float32)) / 255.0
    lap = (lum[:, 1:-1, :-2] + lum[:, 1:-1, 2:] + lum[:, :-2, 1:-1] + lum[:, 2:, 1:-1] - 4 * lum[:, 1:-1, 1:-1])
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
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
    # A palette colour the background itself shows (white objects vs a white background) cannot be seen;
    # captions never ask for it, so it is switched off rather than mistaken for a frame-sized object.
    solid = _solid_background(x)
    disabled = [] if solid is None else [
        i for i, rgb in enumerate(_PALETTE) if np.linalg.norm(rgb - _SOLID[solid]) < PALETTE_TOLERANCE]
    labels, pal_dist = _palette_labels(x, disabled)
    objects_px = labels >= 0
    background, bg = _background(x, objects_px)
    min_area = max(4.0, 0.0015 * height * width)
    min_frames = max(1, int(math.ceil(0.3 * n)))
    objects: list[DetectedObject] = []
    empty = np.zeros((height, width), bool)
    comps, own = {}, {}
    for ci in range(len(_PALETTE_NAMES)):
        mask = labels == ci
        if mask.any():
            comps[ci] = [_frame_components(m, min_area) if m.any() else [] for m in mask]
            own[ci] = np.stack([np.logical_or.reduce(c) if c else empty for c in comps[ci]])
    found = np.logical_or.reduce(list(own.values())) if own else np.zeros_like(objects_px)
    for ci, cc in comps.items():
        colour = _PALETTE_NAMES[ci]
        for track in _tracks_for_colour(cc, found & ~own[ci], min_frames):
            seen = [(f, m) for f, m in enumerate(track) if m is not None]
            areas = np.array([m.sum() for _, m in seen], np.float64)
            traj = np.full((n, 2), np.nan)
            for f, m in seen:
                traj[f] = _centroid(m)
            # Shape from the frames where the object is largest (unoccluded); its soft coverage is taken
            # within 2 pixels of its mask, away from other objects' pixels.
            order = np.argsort(-areas, kind="stable")
            alphas = []
            for i in order[:4]:
                if areas[i] < 0.9 * areas[order[0]]:
                    break
                f, m = seen[i]
                region = _dilate(m, 2) & ~(objects_px[f] & ~m)
                alphas.append(_alpha(x[f], bg, _PALETTE[ci], region))
            shape, radius, scores = _fit_shape(alphas, height, width)
            size = "large" if radius / min(height, width) >= _SIZE_THRESHOLD else "small"
            motion, speed = _motion(traj, size, height, width)
            objects.append(DetectedObject(colour, shape, size, motion, speed, float(np.median(areas)), radius,
                                          traj, scores))
    objects.sort(key=lambda o: -o.area)
    return VideoAnalysis(objects, background, _quality(x, bg, objects_px, pal_dist))


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


def score_video(frames: np.ndarray, text: str | ParsedCaption | SceneSpec) -> VideoScore:
    """Judge one video against a caption (or already parsed attributes, or a ground-truth scene)."""
    if isinstance(text, SceneSpec):
        parsed, text = ParsedCaption.from_scene(text), ""
    elif isinstance(text, ParsedCaption):
        parsed, text = text, ""
    else:
        parsed = parse_caption(text)
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
    "ATTRIBUTES", "DetectedObject", "ParsedCaption", "ParsedObject", "ScoreReport", "VideoAnalysis", "VideoScore",
    "analyse_video", "judge", "parse_caption", "report", "score_folder", "score_pairs", "score_video",
]
