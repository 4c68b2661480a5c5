"""Deterministic, per-host sharded, checkpointable input pipeline feeding global batches.

``grain`` is not installable in this environment, so this is the equivalent index-based design: a random
access ``RecordSource`` (synthetic examples from the stage, or pre-extracted ``.npz`` records of latents +
text features), and an :class:`IndexSampler` that maps a global sample position to a record index
(a fresh seeded permutation per epoch). The iterator's whole state is ``{"samples_seen": n, ...}``, a small
JSON stored in every checkpoint; batch ``k`` is a pure function of ``(seed, k)``, so a resumed run sees the
same data as an uninterrupted one. Each host loads only its slice of the global batch
(``jax.make_array_from_process_local_data`` assembles the global array).
"""

from __future__ import annotations

import concurrent.futures
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
    def _stack(files: list[Path]) -> dict[str, np.ndarray]:
        first = None
        arrays: dict[str, np.ndarray] = {}
        for i, f in enumerate(files):
            with np.load(f) as z:
                rec = {k: z[k] for k in z.files}
            if first is None:
                first = {k: (v.shape, v.dtype) for k, v in rec.items()}
                arrays = {k: np.empty((len(files), *shape), dtype) for k, (shape, dtype) in first.items()}
            got = {k: (v.shape, v.dtype) for k, v in rec.items()}
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
        return {k: v[index] for k, v in self.arrays.items()}


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


class DataIterator:
    """Yields this host's slice of successive global batches; ``get_state``/``set_state`` are JSON dicts."""

    def __init__(self, source: RecordSource, keys, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None, prefetch: int = 2):
        self.source = source
        self.keys = list(keys)
        self.global_batch = global_batch
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise ValueError(f"train.global_batch={global_batch} must divide evenly over {self.process_count} hosts")
        self.local_batch = global_batch // self.process_count
        self.sampler = IndexSampler(len(source), seed=seed, shuffle=shuffle)
        self.seed, self.shuffle = seed, shuffle
        self.samples_seen = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch > 0 else None
        self._prefetch = prefetch
        self._pending: dict[int, concurrent.futures.Future] = {}

    def _load(self, start: int) -> dict[str, np.ndarray]:
        local_start = start + self.process_index * self.local_batch
        idx = self.sampler.indices(local_start, self.local_batch)
        examples = [self.source[int(i)] for i in idx]
        missing = [k for k in self.keys if k not in examples[0]]
        if missing:
            raise KeyError(f"records lack the fields {missing} the stage needs (they have {sorted(examples[0])})")
        return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in self.keys}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.samples_seen
        fut = self._pending.pop(start, None)
        batch = fut.result() if fut is not None else self._load(start)
        self.samples_seen += self.global_batch
        if self._pool is not None:
            for k in range(self._prefetch):
                s = self.samples_seen + k * self.global_batch
                if s not in self._pending:
                    self._pending[s] = self._pool.submit(self._load, s)
        return batch

    def get_state(self) -> dict:
        return {"samples_seen": self.samples_seen, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.source), "global_batch": self.global_batch}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("num_records") not in (None, len(self.source)):
            log.warning("data source size changed since the checkpoint (%s -> %d); positions map differently",
                        state.get("num_records"), len(self.source))
        if state.get("seed", self.seed) != self.seed:
            log.warning("data.seed changed since the checkpoint (%s -> %d)", state.get("seed"), self.seed)
        self.samples_seen = int(state["samples_seen"])
        self._pending.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def to_global(local_batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any], global_batch: int) -> dict:
    """Assemble the global, sharded batch from each host's local rows."""
    out = {}
    for k, x in local_batch.items():
        out[k] = jax.make_array_from_process_local_data(shardings[k], x, (global_batch,) + x.shape[1:])
    return out
