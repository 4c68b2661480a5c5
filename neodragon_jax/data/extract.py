"""Pre-extraction of training features from a video folder (as Pyramid Flow trains): VAE latents + text.

For every readable entry of a :class:`~neodragon_jax.data.video_folder.VideoFolder`:

* ``latents`` float32 ``[C, T, h, w]``: a posterior sample of the causal VAE (key ``fold_in(key(seed),
  entry index)``, so a record does not depend on batching or on interruptions), normalised for the DiT
  (``normalize_latents``);
* ``text_tokens`` float32 ``[S, D]``, ``text_mask`` int32 ``[S]``, ``pooled`` float32 ``[P]``: the text
  conditioner's output for the caption (plus ``prompt_modifier``, empty by default).

Cache layout (``records/`` is what the training engine's ``NpzRecords`` reads, keys as the flow-matching
loss expects them)::

    out_dir/manifest.json        config hash + readable config, per-entry source / done / skipped, counters
    out_dir/records/000000.npz   one record per entry, named by the entry's index in captions.jsonl
    out_dir/null_text.npz        null_text_tokens [1, S, D], null_text_mask [1, S], null_pooled [1, P]:
                                 the empty prompt, encoded once (CFG text dropout)

``null_in_records=True`` also copies the null features into every record (``null_text_tokens [S, D]``,
``null_text_mask [S]``, ``null_pooled [P]``), for engines that only see per-example records; it costs one
extra text-feature copy per record.

Resuming: records are written atomically (temporary file + rename) and the manifest is written before the
first record, so a record file in a cache whose manifest hash matches is complete and valid; a rerun skips
those and entries already found unreadable (fix them and pass ``overwrite=True`` to retry), and does only the
rest. A cache made with another configuration (models, weights, resolution, seed, captions) is refused with
the differing keys named, unless ``overwrite=True``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.data.video_folder import VideoFolder
from neodragon_jax.models.vae.causal_vae import DiagonalGaussian
from neodragon_jax.models.vae.normalize import normalize_latents

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORDS = "records"
NULL_TEXT = "null_text.npz"
RECORD_KEYS = ("latents", "text_tokens", "text_mask", "pooled")
NULL_KEYS = ("null_text_tokens", "null_text_mask", "null_pooled")
#: The manifest is rewritten at most this often while extracting (records themselves are the ground truth).
_FLUSH_SECONDS = 10.0


class CacheMismatchError(ValueError):
    """The output folder holds a cache made with a different configuration."""


@dataclass
class ExtractResult:
    out_dir: Path
    total: int          # entries listed in captions.jsonl
    done: int           # records in the cache now
    processed: int      # records written by this call
    skipped: int        # entries unreadable (missing, corrupt, too short), over all runs
    seconds: float

    @property
    def records_dir(self) -> Path:
        return self.out_dir / RECORDS


# ---------------------------------------------------------------------------------------------------------
# Configuration identity
# ---------------------------------------------------------------------------------------------------------


def weights_fingerprint(module: nnx.Module) -> str:
    """Short hash of a module's parameters: per leaf its path, shape, float64 sum and sum of |x|, and 64
    evenly spaced values, all at 6 significant digits (stable across machines, yet any real change of the
    weights changes it). Leaves are copied to the host one at a time."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param)):
        x = np.asarray(jax.device_get(leaf)).astype(np.float64).ravel()
        picks = x[np.linspace(0, x.size - 1, min(64, x.size)).astype(np.int64)] if x.size else x
        values = [x.sum(), np.abs(x).sum(), *picks]
        h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}".encode())
        h.update(",".join(f"{float(v):.6g}" for v in values).encode())
    return h.hexdigest()[:16]


def _entries_digest(folder: VideoFolder) -> str:
    h = hashlib.sha256()
    for e in sorted(folder.entries + folder.missing, key=lambda e: e.index):
        h.update(json.dumps([e.index, e.rel, e.text]).encode())
    return h.hexdigest()[:16]


def _identity(folder: VideoFolder, cfg, vae, text, seed: int, prompt_modifier: str, null_in_records: bool) -> dict:
    return {
        "format": FORMAT_VERSION,
        "vae": dataclasses.asdict(cfg.model.vae),
        "text": dataclasses.asdict(cfg.model.text),
        "precision": dataclasses.asdict(cfg.precision),
        "video": {"height": folder.height, "width": folder.width, "num_frames": folder.num_frames,
                  "fps": folder.fps, "short": folder.short},
        "seed": int(seed),
        "prompt_modifier": prompt_modifier,
        "null_in_records": bool(null_in_records),
        "vae_weights": weights_fingerprint(vae),
        "text_weights": weights_fingerprint(text),
        "captions": _entries_digest(folder),
    }


def _hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def _save_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def record_name(index: int) -> str:
    return f"{RECORDS}/{index:06d}.npz"


def load_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(out_dir)!r}: not an extraction cache")
    return json.loads(path.read_text())


def load_null_text(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{null_text_tokens [1, S, D], null_text_mask [1, S], null_pooled [1, P]}`` of a cache."""
    path = Path(out_dir) / NULL_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the extraction first")
    with np.load(path) as z:
        return {k: z[k] for k in NULL_KEYS}


# ---------------------------------------------------------------------------------------------------------
# Jitted encoders
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _video_encoder(graphdef, vae_cfg):
    """Jitted ``(state, video [B,3,F,H,W], entry indices [B], base key) -> normalised latents [B,C,T,h,w]``;
    cached per model structure so repeated extractions reuse the compiled program."""

    def encode(state, video, indices, base_key):
        post = nnx.merge(graphdef, state).encode(video)
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)
        z = jax.vmap(lambda m, lv, k: DiagonalGaussian(m[None], lv[None]).sample(k)[0])(post.mean, post.logvar, keys)
        return normalize_latents(z, vae_cfg).astype(jnp.float32)

    return jax.jit(encode)


@functools.lru_cache(maxsize=8)
def _text_encoder(graphdef):
    def encode(state, t5_ids, t5_mask, clip_l_ids, clip_g_ids):
        tokens, mask, pooled = nnx.merge(graphdef, state)(t5_ids, t5_mask, clip_l_ids, clip_g_ids)
        return tokens.astype(jnp.float32), mask.astype(jnp.int32), pooled.astype(jnp.float32)

    return jax.jit(encode)


class _Encoders:
    """The jitted VAE and text encoders bound to their weights (weights are arguments, never constants)."""

    def __init__(self, cfg, vae: nnx.Module, text: nnx.Module, tokenizers, seed: int):
        self.tokenizers = tokenizers
        vae_graph, self.vae_state = nnx.split(vae)
        text_graph, self.text_state = nnx.split(text)
        self._video = _video_encoder(vae_graph, cfg.model.vae)
        self._text = _text_encoder(text_graph)
        self.base_key = jax.random.key(seed)

    def video(self, videos: np.ndarray, indices: np.ndarray) -> np.ndarray:
        out = self._video(self.vae_state, jnp.asarray(videos), jnp.asarray(indices, jnp.uint32), self.base_key)
        return np.asarray(out)

    def text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tok = self.tokenizers(prompts)
        ids = (tok.t5_ids, tok.t5_mask, tok.clip_l_ids, tok.clip_g_ids)
        return tuple(np.asarray(o) for o in self._text(self.text_state, *(jnp.asarray(a) for a in ids)))


def _pad(items: list, n: int) -> list:
    """Repeat the last item so every batch has the compiled shape."""
    return items + [items[-1]] * (n - len(items))


# ---------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------


def extract(
    folder: VideoFolder | str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg,
    *,
    vae: nnx.Module,
    text: nnx.Module,
    tokenizers=None,
    seed: int = 0,
    batch_size: int = 1,
    prompt_modifier: str = "",
    null_in_records: bool = False,
    overwrite: bool = False,
    on_record: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Encode every readable entry of ``folder`` into the cache ``out_dir`` (see the module docstring).

    ``folder``: a :class:`VideoFolder`, or a path opened at ``cfg.video``'s resolution, frames and fps.
    ``vae``: a ``CausalVideoVAE`` (only its encoder runs); ``text``: a ``TextConditioner``; ``tokenizers``:
    default ``TextTokenizers.for_config(cfg.model.text)``. ``on_record(entry_index, record)`` is called after
    each record is on disk (progress hooks; raising from it interrupts the run cleanly, and a rerun resumes).
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(folder, VideoFolder):
        folder = VideoFolder.from_config(folder, cfg)
    if tokenizers is None:
        from neodragon_jax.models.text.tokenizers import TextTokenizers

        tokenizers = TextTokenizers.for_config(cfg.model.text)
    out = Path(out_dir)
    identity = _identity(folder, cfg, vae, text, seed, prompt_modifier, null_in_records)
    config_hash = _hash(identity)
    manifest = _open_manifest(out, folder, identity, config_hash, overwrite)
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    rows = {r["index"]: r for r in manifest["records"]}
    for r in rows.values():  # a record on disk under a matching manifest is complete (atomic writes)
        if not r["done"] and not r["skipped"] and (out / record_name(r["index"])).is_file():
            r["done"], r["record"] = True, record_name(r["index"])
    enc = _Encoders(cfg, vae, text, tokenizers, seed)
    if not (out / NULL_TEXT).is_file():
        null = enc.text([""] * batch_size)  # the batch shape the captions compile for; keep one row
        _save_npz(out / NULL_TEXT, {k: v[:1] for k, v in zip(NULL_KEYS, null)})
    per_record_null = {k: v[0] for k, v in load_null_text(out).items()} if null_in_records else {}

    position = {e.index: i for i, e in enumerate(folder.entries)}
    pending = [e.index for e in folder.entries if not rows[e.index]["done"] and not rows[e.index]["skipped"]]
    processed = 0
    last_flush = time.monotonic()

    def flush():
        _summarise(manifest)
        _save_json(out / MANIFEST, manifest)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(folder.entries), initial=len(folder.entries) - len(pending), desc="extracting",
               unit="video", disable=not progress, dynamic_ncols=True)
    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    pool = concurrent.futures.ThreadPoolExecutor(1)  # decode the next batch while this one encodes
    load = lambda batch: [(idx, folder.get(position[idx])) for idx in batch]  # noqa: E731
    try:
        future = pool.submit(load, batches[0]) if batches else None
        for b in range(len(batches)):
            loaded = future.result()
            future = pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
            good = [(idx, item) for idx, item in loaded if item is not None]
            for idx, item in loaded:
                if item is None:
                    rows[idx]["skipped"] = folder.failures.get(idx, "corrupt: unreadable")
                    bar.update(1)
            if good:
                idxs = [idx for idx, _ in good]
                videos = np.stack(_pad([item["video"] for _, item in good], batch_size))
                latents = enc.video(videos, np.asarray(_pad(idxs, batch_size)))
                tokens, mask, pooled = enc.text(_pad([_prompt(item["text"], prompt_modifier) for _, item in good],
                                                     batch_size))
                for j, idx in enumerate(idxs):
                    record = {"latents": latents[j], "text_tokens": tokens[j], "text_mask": mask[j],
                              "pooled": pooled[j], **per_record_null}
                    _save_npz(out / record_name(idx), record)
                    rows[idx]["done"], rows[idx]["record"] = True, record_name(idx)
                    processed += 1
                    bar.update(1)
                    if on_record is not None:
                        on_record(idx, record)
            if time.monotonic() - last_flush > _FLUSH_SECONDS:
                flush()
                last_flush = time.monotonic()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        flush()
    return ExtractResult(out, manifest["total"], manifest["count"], processed,
                         sum(manifest["stats"][k] for k in ("missing", "corrupt", "too_short")),
                         time.perf_counter() - t_start)


def _summarise(manifest: dict) -> None:
    """``count`` and ``stats`` (records and skipped entries by reason) from the per-entry rows."""
    rows = manifest["records"]
    manifest["count"] = sum(r["done"] for r in rows)
    stats = {"records": manifest["count"], "missing": 0, "corrupt": 0, "too_short": 0}
    for r in rows:
        if r["skipped"]:
            kind = r["skipped"].split(":", 1)[0]
            stats[kind if kind in stats else "corrupt"] += 1
    manifest["stats"] = stats


def _prompt(text: str, modifier: str) -> str:
    return text + modifier if text else text


def _open_manifest(out: Path, folder: VideoFolder, identity: dict, config_hash: str, overwrite: bool) -> dict:
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("config_hash") == config_hash and not overwrite:
            return old
        if not overwrite:
            # Through JSON, as the manifest stored it: a tuple in the identity equals the list read back.
            keys = _diff_keys(old.get("config", {}), json.loads(json.dumps(identity))) or ["(format)"]
            raise CacheMismatchError(
                f"{out} holds a cache made with a different configuration (differs in: {', '.join(keys)}). "
                "Pass overwrite=True to replace it, or choose another output folder."
            )
    elif (out / RECORDS).exists() and any((out / RECORDS).iterdir()) and not overwrite:
        raise CacheMismatchError(f"{out / RECORDS} has records but {path} is missing: pass overwrite=True to "
                                 "replace them, or choose another output folder")
    if overwrite:
        shutil.rmtree(out / RECORDS, ignore_errors=True)
        for name in (MANIFEST, NULL_TEXT):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    missing = {e.index for e in folder.missing}
    manifest = {
        "format": FORMAT_VERSION,
        "config_hash": config_hash,
        "config": identity,
        "source": str(folder.root.resolve()),
        "total": len(folder.entries) + len(folder.missing),
        "count": 0,
        "keys": list(RECORD_KEYS),
        "null_text": NULL_TEXT,
        "stats": {"records": 0, "missing": 0, "corrupt": 0, "too_short": 0},
        "records": [
            {"index": e.index, "source": e.rel, "text": e.text, "record": None, "done": False,
             "skipped": "missing: file not found" if e.index in missing else None}
            for e in sorted(folder.entries + folder.missing, key=lambda e: e.index)
        ],
    }
    _summarise(manifest)
    _save_json(path, manifest)  # before any record: records on disk always belong to this hash
    return manifest


__all__ = [
    "CacheMismatchError", "ExtractResult", "MANIFEST", "NULL_KEYS", "NULL_TEXT", "RECORDS", "RECORD_KEYS",
    "extract", "load_manifest", "load_null_text", "record_name", "weights_fingerprint",
]
