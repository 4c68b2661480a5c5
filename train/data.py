"""Deterministic, per-host sharded, checkpointable input pipelines on grain, feeding global batches.

Sources are random access (``len`` + ``[i]``): synthetic examples from the stage, pre-extracted ``.npz``
latent records (:class:`NpzRecords`), video clips (:class:`VideoClips`; the ``vae`` stage's decoded-once
``train.vae.ClipCache``), prompt corpora (:class:`PromptCorpus`). The pipeline (:func:`local_batches`) is
a ``grain.MapDataset`` over global sample positions: position ``p`` is record ``IndexSampler`` maps it to
(a fresh seeded permutation per epoch), positions are batched by the host's share of the global batch and
host ``h`` of ``H`` takes every ``H``-th batch from ``h``, so global batch ``k`` is a pure function of
``(seed, k)`` and each host reads only its rows (``jax.make_array_from_process_local_data`` assembles the
global array). :class:`DataIterator` reads it with grain's prefetching iterator; its state (grain's own
position plus the pipeline's identity) is a small JSON stored as the ``data_iter`` item of every Orbax
checkpoint, so a resumed run sees the same batches as an uninterrupted one.

Unreadable inputs are counted, never fatal: a video folder's missing, undecodable or short files are
skipped and counted in ``VideoFolder.stats`` (``data/videos_read``, ``data/videos_corrupt``, ...), as the
``vae`` stage's clip cache does when it decodes a folder once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Protocol

import jax
import numpy as np

log = logging.getLogger(__name__)


class RecordSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, np.ndarray]: ...


class SyntheticSource:
    """``stage.make_example(cfg, i)`` for ``i < stage.num_examples(cfg)``."""

    def __init__(self, stage, cfg):
        self.stage, self.cfg = stage, cfg
        self.n = int(stage.num_examples(cfg))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.stage.make_example(self.cfg, int(index))


class NpzRecords:
    """Pre-extracted records: a folder of ``*.npz`` files (one example each, sorted by name), or one ``.npz``
    whose arrays all have the examples on axis 0 (loaded once). ``in_memory`` reads a folder's records once
    into stacked arrays (every record must have the same fields and shapes)."""

    def __init__(self, path: str | Path, *, in_memory: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise FileNotFoundError(f"no *.npz records in {self.path}")
            self.arrays = None
            if in_memory:
                self.arrays = self._stack(self.files)
                self.files = None
        elif self.path.suffix == ".npz" and self.path.is_file():
            with np.load(self.path) as z:
                self.arrays = {k: z[k] for k in z.files}
            sizes = {k: v.shape[0] for k, v in self.arrays.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"{self.path}: arrays disagree on the number of records (axis 0): {sizes}")
            self.files = None
        else:
            raise FileNotFoundError(f"data.path {str(self.path)!r} is neither a folder of .npz records nor a .npz file")

    @staticmethod
    def _layout(v: np.ndarray):
        # A string field (the caption) has a per-record width (<U47, <U50): its kind is its layout.
        return (v.shape, v.dtype.kind if v.dtype.kind in "US" else v.dtype)

    @classmethod
    def _stack(cls, files: list[Path]) -> dict[str, np.ndarray]:
        first = None
        arrays: dict[str, np.ndarray] = {}
        for i, f in enumerate(files):
            with np.load(f) as z:
                rec = {k: z[k] for k in z.files}
            if first is None:
                first = {k: cls._layout(v) for k, v in rec.items()}
                arrays = {k: np.empty((len(files), *v.shape), object if v.dtype.kind in "US" else v.dtype)
                          for k, v in rec.items()}
            got = {k: cls._layout(v) for k, v in rec.items()}
            if got != first:
                raise ValueError(f"{f}: fields {got} differ from {files[0].name}'s {first}; data.in_memory needs "
                                 "records of one layout (re-extract them, or set data.in_memory=false)")
            for k, v in rec.items():
                arrays[k][i] = v
        log.info("loaded %d records into memory (%.1f MB)", len(files),
                 sum(a.nbytes for a in arrays.values()) / 1e6)
        return arrays

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else next(iter(self.arrays.values())).shape[0]

    def __getitem__(self, index: int):
        if self.files is not None:
            with np.load(self.files[index]) as z:
                return {k: z[k] for k in z.files}
        return {k: np.asarray(v[index]) if v.dtype == object else v[index] for k, v in self.arrays.items()}


def write_npz_records(folder: str | Path, examples) -> Path:
    """Write examples (dicts of arrays) as ``folder/000000.npz`` ...; the format :class:`NpzRecords` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, ex in enumerate(examples):
        np.savez(folder / f"{i:06d}.npz", **ex)
    return folder


def make_source(stage, cfg) -> RecordSource:
    if cfg.data.source == "synthetic":
        if not callable(getattr(stage, "make_example", None)):
            raise ValueError(f"stage {stage.name!r} has no synthetic data; set data.source='records' and data.path")
        return SyntheticSource(stage, cfg)
    if not cfg.data.path:
        raise ValueError("data.source='records' needs data.path (a folder of .npz records or one .npz file)")
    return NpzRecords(cfg.data.path, in_memory=cfg.data.in_memory)


class IndexSampler:
    """Global sample position ``p`` -> record index: epoch ``p // N`` uses permutation ``rng(seed, epoch)``."""

    def __init__(self, num_records: int, *, seed: int = 0, shuffle: bool = True):
        if num_records < 1:
            raise ValueError("the data source is empty")
        self.n, self.seed, self.shuffle = num_records, seed, shuffle
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            )
        return self._perm_cache[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        pos = np.arange(start, start + count)
        return np.array([self._perm(int(p // self.n))[int(p % self.n)] for p in pos], dtype=np.int64)


class VideoClips:
    """Clips of a video folder decoded on access (``VideoFolder`` at ``cfg.video``): ``{"video" [3, F, H, W],
    "text"}``. An unreadable file is skipped for the next readable one (so positions stay deterministic) and
    counted in ``stats`` exactly as ``VideoFolder`` counts it."""

    def __init__(self, root: str | Path, cfg):
        from neodragon_jax.data.video_folder import VideoFolder

        self.folder = VideoFolder.from_config(root, cfg)
        self.stats = self.folder.stats

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        n = len(self.folder)
        for k in range(n):
            item = self.folder.get((int(index) + k) % n)
            if item is not None:
                return {"video": item["video"], "text": np.asarray(item["text"])}
        from neodragon_jax.data.video_folder import DatasetError

        raise DatasetError(f"no readable video in {self.folder.root} ({self.stats.as_dict()})")


class PromptCorpus:
    """Prompts, one per example ``{"text": str array}``: a ``captions.jsonl`` (its ``text`` fields), a folder
    holding one, or a text file with one prompt per line (blank lines ignored)."""

    def __init__(self, path: str | Path):
        import json

        path = Path(path)
        if path.is_dir():
            path = path / "captions.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"prompt corpus {str(path)!r} not found (a captions.jsonl, a folder with one, "
                                    f"or a .txt of one prompt per line)")
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        texts.append(str(json.loads(line)["text"]))
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{i}: not a {{'text': ...}} JSON line ({e})") from None
        else:
            texts = [t.strip() for t in path.read_text().splitlines() if t.strip()]
        if not texts:
            raise ValueError(f"prompt corpus {path} is empty")
        self.path, self.texts = path, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int):
        return {"text": np.asarray(self.texts[int(index)])}


def _fields(example: Mapping[str, Any], keys: list[str]) -> dict[str, np.ndarray]:
    missing = [k for k in keys if k not in example]
    if missing:
        raise KeyError(f"records lack the fields {missing} the stage needs (they have {sorted(example)})")
    return {k: np.asarray(example[k]) for k in keys}


#: Positions a pipeline can reach (2**40 samples: no run gets near it; grain datasets need a length).
MAX_POSITIONS = 1 << 40


def local_batches(source: RecordSource, keys, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1):
    """The grain ``MapDataset`` whose item ``k`` is host ``process_index``'s rows of global batch ``k``."""
    import grain

    if global_batch % process_count:
        raise ValueError(f"train.global_batch={global_batch} must divide evenly over {process_count} hosts")
    local = global_batch // process_count
    sampler = IndexSampler(len(source), seed=seed, shuffle=shuffle)
    keys = list(keys)

    def example(position: int) -> dict[str, np.ndarray]:
        return _fields(source[int(sampler.indices(int(position), 1)[0])], keys)

    ds = grain.MapDataset.range(0, MAX_POSITIONS - MAX_POSITIONS % global_batch).map(example).batch(local)
    return ds[process_index::process_count]


class DataIterator:
    """Yields this host's slice of successive global batches (a grain pipeline, :func:`local_batches`);
    ``get_state``/``set_state`` are JSON dicts (the checkpoint's ``data_iter`` item)."""

    def __init__(self, source: RecordSource, keys, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None, prefetch: int = 2):
        import grain

        self.source = source
        self.keys = list(keys)
        self.global_batch = global_batch
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.dataset = local_batches(source, self.keys, global_batch, seed=seed, shuffle=shuffle,
                                     process_index=self.process_index, process_count=self.process_count)
        self.local_batch = global_batch // self.process_count
        self.seed, self.shuffle = seed, shuffle
        # prefetch = batches read ahead by grain's threads (0: read each batch when asked, in this thread).
        self._options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0,
                                          prefetch_buffer_size=max(0, prefetch) * self.local_batch)
        self._it = None
        self._start = 0  # batches already consumed when the grain iterator is (re)created

    def _iterator(self):
        if self._it is None:
            self._it = self.dataset.to_iter_dataset(self._options).__iter__()
            if self._start:
                self._it.set_state({"next_index": self._start})
        return self._it

    @property
    def samples_seen(self) -> int:
        it = self._it
        index = it.get_state()["next_index"] if it is not None else self._start
        return int(index) * self.global_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator())

    def get_state(self) -> dict:
        state = {"samples_seen": self.samples_seen, "seed": self.seed, "shuffle": self.shuffle,
                 "num_records": len(self.source), "global_batch": self.global_batch}
        if self._it is not None:
            state["grain"] = self._it.get_state()
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("num_records") not in (None, len(self.source)):
            log.warning("data source size changed since the checkpoint (%s -> %d); positions map differently",
                        state.get("num_records"), len(self.source))
        if state.get("seed", self.seed) != self.seed:
            log.warning("data.seed changed since the checkpoint (%s -> %d)", state.get("seed"), self.seed)
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ValueError(f"the checkpoint's data position is in batches of {state['global_batch']}, this run "
                             f"reads batches of {self.global_batch} (train.global_batch)")
        # Checkpoints written before the grain pipeline hold only samples_seen: the same position.
        grain_state = state.get("grain") or {"next_index": int(state["samples_seen"]) // self.global_batch}
        self.close()
        self._start = int(grain_state["next_index"])

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None:
            self._start = int(it.get_state()["next_index"])
            closer = getattr(it, "close", None)
            if callable(closer):
                closer()


def to_global(local_batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any], global_batch: int) -> dict:
    """Assemble the global, sharded batch from each host's local rows."""
    out = {}
    for k, x in local_batch.items():
        out[k] = jax.make_array_from_process_local_data(shardings[k], x, (global_batch,) + x.shape[1:])
    return out
