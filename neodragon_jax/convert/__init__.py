"""Declarative torch<->jax key maps and safetensors I/O."""

from neodragon_jax.convert.io import (
    CheckpointNotFoundError,
    CheckpointReadError,
    assign_params,
    export_state_dict,
    load_state_dict,
    param_arrays,
    param_count,
    param_shapes,
    read_safetensors,
    write_safetensors,
)
from neodragon_jax.convert.keymap import CheckpointMismatchError, Entry, KeyMap

__all__ = [
    "CheckpointMismatchError", "CheckpointNotFoundError", "CheckpointReadError", "Entry", "KeyMap", "assign_params",
    "export_state_dict", "load_state_dict", "param_arrays", "param_count", "param_shapes",
    "read_safetensors", "write_safetensors",
]
