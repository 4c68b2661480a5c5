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


class CheckpointReadError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupted, not safetensors); names the file."""


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
            try:
                shards = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointReadError(
                    f"{idx}: not a valid sharded-checkpoint index ({type(err).__name__}: {err}); expected JSON with "
                    f'a "weight_map" of tensor name -> shard file. It may be truncated: download it again'
                ) from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointNotFoundError(f"{idx} names shard files that are missing: {missing}")
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


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The file(s) a safetensors checkpoint path stands for (a file, or a folder: plain or sharded)."""
    return _safetensor_files(Path(path))


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Cheap integrity check of one safetensors file: header readable and the file as long as it says.

    Reads only the header (a few kB), so a truncated or corrupted download is named before minutes of
    loading the other components. Raises :class:`CheckpointReadError` naming the file.
    """
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> CheckpointReadError:
        return CheckpointReadError(
            f"{path}: not a readable safetensors file ({why}); it is probably truncated or corrupted: download "
            f"or export it again"
        )

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > 100 * 2**20:
            raise bad(f"header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as err:
            raise bad(f"header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise bad("header entries lack data_offsets") from None
    if 8 + n + end != size:
        raise bad(f"the header describes {8 + n + end} bytes, the file has {size}")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file or folder as numpy (bf16 via ml_dtypes).

    A missing file raises :class:`CheckpointNotFoundError`, an unreadable one :class:`CheckpointReadError`;
    both name the file.
    """
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in _safetensor_files(Path(path)):
        check_safetensors_file(f)
        try:
            out.update(load_file(str(f)))
        except Exception as err:  # noqa: BLE001 - SafetensorError and friends carry no file name
            raise CheckpointReadError(
                f"{f}: cannot read this safetensors file ({type(err).__name__}: {err}); it is probably truncated "
                f"or corrupted: download or export it again"
            ) from None
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
