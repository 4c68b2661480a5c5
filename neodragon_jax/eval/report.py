"""Markdown reports with PNG contact sheets (what ``neodragon demo`` writes as ``report.md``).

:class:`MarkdownReport` collects headings, paragraphs, tables, images and code blocks and writes one
``.md`` file; images are PNGs beside it, linked by relative path so the folder can be moved or viewed on a
code host. :func:`labelled_sheet` lays videos out one per row (evenly spaced frames, upscaled with nearest
neighbour so 64x64 frames stay legible) with a text label above each row; :func:`score_table` puts
several :class:`~neodragon_jax.eval.scorer.ScoreReport` side by side, one column each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

_LABEL_HEIGHT = 14
_GAP = 2


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; floats get 3 decimals, None / NaN print as ``-``.

    ``align``: one character per column, ``l`` or ``r`` (default: left for the first column, right after).
    """
    n = len(header)
    if any(len(r) != n for r in rows):
        raise ValueError(f"every row needs {n} cells (the header has {n}); got row lengths {[len(r) for r in rows]}")
    align = align or ("l" + "r" * (n - 1))
    if len(align) != n or set(align) - {"l", "r"}:
        raise ValueError(f"align must be {n} characters of 'l'/'r', got {align!r}")
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def score_table(reports: Mapping[str, object], attributes: Sequence[str] | None = None) -> str:
    """Per-attribute accuracy of several score reports (columns, in ``reports`` order), then
    ``all correct`` and the number of videos. An attribute a report did not judge prints ``-``."""
    if not reports:
        raise ValueError("no score reports to tabulate")
    names = list(reports)
    if attributes is None:
        attributes = []
        for r in reports.values():
            attributes += [a for a in r.accuracy if a not in attributes]
    rows = [[a] + [reports[n].accuracy.get(a) for n in names] for a in attributes]
    rows.append(["all correct"] + [reports[n].all_correct for n in names])
    rows.append(["videos"] + [reports[n].num_videos for n in names])
    return markdown_table(["attribute"] + names, rows)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def labelled_sheet(videos: Sequence[np.ndarray], labels: Sequence[str], *, frames_per_row: int = 9,
                   scale: int = 2, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """One row per video: ``frames_per_row`` evenly spaced frames of uint8 ``[F, H, W, 3]``, upscaled
    ``scale`` times (nearest), under its label. Videos may differ in frame count; frames must share H, W.
    Returns a uint8 image ``[rows * (label + H * scale + gap), columns * W * scale, 3]``."""
    from PIL import Image, ImageDraw

    if len(videos) != len(labels):
        raise ValueError(f"{len(videos)} videos but {len(labels)} labels")
    if not videos:
        raise ValueError("no videos for the sheet")
    shapes = {tuple(np.shape(v)[1:]) for v in videos}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"videos must be uint8 [F, H, W, 3] with one frame size, got frame shapes {sorted(shapes)}")
    h, w, _ = next(iter(shapes))
    cols = max(1, min(frames_per_row, max(len(v) for v in videos)))
    fh, fw = h * scale, w * scale
    row_h = _LABEL_HEIGHT + fh + _GAP
    sheet = Image.new("RGB", (cols * fw, len(videos) * row_h), background)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for r, (video, label) in enumerate(zip(videos, labels)):
        video = np.asarray(video, np.uint8)
        idx = np.linspace(0, len(video) - 1, min(cols, len(video))).round().astype(int)
        y = r * row_h
        draw.text((2, y + 1), str(label), fill=(0, 0, 0), font=font)
        for c, i in enumerate(idx):
            tile = np.repeat(np.repeat(video[i], scale, axis=0), scale, axis=1)
            sheet.paste(Image.fromarray(tile), (c * fw, y + _LABEL_HEIGHT))
    return np.asarray(sheet)


class MarkdownReport:
    """Build a Markdown document piece by piece; :meth:`image` writes the PNG next to the report."""

    def __init__(self, path: str | os.PathLike, title: str):
        self.path = Path(path)
        self.parts: list[str] = [f"# {title}"]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def heading(self, text: str, level: int = 2) -> "MarkdownReport":
        self.parts.append("#" * level + " " + text)
        return self

    def paragraph(self, text: str) -> "MarkdownReport":
        self.parts.append(text.strip())
        return self

    def bullets(self, items: Sequence[str]) -> "MarkdownReport":
        self.parts.append("\n".join(f"- {i}" for i in items))
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> "MarkdownReport":
        self.parts.append(markdown_table(header, rows, align))
        return self

    def raw(self, markdown: str) -> "MarkdownReport":
        self.parts.append(markdown.strip("\n"))
        return self

    def code(self, text: str, lang: str = "") -> "MarkdownReport":
        self.parts.append(f"```{lang}\n{text.rstrip()}\n```")
        return self

    def image(self, image: np.ndarray | str | os.PathLike, name: str, alt: str) -> "MarkdownReport":
        """Link a PNG: an array is written to ``<report folder>/<name>``; a path is linked as is (relative)."""
        if isinstance(image, np.ndarray):
            from neodragon_jax.data.video_io import write_png

            target = self.folder / name
            write_png(image, target)
        else:
            target = Path(image)
        rel = os.path.relpath(target, self.folder)
        self.parts.append(f"![{alt}]({Path(rel).as_posix()})")
        return self

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"

    def write(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(self.text(), encoding="utf-8")
        os.replace(tmp, self.path)
        return self.path


__all__ = ["MarkdownReport", "labelled_sheet", "markdown_table", "score_table"]
