"""Video + caption folders: the dataset format (``captions.jsonl`` beside mp4 / webm / gif files).

``root/captions.jsonl`` holds one JSON object per line, ``{"video": path, "text": caption}``, the path
relative to ``root`` (or absolute). :class:`VideoFolder` turns entry ``i`` into the model's input:

* frames sampled at a target frame rate (``fps``; None keeps the source rate) starting at the first frame,
  each target time taking the nearest decoded frame, until ``num_frames`` frames are gathered;
* each frame resized (Pillow, antialiased bicubic) so it covers ``height x width``, then centre-cropped;
* values ``x / 127.5 - 1`` as float32 ``[3, F, H, W]``.

Damaged data never stops a long run: an entry whose file is missing is left out (warned once, when the
folder is opened), a file that cannot be decoded or is too short is skipped with a warning each time it is
read. Every outcome is counted in :attr:`VideoFolder.stats` (``ReadStats.as_dict()`` gives metric names for
the training run's logs). Decoding is streaming (PyAV): only the frames that are kept are converted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"


class DatasetError(ValueError):
    """A dataset folder that cannot be used: malformed ``captions.jsonl`` (file and line named), no entries,
    no readable clip. A user error: the CLI prints it as one line."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder, its ``captions.jsonl`` or every listed video is missing."""


class VideoReadError(Exception):
    """A video file that cannot be decoded, or is too short for the requested clip."""

    def __init__(self, path: str | os.PathLike, reason: str, kind: Literal["corrupt", "too_short"] = "corrupt"):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.kind = str(path), reason, kind


@dataclass(frozen=True)
class CaptionEntry:
    """One line of ``captions.jsonl``: ``index`` is the 0-based position among the file's entries."""

    index: int
    line: int
    rel: str
    path: Path
    text: str


def read_captions(root: str | os.PathLike) -> list[CaptionEntry]:
    """All entries of ``root/captions.jsonl`` in file order (blank lines ignored); files are not checked."""
    root = Path(root)
    path = root / CAPTIONS_FILE
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset folder {str(root)!r} does not exist")
    if not path.is_file():
        raise DatasetNotFoundError(
            f"no {CAPTIONS_FILE} in {str(root)!r}: a dataset folder needs {path} with one JSON object per line, "
            '{"video": "relative/path.mp4", "text": "the caption"}'
        )
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected "
                             '{"video": "relative/path.mp4", "text": "the caption"}') from None
        if not isinstance(row, dict) or not isinstance(row.get("video"), str) or not isinstance(row.get("text"), str):
            raise DatasetError(f'{path}:{lineno}: expected an object with string fields "video" and "text", '
                             f"got {line.strip()[:120]!r}")
        video = Path(row["video"])
        entries.append(CaptionEntry(len(entries), lineno, row["video"], video if video.is_absolute() else root / video,
                                    row["text"]))
    if not entries:
        raise DatasetError(f"{path} has no entries")
    return entries


@dataclass
class ReadStats:
    """What happened to the entries read so far (``missing`` is counted once, when the folder is opened)."""

    read: int = 0
    corrupt: int = 0
    too_short: int = 0
    missing: int = 0

    @property
    def skipped(self) -> int:
        return self.corrupt + self.too_short

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        out = {f"{prefix}videos_{f.name}": getattr(self, f.name) for f in fields(self)}
        out[f"{prefix}videos_skipped"] = self.skipped
        return out


# ---------------------------------------------------------------------------------------------------------
# Decoding one clip
# ---------------------------------------------------------------------------------------------------------


def _resize_crop(rgb: np.ndarray, height: int, width: int):
    """Scale to cover ``height x width`` and centre-crop, in one antialiased Pillow resize (``box`` = crop)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    ch, cw = height / scale, width / scale  # the crop in source pixels
    box = ((w - cw) / 2.0, (h - ch) / 2.0, (w + cw) / 2.0, (h + ch) / 2.0)
    img = Image.fromarray(rgb)
    if (h, w) == (height, width):
        return np.asarray(img)
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC, box=box))


def decode_clip(path: str | os.PathLike, *, num_frames: int, height: int, width: int, fps: float | None = None,
                short: Literal["skip", "pad"] = "skip") -> np.ndarray:
    """Decode, sample, resize and crop one clip -> uint8 ``[F, H, W, 3]``; raises :class:`VideoReadError`."""
    import av

    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be >= 1, got {num_frames}, {height}, {width}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive or None (keep the source rate), got {fps}")
    kept: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            src_fps = float(rate) if rate else 0.0
            t0 = None
            prev = None  # (time, av frame) of the last decoded frame not yet known to be useless
            for i, frame in enumerate(container.decode(stream)):
                if fps is None:
                    kept.append(_resize_crop(frame.to_ndarray(format="rgb24"), height, width))
                    if len(kept) == num_frames:
                        break
                    continue
                t = frame.time if frame.time is not None else (i / src_fps if src_fps else float(i))
                t0 = t if t0 is None else t0
                # Each target time k/fps takes the nearest decoded frame: once a frame lands at or past the
                # target, the nearer of it and the previous frame wins.
                while len(kept) < num_frames and t >= t0 + len(kept) / fps - 1e-9:
                    target = t0 + len(kept) / fps
                    pick = frame if prev is None or abs(t - target) < abs(prev[0] - target) else prev[1]
                    kept.append(_resize_crop(pick.to_ndarray(format="rgb24"), height, width))
                if len(kept) == num_frames:
                    break
                prev = (t, frame)
            if fps is not None and prev is not None and len(kept) < num_frames:
                # The last frame serves the targets until it ends: its own duration when the container
                # gives one (a GIF merges identical frames into one long frame), else half a source frame.
                tol = 0.5 / src_fps if src_fps else 0.0
                last = prev[1]
                if last.duration and last.time_base:
                    tol = max(tol, float(last.duration * last.time_base) - 1e-6)
                while len(kept) < num_frames and t0 + len(kept) / fps <= prev[0] + tol:
                    kept.append(_resize_crop(prev[1].to_ndarray(format="rgb24"), height, width))
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError, RuntimeError) as e:
        raise VideoReadError(path, f"cannot decode ({type(e).__name__}: {e})") from None
    if not kept:
        raise VideoReadError(path, "no decodable video frames")
    if len(kept) < num_frames:
        if short == "pad":
            kept.extend([kept[-1]] * (num_frames - len(kept)))
        else:
            what = f"at {fps:g} fps" if fps else "at the source rate"
            raise VideoReadError(path, f"only {len(kept)} of {num_frames} frames {what}", kind="too_short")
    return np.stack(kept)


def to_model_input(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` -> float32 ``[3, F, H, W]`` in [-1, 1]."""
    x = np.asarray(frames, np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)))


# ---------------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------------


class VideoFolder:
    """Random access to the clips of a ``captions.jsonl`` folder at one resolution and frame count.

    ``folder[i]`` -> ``{"video": float32 [3, F, H, W] in [-1, 1], "text": str, "source": relative path,
    "index": entry index}`` or raises :class:`VideoReadError`; :meth:`get` returns None instead (warning and
    counting), and iteration yields only the readable entries. ``short='pad'`` repeats the last frame of a
    clip that is too short instead of skipping it.
    """

    def __init__(self, root: str | os.PathLike, *, height: int, width: int, num_frames: int,
                 fps: float | None = None, short: Literal["skip", "pad"] = "skip"):
        if short not in ("skip", "pad"):
            raise ValueError(f"short must be 'skip' or 'pad', got {short!r}")
        self.root = Path(root)
        self.height, self.width, self.num_frames, self.fps, self.short = height, width, num_frames, fps, short
        self.stats = ReadStats()
        #: entry index -> ``"corrupt: reason"`` / ``"too_short: reason"`` for every clip :meth:`get` skipped.
        self.failures: dict[int, str] = {}
        self.entries: list[CaptionEntry] = []
        self.missing: list[CaptionEntry] = []  # listed in captions.jsonl, file absent
        for e in read_captions(self.root):
            if e.path.is_file():
                self.entries.append(e)
            else:
                self.missing.append(e)
                self.stats.missing += 1
                log.warning("%s line %d: video %s does not exist; entry left out", self.root / CAPTIONS_FILE,
                            e.line, e.path)
        if not self.entries:
            raise DatasetNotFoundError(f"none of the videos listed in {self.root / CAPTIONS_FILE} exist")

    @classmethod
    def from_config(cls, root: str | os.PathLike, cfg, **kw) -> "VideoFolder":
        """Resolution, frame count and frame rate from ``cfg.video``."""
        v = cfg.video
        return cls(root, height=v.height, width=v.width, num_frames=v.num_frames, fps=v.fps, **kw)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        frames = decode_clip(e.path, num_frames=self.num_frames, height=self.height, width=self.width, fps=self.fps,
                             short=self.short)
        self.stats.read += 1
        return {"video": to_model_input(frames), "text": e.text, "source": e.rel, "index": e.index}

    def get(self, i: int) -> dict | None:
        """``self[i]``, or None (with a warning, counted in :attr:`stats`) for an unreadable or short clip."""
        try:
            return self[i]
        except VideoReadError as err:
            if err.kind == "too_short":
                self.stats.too_short += 1
            else:
                self.stats.corrupt += 1
            self.failures[self.entries[i].index] = f"{err.kind}: {err.reason}"
            log.warning("skipping %s (line %d of %s): %s", err.path, self.entries[i].line, CAPTIONS_FILE, err.reason)
            return None

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            item = self.get(i)
            if item is not None:
                yield item


__all__ = [
    "CAPTIONS_FILE", "CaptionEntry", "ReadStats", "VideoFolder", "VideoReadError",
    "DatasetError", "DatasetNotFoundError", "decode_clip", "read_captions", "to_model_input",
]
