"""Key maps and loaders for the text encoders (spec §9.3, §9.4; transformers' T5 / CLIP layouts).

Every key map is a function of the component's config, so layer counts and widths follow it:

* :func:`t5_encoder_keymap`: transformers ``T5EncoderModel`` (Pyramid Flow ``text_encoder_3``, T5-XXL);
  ``shared.weight`` with its tied alias ``encoder.embed_tokens.weight``.
* :func:`distil_t5_keymap`: the official DistilT5 ``T5EncoderWithProjection`` (``encoder.`` + the T5 map,
  ``final_projection.0`` / ``.3``).
* :func:`context_adapter_keymap`: the SkipMLP (``network_layers.{i}.1``, ``network_layers.{n}.0``).
* :func:`clip_text_keymap`: transformers ``CLIPTextModelWithProjection`` (``text_encoder``,
  ``text_encoder_2``). transformers 5.24 keeps ``text_model.embeddings.position_ids`` as a non-persistent
  buffer (never saved), so it is not in the map; files written by transformers < 4.31 may still carry it,
  and :func:`load_clip_text` checks that it is ``arange`` and drops it.

Loaders build the model abstractly (``nnx.eval_shape``), fill it straight from the checkpoint (fp16 / bf16
storage is cast to ``param_dtype``), so a T5-XXL is never randomly initialised first.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config.schema import (
    CLIPTextConfig,
    ContextAdapterConfig,
    DistilT5Config,
    T5Config,
    TextConfig,
)
from neodragon_jax.convert.io import CheckpointNotFoundError, param_shapes, param_variables, read_safetensors
from neodragon_jax.convert.keymap import (
    CheckpointMismatchError,
    Entry,
    KeyMap,
    entries_for_linear,
    entries_for_norm,
)

# ---- key maps ---------------------------------------------------------------------------------------


def t5_encoder_keymap(cfg: T5Config) -> KeyMap:
    """transformers ``T5EncoderModel`` state dict <-> :class:`~neodragon_jax.models.text.t5.T5Encoder`."""
    entries: list[Entry] = [Entry("shared.weight", "shared.embedding", aliases=("encoder.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        t, j = f"encoder.block.{i}.layer", f"block.{i}.layer"
        for name in ("q", "k", "v", "o"):
            entries += entries_for_linear(f"{t}.0.SelfAttention.{name}", f"{j}.0.SelfAttention.{name}", bias=False)
        if i == 0:
            entries.append(
                Entry(
                    f"{t}.0.SelfAttention.relative_attention_bias.weight",
                    f"{j}.0.SelfAttention.relative_attention_bias.embedding",
                )
            )
        entries += entries_for_norm(f"{t}.0.layer_norm", f"{j}.0.layer_norm", bias=False, jax_scale="weight")
        for name in ("wi_0", "wi_1", "wo"):
            entries += entries_for_linear(f"{t}.1.DenseReluDense.{name}", f"{j}.1.DenseReluDense.{name}", bias=False)
        entries += entries_for_norm(f"{t}.1.layer_norm", f"{j}.1.layer_norm", bias=False, jax_scale="weight")
    entries += entries_for_norm("encoder.final_layer_norm", "final_layer_norm", bias=False, jax_scale="weight")
    return KeyMap("t5_encoder", tuple(entries))


def distil_t5_keymap(cfg: DistilT5Config) -> KeyMap:
    """Official DistilT5 (``T5EncoderWithProjection``) <-> :class:`~neodragon_jax.models.text.distil_t5.DistilT5`."""
    body = t5_encoder_keymap(cfg.body).prefixed("encoder.", "encoder.", component="distil_t5")
    head = entries_for_linear("final_projection.0", "final_projection.layers.0", bias=False)
    head += entries_for_linear("final_projection.3", "final_projection.layers.3", bias=False)
    return body + KeyMap("distil_t5", tuple(head))


def context_adapter_keymap(cfg: ContextAdapterConfig) -> KeyMap:
    """Official SkipMLP context adapter <-> :class:`~neodragon_jax.models.text.context_adapter.ContextAdapter`."""
    n = cfg.num_hidden_layers
    entries: list[Entry] = []
    for i in range(n):
        entries += entries_for_linear(f"network_layers.{i}.1", f"network_layers.{i}")
    entries += entries_for_linear(f"network_layers.{n}.0", f"network_layers.{n}")
    return KeyMap("context_adapter", tuple(entries))


def clip_text_keymap(cfg: CLIPTextConfig) -> KeyMap:
    """transformers ``CLIPTextModelWithProjection`` <-> :class:`~neodragon_jax.models.text.clip.CLIPTextEncoder`."""
    e = "text_model.embeddings"
    entries: list[Entry] = [
        Entry(f"{e}.token_embedding.weight", f"{e}.token_embedding.embedding"),
        Entry(f"{e}.position_embedding.weight", f"{e}.position_embedding.embedding"),
    ]
    for i in range(cfg.num_layers):
        p = f"text_model.encoder.layers.{i}"
        entries += entries_for_norm(f"{p}.layer_norm1", f"{p}.layer_norm1")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            entries += entries_for_linear(f"{p}.self_attn.{name}", f"{p}.self_attn.{name}")
        entries += entries_for_norm(f"{p}.layer_norm2", f"{p}.layer_norm2")
        entries += entries_for_linear(f"{p}.mlp.fc1", f"{p}.mlp.fc1")
        entries += entries_for_linear(f"{p}.mlp.fc2", f"{p}.mlp.fc2")
    entries += entries_for_norm("text_model.final_layer_norm", "text_model.final_layer_norm")
    entries += entries_for_linear("text_projection", "text_projection", bias=False)
    return KeyMap("clip_text", tuple(entries))


CLIP_LEGACY_POSITION_IDS = "text_model.embeddings.position_ids"


def drop_legacy_clip_buffers(tensors: Mapping[str, np.ndarray], cfg: CLIPTextConfig) -> dict[str, np.ndarray]:
    """Remove a ``position_ids`` buffer (saved by transformers < 4.31) after checking it is ``arange``."""
    out = dict(tensors)
    ids = out.pop(CLIP_LEGACY_POSITION_IDS, None)
    if ids is not None:
        want = np.arange(cfg.max_position_embeddings)[None]
        ids = np.asarray(ids)
        if ids.shape != want.shape or not np.array_equal(ids, want):
            raise CheckpointMismatchError(
                "clip_text",
                mismatched=[f"{CLIP_LEGACY_POSITION_IDS} {ids.shape} is not arange({cfg.max_position_embeddings})"],
            )
    return out


# ---- loading ----------------------------------------------------------------------------------------


def fill_from_state_dict(
    ctor: Callable[[], nnx.Module], tensors: Mapping[str, np.ndarray], keymap: KeyMap, *, seed: int = 0
) -> nnx.Module:
    """Build ``ctor()`` without initialising its parameters and fill them strictly from ``tensors``.

    Parameters come from the checkpoint (cast to each parameter's dtype). The only other state the text
    models hold is dropout RNG streams: each gets a distinct key folded from ``seed`` and a zero counter.
    """
    model = nnx.eval_shape(ctor)
    arrays = keymap.to_jax(tensors, param_shapes(model))
    for path, var in param_variables(model).items():
        var.set_value(jnp.asarray(arrays[path], dtype=var.get_value().dtype))
    base = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))):
        abstract = var.get_value()
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(base, i))
        elif isinstance(var, nnx.RngCount):
            var.set_value(jnp.zeros(abstract.shape, abstract.dtype))
        else:
            raise TypeError(
                f"fill_from_state_dict: cannot materialise non-parameter state {path} ({type(var).__name__})"
            )
    return model


def _read(path: str | os.PathLike, component: str, layout: str) -> dict[str, np.ndarray]:
    try:
        return read_safetensors(path)
    except CheckpointNotFoundError as err:
        raise CheckpointNotFoundError(f"{component}: {err}. Expected layout: {layout}") from None


_T5_LAYOUT = (
    "a transformers T5EncoderModel folder (Pyramid Flow `text_encoder_3`): config.json plus model.safetensors, "
    "or model.safetensors.index.json with its shards"
)
_DT5_LAYOUT = (
    "the Neodragon DistilT5 folder (T5EncoderWithProjection): one .safetensors file with keys "
    "encoder.shared.weight, encoder.encoder.block.*, final_projection.{0,3}.weight"
)
_CA_LAYOUT = "the Neodragon context_adapter folder: one .safetensors file with keys network_layers.*"
_CLIP_LAYOUT = (
    "a transformers CLIPTextModelWithProjection folder (`text_encoder` / `text_encoder_2`): config.json plus "
    "model.safetensors (or a sharded model.safetensors.index.json)"
)


def load_t5_encoder(path, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0):
    from neodragon_jax.models.text.t5 import T5Encoder

    tensors = _read(path, "T5 encoder", _T5_LAYOUT)
    return fill_from_state_dict(
        lambda: T5Encoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)),
        tensors,
        t5_encoder_keymap(cfg),
        seed=seed,
    )


def load_distil_t5(path, cfg: DistilT5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0):
    from neodragon_jax.models.text.distil_t5 import DistilT5

    tensors = _read(path, "DistilT5", _DT5_LAYOUT)
    return fill_from_state_dict(
        lambda: DistilT5(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)),
        tensors,
        distil_t5_keymap(cfg),
        seed=seed,
    )


def load_context_adapter(
    path, cfg: ContextAdapterConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0
):
    from neodragon_jax.models.text.context_adapter import ContextAdapter

    tensors = _read(path, "ContextAdapter", _CA_LAYOUT)
    return fill_from_state_dict(
        lambda: ContextAdapter(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)),
        tensors,
        context_adapter_keymap(cfg),
        seed=seed,
    )


def load_clip_text(path, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0):
    from neodragon_jax.models.text.clip import CLIPTextEncoder

    tensors = drop_legacy_clip_buffers(_read(path, "CLIP text encoder", _CLIP_LAYOUT), cfg)
    return fill_from_state_dict(
        lambda: CLIPTextEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)),
        tensors,
        clip_text_keymap(cfg),
        seed=seed,
    )


def text_conditioner_keymaps(cfg: TextConfig) -> dict[str, KeyMap]:
    """Per-submodule key maps of a :class:`TextConditioner` (attribute name -> map of that checkpoint)."""
    maps = {"clip_l": clip_text_keymap(cfg.clip_l), "clip_g": clip_text_keymap(cfg.clip_g)}
    if cfg.kind == "teacher":
        maps["t5"] = t5_encoder_keymap(cfg.t5)
    else:
        maps["distil_t5"] = distil_t5_keymap(cfg.distil_t5)
        maps["context_adapter"] = context_adapter_keymap(cfg.context_adapter)
    return maps


def load_text_conditioner(
    cfg: TextConfig,
    *,
    clip_l,
    clip_g,
    t5=None,
    distil_t5=None,
    context_adapter=None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
):
    """A :class:`TextConditioner` filled from one checkpoint path per component.

    Teacher: ``clip_l`` (``text_encoder``), ``clip_g`` (``text_encoder_2``), ``t5`` (``text_encoder_3``).
    Neodragon: ``clip_l``, ``clip_g``, ``distil_t5``, ``context_adapter``.
    """
    from neodragon_jax.models.text.conditioner import TextConditioner

    paths = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5, "distil_t5": distil_t5, "context_adapter": context_adapter}
    maps = text_conditioner_keymaps(cfg)
    needed = sorted(maps)
    missing = [k for k in needed if paths[k] is None]
    extra = [k for k, v in paths.items() if v is not None and k not in maps]
    if missing or extra:
        raise ValueError(
            f"text conditioner kind {cfg.kind!r} needs checkpoint paths for {needed}; "
            f"missing {missing}, not used by this kind {extra}"
        )
    layouts = {"clip_l": _CLIP_LAYOUT, "clip_g": _CLIP_LAYOUT, "t5": _T5_LAYOUT, "distil_t5": _DT5_LAYOUT,
               "context_adapter": _CA_LAYOUT}
    tensors: dict[str, np.ndarray] = {}
    for name in needed:
        part = _read(paths[name], name, layouts[name])
        if name in ("clip_l", "clip_g"):
            part = drop_legacy_clip_buffers(part, getattr(cfg, name))
        tensors.update({f"{name}.{k}": v for k, v in part.items()})
    keymap = KeyMap(
        "text_conditioner",
        tuple(e for name in needed for e in maps[name].prefixed(f"{name}.", f"{name}.").entries),
    )
    return fill_from_state_dict(
        lambda: TextConditioner(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)),
        tensors,
        keymap,
        seed=seed,
    )
