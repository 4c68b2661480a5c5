"""Shipped releases: small models trained by this project, inside the package, in the official folder layout.

A release is a folder under ``neodragon_jax/_assets/releases/<name>/`` that holds exactly what an official
Pyramid Flow / Neodragon download holds (``tokenizer*/``, ``text_encoder*/``, ``diffusion_transformer_*/``,
``causal_video_vae/``, each with its ``config.json`` and safetensors) plus ``release.json``, the record of how
it was made::

    {"name": "tiny-teacher", "preset": "tiny-teacher", "transformer": "diffusion_transformer_320p",
     "config": {...},                     # the resolved config (video, pyramid, sampling, model, ...)
     "overrides": [...],                  # the overrides it was made with on top of the preset
     "storage_dtype": "float16",
     "made_by": {"command": ..., "commit": ..., "device": ..., "wall_time_s": ..., "clips_seen": ...},
     "scores": {...},                     # held-out accuracies beside their chance level, per schedule
     "files": {"relative/path": "sha256", ...}}

``neodragon generate PROMPT`` uses :data:`DEFAULT_RELEASE` when no checkpoint is given; ``--model NAME`` picks
another. The loader checks every file against the record's hashes, so weights and record cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

RELEASES_DIR = Path(__file__).resolve().parent / "_assets" / "releases"
RECORD = "release.json"
#: The first videos the release command generated and scored, to check a copy of the release against.
REFERENCE = "reference.npz"
DEFAULT_RELEASE = "neodragon-tiny"
#: The teacher the techniques distil by default (prune, synthesize, the recipe): a multi-step model with CFG.
DEFAULT_TEACHER = "tiny-teacher"


class ReleaseError(ValueError):
    """An unknown release, or a release folder whose files do not match its record."""


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    folder: Path
    record: dict[str, Any]

    @property
    def preset(self) -> str:
        return self.record["preset"]

    @property
    def transformer(self) -> str | None:
        return self.record.get("transformer")

    @property
    def overrides(self) -> tuple[str, ...]:
        return tuple(self.record.get("overrides", ()))

    def config(self, overrides: Sequence[str] = ()):
        """The release's config: the resolved config its record holds (``"config"``; for a record without
        one, its preset and recorded overrides), then ``overrides``; the model fields come from the folder's
        ``config.json`` files (a contradicting override is refused by the loader)."""
        from neodragon_jax.config import from_dict, load_config
        from neodragon_jax.config.loader import apply_overrides
        from neodragon_jax.pipelines.official import config_from_official_folder

        # The resolved config the release was made with (video, pyramid, sampling, ...); the preset and
        # overrides for a record without one.
        cfg = from_dict(self.record["config"]) if "config" in self.record else load_config(
            self.preset, list(self.overrides))
        cfg = config_from_official_folder(self.folder, cfg, transformer=self.transformer)
        return apply_overrides(cfg, overrides) if overrides else cfg

    def verify(self) -> None:
        """Every file the record lists exists with its recorded hash, and no weight file is unlisted."""
        files = self.record.get("files") or {}
        if not files:
            raise ReleaseError(f"{self.folder / RECORD} lists no files: the release is incomplete")
        bad = [rel for rel, digest in files.items()
               if not (self.folder / rel).is_file() or file_digest(self.folder / rel) != digest]
        unlisted = [str(p.relative_to(self.folder)) for p in sorted(self.folder.rglob("*.safetensors"))
                    if str(p.relative_to(self.folder)) not in files]
        if bad or unlisted:
            raise ReleaseError(
                f"release {self.name!r} at {self.folder} does not match its record: "
                + "; ".join(filter(None, [bad and f"changed or missing: {', '.join(bad)}",
                                          unlisted and f"not in the record: {', '.join(unlisted)}"]))
                + ". Reinstall the package, or rewrite the release with `neodragon release`")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def available_releases(root: Path | None = None) -> list[str]:
    root = root or RELEASES_DIR
    return sorted(p.name for p in root.iterdir() if (p / RECORD).is_file()) if root.is_dir() else []


def get_release(name: str, root: Path | None = None) -> Release:
    """The shipped release ``name`` (its record read, not yet verified)."""
    root = root or RELEASES_DIR
    folder = root / name
    if not (folder / RECORD).is_file():
        have = available_releases(root)
        raise ReleaseError(f"no release named {name!r}; shipped releases: {', '.join(have) or '(none)'}")
    try:
        record = json.loads((folder / RECORD).read_text())
    except ValueError as err:
        raise ReleaseError(f"{folder / RECORD} is not valid JSON ({err})") from None
    for key in ("name", "preset"):
        if key not in record:
            raise ReleaseError(f"{folder / RECORD} lacks {key!r}")
    return Release(name, folder, record)


__all__ = ["DEFAULT_RELEASE", "DEFAULT_TEACHER", "RECORD", "RELEASES_DIR", "Release", "ReleaseError", "available_releases",
           "file_digest", "get_release"]
