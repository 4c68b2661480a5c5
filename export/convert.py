"""JAX <-> PyTorch mirror <-> official-layout folder, all through the SAME declarative key maps as import.

Per component (any of our JAX modules: MMDiT, VAE / encoder / decoders, text conditioner / T5 / DistilT5 /
ContextAdapter / CLIP):

- :func:`keymap_for` - the key map of a JAX module (``neodragon_jax.convert.*``, a function of its config);
- :func:`mirror_for` - an empty PyTorch mirror with the official state-dict keys for that module;
- :func:`torch_state_dict` - JAX parameters -> official PyTorch state dict (numpy, derived buffers included);
- :func:`to_mirror` - a mirror loaded strictly (``load_state_dict(strict=True)``) with the JAX weights;
- :func:`from_mirror` - a mirror (or any official state dict) -> JAX, strict (every key used once).

Whole pipelines:

- :func:`jax_to_official_folder` writes the official folder layout (``neodragon_jax/pipelines/official.py``):
  ``text_encoder/``, ``text_encoder_2/`` (CLIP), ``text_encoder_3/`` (DistilT5 or T5), ``context_adapter/``
  (Neodragon), ``diffusion_transformer_320p/``, ``causal_video_vae/``, ``tokenizer*/``; each component folder
  holds ``config.json`` and its safetensors file. The folder is assembled in a hidden sibling staging folder
  and renamed into place, and every file is itself written atomically (temporary file + rename).
- :func:`official_folder_to_jax` loads such a folder (ours or the official release) back into a
  :class:`~neodragon_jax.pipelines.text_to_video.TextToVideoPipeline`; :func:`config_from_official_folder`
  reads the architecture from the folder's ``config.json`` files.

Storage dtype: ``dtype=None`` keeps the parameters' dtype (bit-identical round trips); ``"official"`` uses the
release's dtypes (:data:`OFFICIAL_DTYPES`); ``"float32"`` / ``"bfloat16"`` / ``"float16"`` cast every tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from neodragon_jax.config.schema import (
    CLIPTextConfig,
    Config,
    ContextAdapterConfig,
    DistilT5Config,
    MMDiTConfig,
    T5Config,
    TextConfig,
    VAEConfig,
)
from neodragon_jax.convert.io import (
    assign_params,
    param_arrays,
    param_shapes,
    param_variables,
    read_safetensors,
    write_safetensors,
)
from neodragon_jax.convert.registry import component_kind, keymap_for  # noqa: F401 - re-exported
from neodragon_jax.fsutil import chmod_like_open
from neodragon_jax.pipelines.official import (  # noqa: F401 - re-exported: the reader lives beside the loader
    OURS,
    _from_plain,
    _read_json,
    config_from_official_folder,
)

# Folder names of the official layout.
TRANSFORMER_FOLDER = "diffusion_transformer_320p"
VAE_FOLDER = "causal_video_vae"
CONTEXT_ADAPTER_FOLDER = "context_adapter"
TEXT_FOLDERS = {
    "clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3", "distil_t5": "text_encoder_3",
}
TOKENIZER_FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
# Weight file names: diffusers-style components vs transformers-style ones.
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
# Storage dtypes of the official Neodragon release (spec §0 / §9): DiT bf16, CA fp32, DT5 fp16, VAE fp16.
OFFICIAL_DTYPES = {
    TRANSFORMER_FOLDER: "bfloat16",
    VAE_FOLDER: "float16",
    CONTEXT_ADAPTER_FOLDER: "float32",
    "text_encoder": "float16",
    "text_encoder_2": "float16",
    "text_encoder_3": "float16",
}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ---- per-component maps and mirrors -------------------------------------------------------------------------


# The key-map registry lives in the library (train/ loads official weights through it).
_kind = component_kind


def mirror_for(model: nnx.Module):
    """An (uninitialised) PyTorch mirror of ``model`` whose ``state_dict()`` has the official keys.

    Build under ``with torch.device("meta"):`` to get full-size shapes without allocating.
    """
    from export import mirror as m

    kind = _kind(model)
    cfg = model.cfg
    if kind == "mmdit":
        return m.PyramidMMDiT(cfg)
    if kind == "vae":
        return m.CausalVideoVAE(cfg, decoder=model.decoder_kind)
    if kind == "vae_encoder":
        return m.CausalVAEEncoder(cfg)
    if kind == "vae_native_decoder":
        return m.CausalVAEDecoder(cfg)
    if kind == "vae_light_decoder":
        return m.LightDecoder(cfg)
    if kind == "text":
        return m.TextConditioner(cfg)
    if kind == "distil_t5":
        return m.DistilT5(cfg)
    if kind == "context_adapter":
        return m.ContextAdapter(cfg)
    if kind == "t5":
        return m.t5_encoder(cfg)
    return m.clip_text(cfg)


def _cast(x: np.ndarray, dtype: str | None) -> np.ndarray:
    is_float = np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16
    if dtype is None or not is_float:
        return x
    if dtype not in _NP_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {sorted(_NP_DTYPES)} or None")
    return np.asarray(x).astype(_NP_DTYPES[dtype])


def torch_state_dict(model: nnx.Module, *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """JAX parameters -> the official PyTorch state dict (numpy arrays, PyTorch layouts, tied aliases and
    derived buffers included), optionally cast to a storage ``dtype``."""
    sd = keymap_for(model).to_torch(param_arrays(model))
    return {k: _cast(v, dtype) for k, v in sd.items()}


def _to_torch_tensor(x: np.ndarray):
    import torch

    x = np.require(x, requirements=["C", "W"])  # torch needs a writable buffer; copies only if it is not
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_mirror(make: Callable[[], Any], state: Mapping[str, Any], *, on_meta: bool = True):
    """``make()`` loaded strictly with ``state`` (torch tensors), in eval mode.

    ``on_meta``: build on the meta device and adopt the given tensors (``assign=True``), so a full-size mirror
    is never randomly initialised first; modules with ``reset_buffers()`` then recompute their non-checkpoint
    buffers. transformers models (text) are built normally.
    """
    import torch

    if on_meta:
        with torch.device("meta"):
            mirror = make()
        mirror.load_state_dict(state, strict=True, assign=True)
        for module in mirror.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
        left = [n for n, t in list(mirror.named_parameters()) + list(mirror.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"mirror tensors left on the meta device after loading: {left[:10]}")
    else:
        mirror = make()
        mirror.load_state_dict(state, strict=True)
    return mirror.eval()


def to_mirror(model: nnx.Module, *, dtype=None):
    """A PyTorch mirror of ``model`` loaded strictly with its weights (eval mode; ``dtype``: a torch dtype)."""
    state = {k: _to_torch_tensor(v) for k, v in torch_state_dict(model).items()}
    own_code = _kind(model) in ("mmdit", "vae", "vae_encoder", "vae_native_decoder", "vae_light_decoder")
    mirror = load_mirror(lambda: mirror_for(model), state, on_meta=own_code)
    if dtype is not None:
        mirror = mirror.to(dtype)
        for module in mirror.modules():  # deterministic float32 tables stay float32
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
    return mirror


def _materialise_rng_state(model: nnx.Module, seed: int) -> None:
    """Give abstract non-parameter state (dropout RNG streams) concrete values: distinct keys, zero counters."""
    base = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))):
        value = var.get_value()
        if not isinstance(value, jax.ShapeDtypeStruct):
            continue
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.fold_in(base, i))
        elif isinstance(var, nnx.RngCount):
            var.set_value(jnp.zeros(value.shape, value.dtype))
        else:
            raise TypeError(f"cannot materialise abstract non-parameter state {path} ({type(var).__name__})")


def from_mirror(source, target: nnx.Module | Callable[[], nnx.Module], *, seed: int = 0) -> nnx.Module:
    """Official weights -> JAX, strictly (one ``CheckpointMismatchError`` listing every problem).

    ``source``: a torch module (its ``state_dict()``) or a mapping of torch tensors / numpy arrays.
    ``target``: a JAX module (filled in place, concrete or abstract) or a zero-argument constructor (built
    abstractly with ``nnx.eval_shape``, so nothing is initialised randomly first).
    Values are cast to each parameter's dtype.
    """
    sd = source.state_dict() if hasattr(source, "state_dict") else source
    tensors = {k: (v if isinstance(v, np.ndarray) else _to_numpy(v)) for k, v in sd.items()}
    model = nnx.eval_shape(target) if callable(target) and not isinstance(target, nnx.Module) else target
    assign_params(model, keymap_for(model).to_jax(tensors, param_shapes(model)))
    _materialise_rng_state(model, seed)
    return model


def random_weights(model: nnx.Module, seed: int = 0, *, bias_scale: float = 0.2, norm_scale: float = 0.2) -> nnx.Module:
    """Fill every parameter of ``model`` (concrete or abstract) with random NON-ZERO values, in place.

    Kernels ``N(0, 1/fan_in)`` (so activations keep their scale), embeddings ``N(0, 1)``, biases
    ``N(0, bias_scale^2)``, norm scales ``1 + N(0, norm_scale^2)``. For parity checks and export dry runs:
    the from-scratch inits zero the AdaLN and output layers, which would hide most conversion bugs.
    """
    rng = np.random.default_rng(seed)
    for path, var in sorted(param_variables(model).items()):
        value = var.get_value()
        shape, dtype = tuple(value.shape), value.dtype
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "embedding":
            val = rng.standard_normal(shape)
        elif len(shape) >= 2:
            val = rng.standard_normal(shape) / np.sqrt(max(int(np.prod(shape[:-1])), 1))
        elif leaf == "bias":
            val = bias_scale * rng.standard_normal(shape)
        else:  # LayerNorm / GroupNorm scale, RMSNorm weight
            val = 1.0 + norm_scale * rng.standard_normal(shape)
        var.set_value(jnp.asarray(np.asarray(val, np.float32), dtype=dtype))
    _materialise_rng_state(model, seed)
    return model


# ---- config.json of each component ---------------------------------------------------------------------------


def _plain(obj) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def mmdit_config_json(cfg: MMDiTConfig) -> dict:
    """Official ``PyramidDiffusionMMDiT`` config fields (spec §9.2) plus our exact config."""
    return {
        "_class_name": "PyramidDiffusionMMDiT",
        "attention_head_dim": cfg.head_dim,
        "caption_projection_dim": cfg.hidden_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        # Neodragon has no context embedder: its text tokens already have the model width.
        "joint_attention_dim": cfg.context_in_dim or cfg.hidden_size,
        "use_context_embedder": bool(cfg.context_in_dim),
        "max_num_frames": cfg.max_num_frames,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "patch_size": cfg.patch_size,
        "pooled_projection_dim": cfg.pooled_dim,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "pos_embed_type": "sincos",
        "qk_norm": "rms_norm",
        "sample_size": cfg.sample_size,
        "use_temporal_causal": True,
        "use_flash_attn": False,
        OURS: _plain(cfg),
    }


def vae_config_json(cfg: VAEConfig, decoder: str) -> dict:
    """Pyramid Flow ``CausalVideoVAE`` config fields plus the light decoder's and our exact config."""
    c = cfg.causal
    n = len(c.block_out_channels)
    out = {
        "_class_name": "CausalVideoVAE",
        "encoder_in_channels": c.in_channels,
        "encoder_out_channels": c.latent_channels,
        "encoder_layers_per_block": [c.encoder_layers_per_block] * n,
        "encoder_down_block_types": ["DownEncoderBlockCausal3D"] * n,
        "encoder_block_out_channels": list(c.block_out_channels),
        "encoder_spatial_down_sample": list(c.spatial_down),
        "encoder_temporal_down_sample": list(c.temporal_down),
        "encoder_act_fn": "silu",
        "encoder_norm_num_groups": c.norm_groups,
        "encoder_double_z": True,
        "decoder_in_channels": c.latent_channels,
        "decoder_out_channels": c.in_channels,
        "decoder_layers_per_block": [c.decoder_layers_per_block] * n,
        "decoder_up_block_types": ["UpDecoderBlockCausal3D"] * n,
        "decoder_block_out_channels": list(c.block_out_channels),
        "decoder_spatial_up_sample": list(c.spatial_down),
        "decoder_temporal_up_sample": list(c.temporal_down),
        "decoder_act_fn": "silu",
        "decoder_norm_num_groups": c.norm_groups,
        "decoder_type": "causal_vae_conv" if decoder == "native" else "taehv",
        "add_post_quant_conv": True,
        "downsample_scale": c.spatial_factor,
        OURS: {"decoder": decoder, "vae": _plain(cfg)},
    }
    if decoder == "light":
        d = cfg.light_decoder
        out["light_decoder"] = {
            "latent_channels": d.latent_channels, "n_f": list(d.channels), "blocks_per_stage": d.blocks_per_stage,
            "decoder_time_upscale": list(d.temporal_upscale),
            "decoder_space_upscale": list(d.spatial_upscale),
        }
    return out


def _hf_json(hf_cfg, architecture: str, ours) -> dict:
    hf_cfg.architectures = [architecture]
    out = hf_cfg.to_dict()
    out[OURS] = _plain(ours)
    return out


# ---- writing the official folder ------------------------------------------------------------------------------


def _write_json(obj: Mapping, path: Path) -> None:
    """Atomic JSON write (temporary file in the same folder, renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        chmod_like_open(tmp)  # mkstemp makes 0600
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _folder_dtype(dtype: str | None, folder: str) -> str | None:
    return OFFICIAL_DTYPES.get(folder) if dtype == "official" else dtype


def _write_component(model: nnx.Module, folder: Path, weights: str, config: Mapping, dtype: str | None) -> None:
    write_safetensors(torch_state_dict(model, dtype=_folder_dtype(dtype, folder.name)), folder / weights,
                      metadata={"format": "pt"})
    _write_json(config, folder / "config.json")


@dataclasses.dataclass
class Components:
    """What an official folder holds: the text conditioner, the MMDiT, the VAE and (optionally) tokenizers."""

    text: nnx.Module
    mmdit: nnx.Module
    vae: nnx.Module
    tokenizers: Any = None

    @classmethod
    def of(cls, obj) -> "Components":
        if isinstance(obj, Components):
            return obj
        if isinstance(obj, Mapping):
            unknown = sorted(set(obj) - {"text", "mmdit", "vae", "tokenizers"})
            if unknown or not {"text", "mmdit", "vae"} <= set(obj):
                raise ValueError(
                    f"components must have keys text, mmdit, vae (and optionally tokenizers); got {sorted(obj)}"
                )
            return cls(**obj)
        if all(hasattr(obj, a) for a in ("text", "mmdit", "vae")):  # a TextToVideoPipeline
            return cls(obj.text, obj.mmdit, obj.vae, getattr(obj, "tokenizers", None))
        raise TypeError(f"expected a TextToVideoPipeline, Components or a mapping, got {type(obj).__name__}")


def jax_to_official_folder(
    pipeline_or_components,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    transformer_folder: str = TRANSFORMER_FOLDER,
    overwrite: bool = False,
) -> Path:
    """Write ``pipeline_or_components`` as an official-layout folder (see the module docstring) at ``out_dir``.

    ``dtype``: ``None`` (keep), ``"official"`` or one storage dtype for every tensor. The whole folder is
    staged beside ``out_dir`` and renamed into place; an existing ``out_dir`` is replaced only with
    ``overwrite=True``. Returns ``out_dir``.
    """
    comps = Components.of(pipeline_or_components)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if _kind(comps.vae) != "vae" or _kind(comps.mmdit) != "mmdit" or _kind(comps.text) != "text":
        raise TypeError("components: text must be a TextConditioner, mmdit a PyramidMMDiT, vae a CausalVideoVAE")
    text_cfg: TextConfig = comps.text.cfg
    tokenizers = comps.tokenizers
    if tokenizers is None:
        from neodragon_jax.models.text.tokenizers import TextTokenizers

        try:
            tokenizers = TextTokenizers.for_config(text_cfg)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(
                f"no tokenizers to write: pass a pipeline (or Components with tokenizers=...), or set "
                f"model.text.tokenizer_dir / tokenizer_preset. ({err})"
            ) from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging-"))
    try:
        chmod_like_open(staging, directory=True)  # mkdtemp makes 0700: the folder is renamed into place
        from export.mirror.text import hf_clip_config, hf_t5_config

        text = comps.text
        for name in ("clip_l", "clip_g"):
            ccfg: CLIPTextConfig = getattr(text_cfg, name)
            _write_component(getattr(text, name), staging / TEXT_FOLDERS[name], TRANSFORMERS_WEIGHTS,
                             _hf_json(hf_clip_config(ccfg), "CLIPTextModelWithProjection", ccfg), dtype)
        if text_cfg.kind == "teacher":
            _write_component(text.t5, staging / TEXT_FOLDERS["t5"], TRANSFORMERS_WEIGHTS,
                             _hf_json(hf_t5_config(text_cfg.t5), "T5EncoderModel", text_cfg.t5), dtype)
        else:
            d = text_cfg.distil_t5
            dt5_json = {"_class_name": "T5EncoderWithProjection", "encoder": hf_t5_config(d.body).to_dict(),
                        "projection_dim": d.projection_dim, "dropout": d.head_dropout, OURS: _plain(d)}
            _write_component(text.distil_t5, staging / TEXT_FOLDERS["distil_t5"], TRANSFORMERS_WEIGHTS, dt5_json, dtype)
            ca = text_cfg.context_adapter
            ca_json = {"_class_name": "SkipMLP", "input_dim": ca.in_dim, "hidden_dim": ca.hidden_dim,
                       "num_hidden_layers": ca.num_hidden_layers, "output_dim": ca.out_dim, "activation": "gelu",
                       "skip_connection": "input_first_concat", OURS: _plain(ca)}
            _write_component(text.context_adapter, staging / CONTEXT_ADAPTER_FOLDER, DIFFUSERS_WEIGHTS, ca_json, dtype)
        _write_component(comps.mmdit, staging / transformer_folder, DIFFUSERS_WEIGHTS,
                         mmdit_config_json(comps.mmdit.cfg), dtype)
        _write_component(comps.vae, staging / VAE_FOLDER, DIFFUSERS_WEIGHTS,
                         vae_config_json(comps.vae.cfg, comps.vae.decoder_kind), dtype)
        for name, folder in TOKENIZER_FOLDERS.items():
            getattr(tokenizers, name).save_pretrained(str(staging / folder))

        backup = None
        if out_dir.exists():
            backup = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, backup)
        os.replace(staging, out_dir)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# ---- reading it back --------------------------------------------------------------------------------------------


def official_folder_to_jax(folder: str | os.PathLike, cfg: Config, *, transformer: str | None = None,
                           read_configs: bool = True):
    """Load an official-layout folder into a JAX :class:`TextToVideoPipeline` (strict key maps).

    ``read_configs``: take the architecture from the folder's ``config.json`` files
    (:func:`config_from_official_folder`) whatever ``cfg`` says; without it a ``cfg`` that contradicts them is
    refused (:class:`~neodragon_jax.pipelines.official.OfficialConfigMismatch`), as ``neodragon generate
    --checkpoint`` does.
    """
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

    if read_configs:
        cfg = config_from_official_folder(folder, cfg, transformer=transformer)
    return TextToVideoPipeline.from_official(folder, cfg, transformer=transformer)


def official_folder_to_mirror(folder: str | os.PathLike, cfg: Config, *, transformer: str | None = None) -> dict:
    """The folder's components as PyTorch mirrors: ``{"text", "mmdit", "vae"}`` (strict ``load_state_dict``)."""
    import torch

    from export import mirror as m
    from neodragon_jax.pipelines.official import TRANSFORMER_FOLDERS

    folder = Path(folder)
    cfg = config_from_official_folder(folder, cfg, transformer=transformer)
    text_cfg = cfg.model.text

    def load(sub: str, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": _to_torch_tensor(v).float() for k, v in read_safetensors(folder / sub).items()}

    text = m.TextConditioner(text_cfg)
    state: dict[str, torch.Tensor] = {}
    state.update(load(TEXT_FOLDERS["clip_l"], "clip_l."))
    state.update(load(TEXT_FOLDERS["clip_g"], "clip_g."))
    if text_cfg.kind == "teacher":
        state.update(load(TEXT_FOLDERS["t5"], "t5."))
    else:
        state.update(load(TEXT_FOLDERS["distil_t5"], "distil_t5."))
        state.update(load(CONTEXT_ADAPTER_FOLDER, "context_adapter."))
    state.pop("clip_l.text_model.embeddings.position_ids", None)
    state.pop("clip_g.text_model.embeddings.position_ids", None)
    text.load_state_dict(state, strict=True)
    names = (transformer,) if transformer else TRANSFORMER_FOLDERS[text_cfg.kind]
    found = [n for n in names if (folder / n).is_dir()]
    if not found:
        raise FileNotFoundError(f"{folder} has none of the transformer folders {list(names)}")
    mmdit = load_mirror(lambda: m.PyramidMMDiT(cfg.model.mmdit), load(found[0]))
    vae = load_mirror(lambda: m.CausalVideoVAE(cfg.model.vae), load(VAE_FOLDER))
    return {"text": text.eval(), "mmdit": mmdit, "vae": vae, "config": cfg}


__all__ = [
    "Components", "OFFICIAL_DTYPES", "config_from_official_folder", "from_mirror", "jax_to_official_folder",
    "keymap_for", "load_mirror", "mirror_for", "mmdit_config_json", "official_folder_to_jax",
    "official_folder_to_mirror",
    "random_weights", "to_mirror", "torch_state_dict", "vae_config_json",
]
