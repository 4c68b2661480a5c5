"""Renderer and dataset writer of the synthetic captioned-video domain.

A :class:`~neodragon_jax.data.captions.SceneSpec` (one or two coloured shapes with a size and a motion, over
a solid background) becomes a uint8 video ``[F, H, W, 3]``. Rendering is pure numpy and deterministic by
seed: the seed only picks where objects start and nothing else, so every attribute a caption states is
exactly what the pixels show.

What the pixels show (the scorer in ``neodragon_jax.eval.scorer`` relies on these facts):

* Objects are flat fills of their palette colour (``captions.COLOURS``), axis-aligned in a canonical
  orientation (a diamond is a rhombus standing on a corner, the triangle points up, the square sits flat),
  with circumscribed radius ``SIZES[size] * min(H, W)``. Anti-aliasing (default) averages ``supersample^2``
  samples per pixel; ``supersample=1`` draws crisp edges.
* Objects never leave the frame: their centre stays ``r + 1`` pixels from every edge.
* ``linear`` motion travels ``SPEEDS[speed] * W`` pixels along its direction over the clip at constant
  velocity, shortened when the frame has no room for it (a large object moving fast); ``still`` objects do
  not move.
* Backgrounds: solid ``BACKGROUNDS`` colours (black, gray, white); an object is never drawn in its
  background's colour.
* With two objects, the second is drawn over the first; their start positions are re-drawn (up to
  ``_SEPARATION_TRIES`` times) so they never touch when the frame allows it (at 32x32 two moving objects
  often must cross).
* Motion is defined per clip, so the frame rate only matters when writing files.

``write_dataset`` writes the folder format a user's real dataset uses (``videos/*.mp4`` + ``captions.jsonl``
with ``{"video": relative path, "text": caption}``), plus ``scenes.jsonl`` (ground-truth attributes and the
render seed of every video) and ``dataset.json`` (the writer's arguments).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np

from neodragon_jax.data.captions import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    CombinationSplit,
    ObjectSpec,
    SceneSpec,
    caption,
    sample_scene,
    split_combinations,
)

#: Start positions drawn per two-object scene at most, to keep the objects apart.
_SEPARATION_TRIES = 32


# ---------------------------------------------------------------------------------------------------------
# Shapes (unit circumscribed radius, image coordinates: x right, y down)
# ---------------------------------------------------------------------------------------------------------

_DIAMOND_HALF_WIDTH = 0.75


def _regular(n: int, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + np.arange(n) * 360.0 / n)
    return np.stack([np.cos(angles), np.sin(angles)], -1)


#: Polygon vertices of the polygonal shapes (the circle is analytic).
SHAPE_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float64) / np.sqrt(2.0),
    "triangle": _regular(3, -90.0),
    "diamond": np.array([(0, -1), (_DIAMOND_HALF_WIDTH, 0), (0, 1), (-_DIAMOND_HALF_WIDTH, 0)], np.float64),
}
assert set(SHAPES) == set(SHAPE_POLYGONS) | {"circle"}, "every caption shape needs a drawing"


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for arrays of points (vectorised over points, looped over edges)."""
    inside = np.zeros(px.shape, bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        if b == d:
            continue
        crosses = (b > py) != (d > py)
        inside ^= crosses & (px < (c - a) * (py - b) / (d - b) + a)
    return inside


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit-radius coordinates ``(u, v)`` (centre at 0, y down) lie inside ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape not in SHAPE_POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    return _inside_polygon(u, v, SHAPE_POLYGONS[shape])


def shape_area(shape: str) -> float:
    """Area of ``shape`` at unit circumscribed radius."""
    if shape == "circle":
        return float(np.pi)
    x, y = SHAPE_POLYGONS[shape].T
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def shape_coverage(shape: str, cx: float, cy: float, radius: float, height: int, width: int,
                   *, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by ``shape`` centred at ``(cx, cy)`` (pixel units, pixel ``(i, j)``
    spans ``[j, j+1) x [i, i+1)``) -> float32 ``[H, W]`` in [0, 1]. ``supersample=1``: crisp (0 or 1)."""
    cov = np.zeros((height, width), np.float32)
    x0, x1 = max(0, int(np.floor(cx - radius - 1))), min(width, int(np.ceil(cx + radius + 1)))
    y0, y1 = max(0, int(np.floor(cy - radius - 1))), min(height, int(np.ceil(cy + radius + 1)))
    if x1 <= x0 or y1 <= y0 or radius <= 0:
        return cov
    s = int(supersample)
    offs = (np.arange(s) + 0.5) / s
    xs = (np.arange(x0, x1)[:, None] + offs[None]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offs[None]).reshape(-1)
    u = (xs[None, :] - cx) / radius
    v = (ys[:, None] - cy) / radius
    hit = inside_shape(shape, np.broadcast_to(u, (len(ys), len(xs))), np.broadcast_to(v, (len(ys), len(xs))))
    cov[y0:y1, x0:x1] = hit.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return cov


# ---------------------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------------------


def render_background(name: str, height: int, width: int) -> np.ndarray:
    """Background image float32 ``[H, W, 3]`` in 0..255: the solid ``BACKGROUNDS`` colour."""
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; expected one of {sorted(BACKGROUNDS)}")
    return np.broadcast_to(np.asarray(BACKGROUNDS[name], np.float32), (height, width, 3)).copy()


# ---------------------------------------------------------------------------------------------------------
# Motion
# ---------------------------------------------------------------------------------------------------------


def object_radius(size: str, height: int, width: int) -> float:
    """Circumscribed radius in pixels of an object of ``size``."""
    return SIZES[size] * min(height, width)


def linear_travel(motion: str, speed: str, size: str, height: int, width: int) -> float:
    """Distance in pixels a ``linear`` object travels over the clip: ``SPEEDS[speed] * W``, shortened to the
    room the frame leaves for an object of ``size``."""
    dx, dy = MOTIONS[motion].direction
    m = object_radius(size, height, width) + 1.0
    dist = SPEEDS[speed] * width
    if dx:
        dist = min(dist, (width - 2 * m) / abs(dx))
    if dy:
        dist = min(dist, (height - 2 * m) / abs(dy))
    return max(dist, 0.0)


def object_trajectory(obj: ObjectSpec, height: int, width: int, num_frames: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Centre ``(x, y)`` per frame, float64 ``[F, 2]``; ``rng`` draws only the start position."""
    m = object_radius(obj.size, height, width) + 1.0  # fits: 2m < min(H, W) for every size once H, W >= 8
    t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    motion = MOTIONS[obj.motion]
    if motion.kind == "still":
        p = np.array([rng.uniform(m, width - m), rng.uniform(m, height - m)])
        return np.broadcast_to(p, (num_frames, 2)).copy()
    d = np.asarray(motion.direction, np.float64)
    step = d * linear_travel(obj.motion, obj.speed, obj.size, height, width)
    lo = np.array([m, m]) - np.minimum(step, 0.0)
    hi = np.array([width - m, height - m]) - np.maximum(step, 0.0)
    p0 = rng.uniform(lo, np.maximum(hi, lo))
    return p0[None] + t[:, None] * step[None]


def _separation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.linalg.norm(a - b, axis=-1)))


# ---------------------------------------------------------------------------------------------------------
# Scenes -> videos
# ---------------------------------------------------------------------------------------------------------


def render_scene(scene: SceneSpec, *, height: int = 64, width: int = 64, num_frames: int = 17,
                 seed: int | Sequence[int] = 0, supersample: int = 4) -> np.ndarray:
    """Render ``scene`` as uint8 ``[F, H, W, 3]``; the same ``seed`` gives the same video.

    ``supersample`` samples per pixel side for anti-aliasing (1: crisp edges).
    """
    if height < 8 or width < 8 or num_frames < 1:
        raise ValueError(f"need height, width >= 8 and num_frames >= 1, got {height}x{width}, {num_frames} frames")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    rng = np.random.default_rng(seed)
    background = render_background(scene.background, height, width)
    paths = _trajectories(scene, height, width, num_frames, rng)
    video = np.empty((num_frames, height, width, 3), np.float32)
    for f in range(num_frames):
        frame = background.copy()
        for obj, path in zip(scene.objects, paths):
            cov = shape_coverage(obj.shape, path[f, 0], path[f, 1], object_radius(obj.size, height, width),
                                 height, width, supersample=supersample)[..., None]
            frame = frame * (1.0 - cov) + np.asarray(COLOURS[obj.colour], np.float32) * cov
        video[f] = frame
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def _trajectories(scene: SceneSpec, height: int, width: int, num_frames: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    paths = [object_trajectory(o, height, width, num_frames, rng) for o in scene.objects]
    if len(paths) == 2:
        # Re-draw both start positions (same rng: still deterministic) until the objects never touch, keeping
        # the most separated draw when the frame is too small for that.
        want = sum(object_radius(o.size, height, width) for o in scene.objects) + 1.0
        best, best_sep = paths, _separation(*paths)
        for _ in range(_SEPARATION_TRIES):
            if best_sep >= want:
                break
            cand = [object_trajectory(o, height, width, num_frames, rng) for o in scene.objects]
            sep = _separation(*cand)
            if sep > best_sep:
                best, best_sep = cand, sep
        paths = best
    return paths


# ---------------------------------------------------------------------------------------------------------
# Scene (de)serialisation
# ---------------------------------------------------------------------------------------------------------


def scene_to_dict(scene: SceneSpec) -> dict:
    return {"background": scene.background, "objects": [asdict(o) for o in scene.objects]}


def scene_from_dict(d: dict) -> SceneSpec:
    return SceneSpec(objects=tuple(ObjectSpec(**o) for o in d["objects"]), background=d["background"])


# ---------------------------------------------------------------------------------------------------------
# Dataset writer
# ---------------------------------------------------------------------------------------------------------


def _scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def dataset_item(index: int, *, seed: int = 0, combinations=None, two_object_prob: float = 0.3,
                 num_objects: int | None = None) -> tuple[SceneSpec, str, list[int]]:
    """Scene, caption and render seed of item ``index`` (a pure function of its arguments)."""
    rng = _scene_rng(seed, index)
    scene = sample_scene(rng, combinations=combinations, num_objects=num_objects, two_object_prob=two_object_prob)
    return scene, caption(scene, rng), [int(seed), int(index), 1]


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    height: int = 64,
    width: int = 64,
    num_frames: int = 17,
    fps: int = 8,
    *,
    split: CombinationSplit | None = None,
    held_out: bool = False,
    two_object_prob: float = 0.3,
    video_format: Literal["mp4", "gif"] = "mp4",
    supersample: int = 4,
    progress: bool = True,
) -> Path:
    """Write ``n`` rendered videos and their captions to ``out_dir`` (created) and return it.

    Layout::

        out_dir/videos/000000.mp4 ...   lossless RGB H.264 (decodes to the rendered pixels exactly)
        out_dir/captions.jsonl    {"video": "videos/000000.mp4", "text": caption}   (a real dataset's format)
        out_dir/scenes.jsonl      {"video", "text", "scene": {...}, "render_seed", "held_out"}  (ground truth)
        out_dir/dataset.json      the arguments of this call

    ``split`` restricts (colour, shape, motion) triples to ``split.train`` (default: all triples), or with
    ``held_out=True`` to ``split.held_out`` (default split: ``split_combinations()``); held-out sets have one
    object per scene (evaluation prompts for compositional generalisation). Item ``i`` depends only on
    ``(seed, i)`` and the split.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if video_format not in ("mp4", "gif"):
        raise ValueError(f"video_format must be 'mp4' or 'gif', got {video_format!r}")
    from neodragon_jax.data.video_io import write_gif, write_mp4

    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    if held_out:
        split = split or split_combinations()
        combos, num_objects = split.held_out, 1
    else:
        combos, num_objects = (split.train if split is not None else None), None

    captions_rows, scene_rows = [], []
    bar = _progress(n, "rendering", progress)
    try:
        for i in range(n):
            scene, text, rseed = dataset_item(i, seed=seed, combinations=combos, two_object_prob=two_object_prob,
                                              num_objects=num_objects)
            frames = render_scene(scene, height=height, width=width, num_frames=num_frames, seed=rseed,
                                  supersample=supersample)
            rel = f"videos/{i:06d}.{video_format}"
            if video_format == "mp4":
                write_mp4(frames, out / rel, fps=fps, lossless=True)
            else:
                write_gif(frames, out / rel, fps=fps)
            captions_rows.append({"video": rel, "text": text})
            scene_rows.append({"video": rel, "text": text, "scene": scene_to_dict(scene), "render_seed": rseed,
                               "held_out": bool(split is not None and split.is_held_out(scene))})
            bar.update(1)
    finally:
        bar.close()
    _write_jsonl(out / "captions.jsonl", captions_rows)
    _write_jsonl(out / "scenes.jsonl", scene_rows)
    meta = {"n": n, "seed": seed, "height": height, "width": width, "num_frames": num_frames, "fps": fps,
            "held_out": held_out, "combinations": "held_out" if held_out else "all" if split is None else "train",
            "two_object_prob": two_object_prob, "video_format": video_format, "supersample": supersample}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_scenes(folder: str | os.PathLike) -> list[dict]:
    """Rows of ``folder/scenes.jsonl`` with ``"scene"`` turned into a :class:`SceneSpec`."""
    path = Path(folder) / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: ground-truth scenes exist only for folders written by write_dataset")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["scene"] = scene_from_dict(row["scene"])
            rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="video", disable=not enabled, dynamic_ncols=True)


__all__ = [
    "SHAPE_POLYGONS",
    "dataset_item", "inside_shape", "linear_travel", "object_radius", "object_trajectory",
    "read_scenes", "render_background", "render_scene", "scene_from_dict", "scene_to_dict", "shape_area",
    "shape_coverage", "write_dataset",
]
