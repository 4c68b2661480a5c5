"""A folder of generated evaluation videos, keyed by everything that decides their pixels.

Several evaluations score the same pipeline on the same held-out prompts and seeds (the recipe's pruning and DMD
evaluations both score the teacher at its schedule on the same 96 prompts). Generation is deterministic given the
weights, the config, the prompt's token ids, the seed, the steps and the guidance, so a video generated once can be
read back instead of generated again. The key hashes all of those (every weight array's bytes, not a file name or
a release label), plus the JAX version and backend, so a changed weight, setting or tokenizer is a miss, never a
stale hit.

Each entry is one ``.npz`` (frames, NFE, the timings of the run that generated it), written atomically; a
damaged entry is regenerated. The timings stay those of the original generation: a cached video reports the
time it took to make, not the time to read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _hash_state(h, module) -> None:
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(module))
    for path, leaf in leaves:
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())


def pipeline_digest(pipe) -> str:
    """Hash of a ``TextToVideoPipeline``'s weights (text encoders, MMDiT, VAE), config and runtime."""
    import jax

    from neodragon_jax.config import to_json

    h = hashlib.sha256()
    h.update(to_json(pipe.cfg).encode())
    h.update(f"jax {jax.__version__} {jax.default_backend()}".encode())
    for name in ("text", "mmdit", "vae"):
        h.update(name.encode())
        _hash_state(h, getattr(pipe, name))
    return h.hexdigest()


@dataclass(frozen=True)
class CachedVideo:
    frames: np.ndarray       # uint8 [F, H, W, 3]
    nfe: int
    seconds: float           # wall time of the generation that made it
    denoise_seconds: float


class VideoCache:
    """``get`` / ``put`` generated videos under ``folder`` for one pipeline (``for_pipeline``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self._pipe_digest: tuple[object, str] | None = None

    def _digest(self, pipe) -> str:
        # One pipeline is asked for many videos in a row: hash its weights once per pipeline object. The object
        # itself is held (not its id, which a later pipeline may reuse once this one is freed).
        if self._pipe_digest is None or self._pipe_digest[0] is not pipe:
            self._pipe_digest = (pipe, pipeline_digest(pipe))
        return self._pipe_digest[1]

    def key(self, pipe, request) -> str:
        # the token ids stand for the tokenizers (and the unconditional branch's: "" or the negative prompt)
        tok = pipe.tokenizers([pipe.full_prompt(request.prompt), request.negative_prompt or ""])
        ids = [np.asarray(a).tolist() for a in (tok.t5_ids, tok.t5_mask, tok.clip_l_ids, tok.clip_g_ids)]
        fields = {"pipeline": self._digest(pipe), "tokens": ids, "prompt": request.prompt, "seed": request.seed,
                  "num_frames": request.num_frames, "first": request.first_unit_steps,
                  "later": request.later_unit_steps, "cfg": request.cfg_scales, "negative": request.negative_prompt}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, key: str) -> CachedVideo | None:
        p = self._path(key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            with np.load(p) as z:
                v = CachedVideo(z["frames"], int(z["nfe"]), float(z["seconds"]), float(z["denoise_seconds"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            self.misses += 1  # a damaged entry (a killed writer cannot leave one; a disk error can): regenerate
            return None
        self.hits += 1
        return v

    def put(self, key: str, video: CachedVideo) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, frames=video.frames, nfe=video.nfe, seconds=video.seconds,
                         denoise_seconds=video.denoise_seconds)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


__all__ = ["CachedVideo", "VideoCache", "pipeline_digest"]
