"""Checks that a sharded tree really is sharded: per-device bytes, and large tensors left replicated.

Works on concrete arrays and on ``ShapeDtypeStruct`` trees plus a matching tree of shardings, so planning a
full-size model (abstract only) can use the same check as the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


class ShardingCheckError(AssertionError):
    """Too much of a tree stays replicated for the rule set it was sharded with."""


@dataclass(frozen=True)
class LeafSharding:
    path: str
    shape: tuple[int, ...]
    spec: str
    global_bytes: int
    device_bytes: int

    @property
    def num_shards(self) -> int:
        return max(1, self.global_bytes // max(1, self.device_bytes))


@dataclass
class ShardingReport:
    leaves: list[LeafSharding] = field(default_factory=list)

    @property
    def global_bytes(self) -> int:
        return sum(leaf.global_bytes for leaf in self.leaves)

    @property
    def device_bytes(self) -> int:
        """Bytes one device holds (the largest shard of each leaf)."""
        return sum(leaf.device_bytes for leaf in self.leaves)

    def replicated(self, min_bytes: int = 0) -> list[LeafSharding]:
        return [l for l in self.leaves if l.num_shards == 1 and l.global_bytes >= min_bytes]

    def table(self, limit: int = 20) -> str:
        rows = sorted(self.leaves, key=lambda l: -l.device_bytes)[:limit]
        return "\n".join(
            f"  {l.path}: {l.shape} spec={l.spec} global={l.global_bytes} per-device={l.device_bytes}" for l in rows
        )


def _bytes(shape, dtype) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def sharding_report(tree: Any, shardings: Any | None = None) -> ShardingReport:
    """Per-leaf global vs per-device bytes. ``shardings`` defaults to each leaf's own ``.sharding``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if shardings is None:
        shard_leaves = [getattr(x, "sharding", None) for _, x in leaves]
    else:
        shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(shard_leaves) != len(leaves):
            raise ValueError(f"{len(leaves)} leaves but {len(shard_leaves)} shardings: the trees do not match")
    report = ShardingReport()
    for (path, x), sharding in zip(leaves, shard_leaves):
        shape = tuple(x.shape)
        if sharding is None:
            raise ValueError(f"{_path_str(path)} has no sharding; pass a shardings tree")
        shard_shape = sharding.shard_shape(shape)
        spec = str(sharding.spec) if isinstance(sharding, NamedSharding) else str(sharding)
        report.leaves.append(
            LeafSharding(_path_str(path), shape, spec, _bytes(shape, x.dtype), _bytes(shard_shape, x.dtype))
        )
    return report


def check_sharded(
    tree: Any,
    shardings: Any | None = None,
    *,
    min_bytes: int = 1 << 20,
    min_shards: int = 2,
    max_replicated_fraction: float = 0.05,
) -> ShardingReport:
    """Raise :class:`ShardingCheckError` if large leaves stay replicated.

    Every leaf of at least ``min_bytes`` must be split into at least ``min_shards`` pieces, and fully
    replicated leaves may hold at most ``max_replicated_fraction`` of all bytes.
    """
    report = sharding_report(tree, shardings)
    under = [l for l in report.leaves if l.global_bytes >= min_bytes and l.num_shards < min_shards]
    replicated_bytes = sum(l.global_bytes for l in report.replicated())
    fraction = replicated_bytes / max(1, report.global_bytes)
    problems = []
    if under:
        problems.append(
            f"{len(under)} leaves of >= {min_bytes} bytes are split into fewer than {min_shards} shards:\n"
            + "\n".join(f"  {l.path}: {l.shape} spec={l.spec} ({l.num_shards} shard)" for l in under[:30])
        )
    if fraction > max_replicated_fraction:
        problems.append(
            f"{fraction:.1%} of {report.global_bytes} bytes are fully replicated (limit "
            f"{max_replicated_fraction:.1%}); largest leaves:\n{report.table()}"
        )
    if problems:
        raise ShardingCheckError(
            "sharding check failed (is the rule set right and are the weights annotated with logical_axes?):\n"
            + "\n".join(problems)
        )
    return report
