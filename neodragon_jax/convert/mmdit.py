"""Official PyTorch state-dict names of the pyramidal MMDiT (spec §9.1 / §9.2) <-> our NNX parameter paths.

The map is a function of the config: layer count, the last block's ``context_pre_only`` layout and the
optional teacher ``context_embedder`` follow it. Names are identity except two ModuleList indices:
``attn.to_out.0`` -> ``attn.to_out`` and ``ff.net.0.proj`` / ``ff.net.2`` -> ``ff.proj_in`` / ``ff.proj_out``.
The checkpoint's ``pos_embed.pos_embed`` buffer is a derived entry: checked against our sin-cos table on
import (to bf16 precision, the format of the official file) and written on export.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from neodragon_jax.config.schema import MMDiTConfig
from neodragon_jax.convert.io import load_state_dict, read_safetensors
from neodragon_jax.convert.keymap import Entry, KeyMap, entries_for_conv, entries_for_linear
from neodragon_jax.layers.embeddings import sincos_2d_table

# The official file stores the table in bf16: half an ulp of bf16 on values in [-1, 1] is 2^-9.
POS_EMBED_ATOL = 2.0**-8


def pos_embed_table(cfg: MMDiTConfig) -> np.ndarray:
    """The ``pos_embed.pos_embed`` buffer ``[1, G*G, D]`` float32 for ``cfg``."""
    return sincos_2d_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)


def pos_embed_shape(cfg: MMDiTConfig) -> tuple[int, int, int]:
    return (1, cfg.pos_embed_max_size**2, cfg.hidden_size)


def _block_entries(i: int, last: bool) -> list[Entry]:
    t = j = f"transformer_blocks.{i}"
    out: list[Entry] = []
    out += entries_for_linear(f"{t}.norm1.linear", f"{j}.norm1.linear")
    out += entries_for_linear(f"{t}.norm1_context.linear", f"{j}.norm1_context.linear")
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        out += entries_for_linear(f"{t}.attn.{name}", f"{j}.attn.{name}")
    for name in ("norm_q", "norm_k", "norm_add_q", "norm_add_k"):
        out.append(Entry(f"{t}.attn.{name}.weight", f"{j}.attn.{name}.weight"))
    out += entries_for_linear(f"{t}.attn.to_out.0", f"{j}.attn.to_out")
    streams = ["ff"] if last else ["ff", "ff_context"]
    if not last:
        out += entries_for_linear(f"{t}.attn.to_add_out", f"{j}.attn.to_add_out")
    for ff in streams:
        out += entries_for_linear(f"{t}.{ff}.net.0.proj", f"{j}.{ff}.proj_in")
        out += entries_for_linear(f"{t}.{ff}.net.2", f"{j}.{ff}.proj_out")
    return out


def mmdit_keymap(cfg: MMDiTConfig) -> KeyMap:
    """Key map of :class:`~neodragon_jax.models.mmdit.PyramidMMDiT` for ``cfg`` (585 keys for 18 blocks
    without context embedder, 779 for the 24-block teacher with one)."""
    entries: list[Entry] = []
    entries += entries_for_conv("pos_embed.proj", "pos_embed.proj", dims=2)
    entries.append(
        Entry("pos_embed.pos_embed", None, derive=lambda: pos_embed_table(cfg), derived_atol=POS_EMBED_ATOL)
    )
    for emb in ("timestep_embedder", "text_embedder"):
        for lin in ("linear_1", "linear_2"):
            p = f"time_text_embed.{emb}.{lin}"
            entries += entries_for_linear(p, p)
    if cfg.context_in_dim:
        entries += entries_for_linear("context_embedder", "context_embedder")
    for i in range(cfg.num_layers):
        entries += _block_entries(i, last=(i == cfg.num_layers - 1))
    entries += entries_for_linear("norm_out.linear", "norm_out.linear")
    entries += entries_for_linear("proj_out", "proj_out")
    return KeyMap("mmdit", tuple(entries))


def infer_mmdit_config(tensors: Mapping[str, np.ndarray], base: MMDiTConfig | None = None) -> MMDiTConfig:
    """``base`` with the block count and context embedder read off an official state dict."""
    import dataclasses

    base = base or MMDiTConfig()
    blocks = {int(k.split(".")[1]) for k in tensors if k.startswith("transformer_blocks.")}
    if not blocks:
        raise ValueError("no transformer_blocks.* keys: this is not a pyramidal MMDiT state dict")
    ce = tensors.get("context_embedder.weight")
    n = max(blocks) + 1
    # A pruned model's block provenance (from our config.json) survives when it fits the block count.
    kept = tuple(base.teacher_block_indices) if len(base.teacher_block_indices) == n else ()
    return dataclasses.replace(
        base,
        num_layers=n,
        context_in_dim=None if ce is None else int(np.shape(ce)[1]),
        teacher_block_indices=kept,
    )


def load_mmdit_weights(model, source: str | os.PathLike | Mapping[str, np.ndarray]) -> None:
    """Strictly load official weights (a safetensors file / folder, or a state dict) into ``model`` in place.

    Works on an abstract model (:func:`~neodragon_jax.models.mmdit.abstract_mmdit`) too, so a full-size
    model is never initialised randomly first. Raises ``CheckpointMismatchError`` listing every problem.
    """
    tensors = source if isinstance(source, Mapping) else read_safetensors(source)
    load_state_dict(model, tensors, mmdit_keymap(model.cfg))


def mmdit_from_checkpoint(
    cfg: MMDiTConfig,
    source: str | os.PathLike | Mapping[str, np.ndarray],
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
):
    """Build ``PyramidMMDiT(cfg)`` abstractly and fill it from ``source`` (no random init)."""
    from neodragon_jax.models.mmdit import abstract_mmdit

    model = abstract_mmdit(cfg, dtype=dtype, param_dtype=param_dtype)
    load_mmdit_weights(model, source)
    return model
