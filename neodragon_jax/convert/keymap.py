"""Declarative PyTorch <-> JAX key maps, shared by checkpoint import and the PyTorch mirror export.

A :class:`KeyMap` is an ordered list of :class:`Entry`: one official PyTorch state-dict key, the dotted
path of the NNX parameter it fills, and the layout transform between them. Tied copies of a tensor (T5's
``shared`` / ``embed_tokens``) are ``aliases`` of one entry; deterministic buffers stored in checkpoints
(the MMDiT's sin-cos table) are ``derived`` entries that are checked on import and written on export.

The same map runs in both directions, so a JAX -> PyTorch -> JAX round trip is bit-identical by
construction (every layout transform is a pure axis permutation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

# Layout name -> permutation from the PyTorch layout to the JAX layout.
_LAYOUTS: dict[str, tuple[int, ...] | None] = {
    "identity": None,
    "linear": (1, 0),  # [out, in] -> [in, out]
    "conv1d": (2, 1, 0),  # [O, I, K] -> [K, I, O]
    "conv2d": (2, 3, 1, 0),  # [O, I, H, W] -> [H, W, I, O]
    "conv3d": (2, 3, 4, 1, 0),  # [O, I, D, H, W] -> [D, H, W, I, O]
}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, component: str, missing=(), unexpected=(), misshaped=(), unfilled=(), mismatched=()):
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        self.unfilled, self.mismatched = list(unfilled), list(mismatched)
        lines = [f"checkpoint for {component!r} does not match the model:"]

        def block(title, items, fmt=str):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {fmt(i)}" for i in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")

        block("missing keys (the model needs them, the checkpoint lacks them)", self.missing)
        block("unexpected keys (in the checkpoint, unknown to the model)", self.unexpected)
        block(
            "mis-shaped keys",
            self.misshaped,
            lambda m: f"{m[0]}: checkpoint {tuple(m[1])}, model expects {tuple(m[2])}",
        )
        block("model parameters no key fills (key map incomplete)", self.unfilled)
        block("tied or derived tensors that disagree", self.mismatched)
        lines.append(
            "  Check that the folder holds this component's official checkpoint and that the config "
            "(layer count, widths, context embedder) matches it."
        )
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Entry:
    torch_key: str
    jax_path: str | None  # None for derived buffers that have no parameter
    layout: str = "identity"
    aliases: tuple[str, ...] = ()
    derive: Callable[[], np.ndarray] | None = None  # deterministic buffer value (PyTorch layout)
    derived_atol: float = 1e-3

    def __post_init__(self):
        if self.layout not in _LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r} for {self.torch_key}; expected {sorted(_LAYOUTS)}")
        if (self.jax_path is None) != (self.derive is not None):
            raise ValueError(f"{self.torch_key}: an entry has either a jax_path or a derive function")

    @property
    def torch_keys(self) -> tuple[str, ...]:
        return (self.torch_key,) + self.aliases


def to_jax_layout(x: np.ndarray, layout: str) -> np.ndarray:
    perm = _LAYOUTS[layout]
    return x if perm is None else np.transpose(x, perm)


def to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
    perm = _LAYOUTS[layout]
    return x if perm is None else np.transpose(x, np.argsort(perm))


def torch_shape(jax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    perm = _LAYOUTS[layout]
    if perm is None:
        return tuple(jax_shape)
    inv = np.argsort(perm)
    return tuple(jax_shape[i] for i in inv)


@dataclass(frozen=True)
class KeyMap:
    """``entries`` map keys one to one. ``other_parts``: key prefixes of the checkpoint that belong to other
    parts of the same file (a frozen VAE encoder read from a whole ``causal_video_vae`` checkpoint leaves its
    ``decoder.`` keys to the decoder): they are left alone on import instead of being refused as unexpected;
    every key outside the entries and those prefixes still is."""

    component: str
    entries: tuple[Entry, ...]
    other_parts: tuple[str, ...] = ()

    def __post_init__(self):
        seen_t, seen_j = set(), set()
        for e in self.entries:
            for k in e.torch_keys:
                if k in seen_t:
                    raise ValueError(f"key map {self.component}: torch key {k} listed twice")
                seen_t.add(k)
            if e.jax_path is not None:
                if e.jax_path in seen_j:
                    raise ValueError(f"key map {self.component}: jax path {e.jax_path} listed twice")
                seen_j.add(e.jax_path)

    def torch_keys(self) -> set[str]:
        return {k for e in self.entries for k in e.torch_keys}

    def jax_paths(self) -> set[str]:
        return {e.jax_path for e in self.entries if e.jax_path is not None}

    def prefixed(self, torch_prefix: str = "", jax_prefix: str = "", component: str | None = None) -> "KeyMap":
        """The same map nested under prefixes (a sub-model inside a larger checkpoint or module)."""

        def jp(p):
            return None if p is None else f"{jax_prefix}{p}"

        return KeyMap(
            component or self.component,
            tuple(
                dataclasses.replace(
                    e,
                    torch_key=f"{torch_prefix}{e.torch_key}",
                    jax_path=jp(e.jax_path),
                    aliases=tuple(f"{torch_prefix}{a}" for a in e.aliases),
                )
                for e in self.entries
            ),
            tuple(f"{torch_prefix}{p}" for p in self.other_parts),
        )

    def __add__(self, other: "KeyMap") -> "KeyMap":
        return KeyMap(self.component, self.entries + other.entries, self.other_parts + other.other_parts)

    # ---- import: torch tensors -> jax arrays -------------------------------------------------------
    def to_jax(
        self,
        tensors: Mapping[str, np.ndarray],
        expected_shapes: Mapping[str, tuple[int, ...]],
    ) -> dict[str, np.ndarray]:
        """Strictly convert a PyTorch state dict into ``{jax_path: array}``.

        ``expected_shapes`` are the model's parameter shapes by dotted path. Raises
        :class:`CheckpointMismatchError` listing every problem at once.
        """
        missing, misshaped, mismatched = [], [], []
        out: dict[str, np.ndarray] = {}
        used = set()
        for e in self.entries:
            if e.torch_key not in tensors:
                missing.append(e.torch_key)
                continue
            used.add(e.torch_key)
            value = np.asarray(tensors[e.torch_key])
            for alias in e.aliases:
                if alias in tensors:
                    used.add(alias)
                    other = np.asarray(tensors[alias])
                    if other.shape != value.shape or not np.array_equal(other, value):
                        mismatched.append(f"{alias} differs from its tied tensor {e.torch_key}")
            if e.jax_path is None:
                expected = e.derive()
                if value.shape != expected.shape:
                    misshaped.append((e.torch_key, value.shape, expected.shape))
                elif not np.allclose(value.astype(np.float32), expected, atol=e.derived_atol, rtol=0):
                    err = float(np.max(np.abs(value.astype(np.float32) - expected)))
                    mismatched.append(f"{e.torch_key} (derived buffer) differs from ours by {err:.3g}")
                continue
            want = expected_shapes.get(e.jax_path)
            if want is None:
                # A map entry the model does not have: reported as an unexpected key.
                used.discard(e.torch_key)
                continue
            converted = to_jax_layout(value, e.layout)
            if tuple(converted.shape) != tuple(want):
                misshaped.append((e.torch_key, value.shape, torch_shape(tuple(want), e.layout)))
                continue
            out[e.jax_path] = converted
        unexpected = sorted(k for k in set(tensors) - used if not k.startswith(self.other_parts))
        unfilled = sorted(set(expected_shapes) - self.jax_paths())
        if missing or unexpected or misshaped or unfilled or mismatched:
            raise CheckpointMismatchError(
                self.component, sorted(missing), unexpected, misshaped, unfilled, mismatched
            )
        return out

    # ---- export: jax arrays -> torch tensors -------------------------------------------------------
    def to_torch(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{jax_path: array}`` -> PyTorch state dict (numpy), aliases and derived buffers included."""
        missing = sorted(self.jax_paths() - set(arrays))
        unexpected = sorted(set(arrays) - self.jax_paths())
        if missing or unexpected:
            raise CheckpointMismatchError(self.component, missing=missing, unexpected=unexpected)
        out: dict[str, np.ndarray] = {}
        for e in self.entries:
            value = e.derive() if e.jax_path is None else to_torch_layout(np.asarray(arrays[e.jax_path]), e.layout)
            value = np.ascontiguousarray(value)
            for k in e.torch_keys:
                out[k] = value
        return out

    def torch_shapes(self, jax_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The PyTorch state-dict shapes implied by the model's parameter shapes (no allocation)."""
        out = {}
        for e in self.entries:
            shape = tuple(e.derive().shape) if e.jax_path is None else torch_shape(tuple(jax_shapes[e.jax_path]), e.layout)
            for k in e.torch_keys:
                out[k] = shape
        return out


def entries_for_linear(torch_prefix: str, jax_prefix: str, *, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{torch_prefix}.weight", f"{jax_prefix}.kernel", "linear")]
    if bias:
        out.append(Entry(f"{torch_prefix}.bias", f"{jax_prefix}.bias"))
    return out


def entries_for_conv(torch_prefix: str, jax_prefix: str, *, dims: int, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{torch_prefix}.weight", f"{jax_prefix}.kernel", f"conv{dims}d")]
    if bias:
        out.append(Entry(f"{torch_prefix}.bias", f"{jax_prefix}.bias"))
    return out


def entries_for_norm(torch_prefix: str, jax_prefix: str, *, bias: bool = True, jax_scale: str = "scale") -> list[Entry]:
    """LayerNorm/GroupNorm: torch ``weight``/``bias`` -> NNX ``scale``/``bias`` (or ``weight`` for RMSNorm)."""
    out = [Entry(f"{torch_prefix}.weight", f"{jax_prefix}.{jax_scale}")]
    if bias:
        out.append(Entry(f"{torch_prefix}.bias", f"{jax_prefix}.bias"))
    return out


def concat(component: str, parts: Iterable[Iterable[Entry]]) -> KeyMap:
    return KeyMap(component, tuple(e for part in parts for e in part))
