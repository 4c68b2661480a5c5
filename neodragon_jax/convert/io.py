"""Checkpoint I/O: safetensors files and folders (sharded or not) <-> NNX parameter state.

Paths into NNX state are dotted strings (``transformer_blocks.3.attn.to_q.kernel``), the same strings the
key maps use.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.convert.keymap import KeyMap
from neodragon_jax.fsutil import chmod_like_open


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint file or folder is missing; the message names the path and the expected layout."""


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Dotted path -> ``nnx.Param`` variable for every parameter of ``model`` (concrete or abstract)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {path_str(p): v for p, v in flat}


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.get_value().shape) for k, v in param_variables(model).items()}


def param_count(model: nnx.Module) -> int:
    return int(sum(int(np.prod(s)) for s in param_shapes(model).values()))


def param_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v.get_value())) for k, v in param_variables(model).items()}


def assign_params(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` into the model's parameters in place, casting to each parameter's dtype."""
    variables = param_variables(model)
    unknown = sorted(set(arrays) - set(variables))
    if unknown:
        raise KeyError(f"no such parameters in the model: {unknown[:20]}")
    for path, value in arrays.items():
        var = variables[path]
        old = var.get_value()
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{path}: shape {tuple(value.shape)} does not match the parameter's {tuple(old.shape)}")
        var.set_value(jnp.asarray(value, dtype=old.dtype))


def load_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray], keymap: KeyMap) -> None:
    """Strict import: every checkpoint key used once, every parameter filled (or one error listing all)."""
    arrays = keymap.to_jax(tensors, param_shapes(model))
    assign_params(model, arrays)


def export_state_dict(model: nnx.Module, keymap: KeyMap) -> dict[str, np.ndarray]:
    return keymap.to_torch(param_arrays(model))


# ---- safetensors ------------------------------------------------------------------------------------

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def _safetensor_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"checkpoint path {str(path)!r} does not exist: expected a .safetensors file or a folder holding "
            f"one of {SAFETENSORS_NAMES} (or a sharded {INDEX_NAMES[0]} / {INDEX_NAMES[1]})"
        )
    for name in INDEX_NAMES:
        idx = path / name
        if idx.is_file():
            shards = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
            return [path / s for s in shards]
    for name in SAFETENSORS_NAMES:
        if (path / name).is_file():
            return [path / name]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return [path / found[0]]
    raise CheckpointNotFoundError(
        f"no safetensors checkpoint in {str(path)!r}: expected one of {SAFETENSORS_NAMES} or a sharded index "
        f"({', '.join(INDEX_NAMES)}); found {found or 'no .safetensors files'}"
    )


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file or folder as numpy (bf16 via ml_dtypes)."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in _safetensor_files(Path(path)):
        out.update(load_file(str(f)))
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Atomic write: a temporary file in the same folder renamed over the target."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        chmod_like_open(tmp)  # mkstemp (and save_file) leave 0600: others could not read the checkpoint
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
