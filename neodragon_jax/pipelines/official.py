"""Loading a text-to-video pipeline from a folder in the official Neodragon / Pyramid Flow layout (spec §9).

Neodragon (``kind = "neodragon"``)::

    tokenizer/ tokenizer_2/ tokenizer_3/         CLIP-L, CLIP-bigG, T5 tokenizers
    text_encoder/ text_encoder_2/                CLIP-L, CLIP-bigG (CLIPTextModelWithProjection)
    text_encoder_3/                              DistilT5 (encoder.* + final_projection.*)
    context_adapter/                             SkipMLP (network_layers.*)        [or context_adapter_multistep_t2v]
    diffusion_transformer_320p/                  18-block MMDiT                    [or ..._multistep_t2v]
    causal_video_vae/                            PF encoder + light decoder

Pyramid Flow SD3 (``kind = "teacher"``)::

    tokenizer*/ text_encoder/ text_encoder_2/ text_encoder_3/ (T5-XXL)
    diffusion_transformer_384p/ (or _768p, _320p)   24 blocks + context_embedder
    causal_video_vae/                               PF encoder + native decoder

Each component folder holds its weights (``*.safetensors``) and usually a ``config.json``. The loader checks,
before loading any weight: that every folder is there (one error listing all that are missing), that every
safetensors file is whole (header and length; a truncated download is named), and that the config agrees
with every ``config.json`` (:func:`config_from_official_folder`): a field no weight shape depends on (the
VAE's norm groups, a norm epsilon, ...) would otherwise load silently wrong, so a contradiction is refused
with the fields named (:class:`OfficialConfigMismatch`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from neodragon_jax.config import Config, ConfigError
from neodragon_jax.config.schema import (
    CLIPTextConfig,
    ContextAdapterConfig,
    DistilT5Config,
    MMDiTConfig,
    T5Config,
    VAEConfig,
)
from neodragon_jax.convert.io import (
    CheckpointNotFoundError,
    CheckpointReadError,
    check_safetensors_file,
    read_safetensors,
    safetensors_files,
)
from neodragon_jax.layers.core import as_dtype

TRANSFORMER_FOLDERS = {
    "neodragon": ("diffusion_transformer_320p", "diffusion_transformer_320p_multistep_t2v"),
    "teacher": ("diffusion_transformer_320p", "diffusion_transformer_384p", "diffusion_transformer_768p"),
}
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
TEXT_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3",
                "distil_t5": "text_encoder_3"}
VAE_FOLDER = "causal_video_vae"
# Our exact component config, stored beside the official fields of every config.json we write.
OURS = "_neodragon_jax"

LAYOUT = {
    "neodragon": "tokenizer/ tokenizer_2/ tokenizer_3/ text_encoder/ text_encoder_2/ text_encoder_3/ (DistilT5) "
                 "context_adapter/ diffusion_transformer_320p/ causal_video_vae/, each component folder with its "
                 "*.safetensors and config.json",
    "teacher": "tokenizer/ tokenizer_2/ tokenizer_3/ text_encoder/ text_encoder_2/ text_encoder_3/ (T5-XXL) "
               "diffusion_transformer_384p/ (or _768p, _320p) causal_video_vae/, each component folder with its "
               "*.safetensors and config.json",
}
KIND_NAMES = {"neodragon": "Neodragon", "teacher": "Pyramid Flow SD3"}

# Config fields that are how to run the model, not what the checkpoint is: the config's value is kept.
RUNTIME_FIELDS = frozenset({"model.mmdit.remat", "model.mmdit.scan_blocks"})
# Fields a checkpoint may state differently from a preset without changing its numbers: the folder's value
# is taken without complaint. Dropout is training-only; CLIP's eos/pad ids are checked against the folder's
# own tokenizers (eos_token_id 2, what the official SD3 configs say, pools at the largest id = EOS).
FOLDER_WINS = ("dropout_rate", "head_dropout", "eos_token_id", "pad_token_id", "teacher_block_indices")


class OfficialConfigMismatch(ConfigError):
    """The config contradicts the checkpoint folder's ``config.json`` files; ``fields`` lists
    ``(dotted key, config value, folder value, file)``."""

    def __init__(self, message: str, fields: list[tuple[str, Any, Any, str]]):
        super().__init__(message)
        self.fields = fields


def layout_help(kind: str) -> str:
    """The expected layout of a ``kind`` folder, on one line."""
    return f"expected the official {KIND_NAMES.get(kind, kind)} layout: {LAYOUT.get(kind, LAYOUT['neodragon'])}"


# ---- config.json -----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        out = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointReadError(f"{path}: not valid JSON ({err}); it may be truncated: download it again") from None
    if not isinstance(out, dict):
        raise CheckpointReadError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def _from_plain(cls, tree: Mapping) -> Any:
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output (lists back to tuples)."""
    defaults = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        value, current = tree[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(current):
            value = _from_plain(type(current), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _pick(j: Mapping, mapping: Mapping[str, str], convert: Mapping[str, Callable] | None = None) -> dict:
    """``{our field: j[official key]}`` for the official keys ``j`` has (a missing key keeps the base value)."""
    convert = convert or {}
    return {ours: convert.get(ours, lambda v: v)(j[key]) for ours, key in mapping.items() if key in j}


_CLIP_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "max_position_embeddings": "max_position_embeddings", "projection_dim": "projection_dim",
    "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps", "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
_T5_KEYS = {
    "vocab_size": "vocab_size", "d_model": "d_model", "num_layers": "num_layers", "num_heads": "num_heads",
    "d_kv": "d_kv", "d_ff": "d_ff", "layer_norm_epsilon": "layer_norm_epsilon",
    "relative_attention_num_buckets": "relative_attention_num_buckets",
    "relative_attention_max_distance": "relative_attention_max_distance",
}
_CA_KEYS = {"in_dim": "input_dim", "hidden_dim": "hidden_dim", "num_hidden_layers": "num_hidden_layers",
            "out_dim": "output_dim"}
_MMDIT_KEYS = {
    "num_layers": "num_layers", "num_heads": "num_attention_heads", "head_dim": "attention_head_dim",
    "patch_size": "patch_size", "in_channels": "in_channels", "pooled_dim": "pooled_projection_dim",
    "pos_embed_max_size": "pos_embed_max_size", "sample_size": "sample_size", "max_num_frames": "max_num_frames",
}


def _layers(v) -> int:
    return int(np.max(v))


_VAE_KEYS = {
    "in_channels": "encoder_in_channels", "latent_channels": "encoder_out_channels",
    "block_out_channels": "encoder_block_out_channels", "encoder_layers_per_block": "encoder_layers_per_block",
    "decoder_layers_per_block": "decoder_layers_per_block", "spatial_down": "encoder_spatial_down_sample",
    "temporal_down": "encoder_temporal_down_sample", "norm_groups": "encoder_norm_num_groups",
}
_VAE_CONVERT = {"block_out_channels": tuple, "spatial_down": tuple, "temporal_down": tuple,
                "encoder_layers_per_block": _layers, "decoder_layers_per_block": _layers}
_DECODER_TYPES = {"causal_vae_conv": "native", "taehv": "light"}


def _component_sources(folder: Path, text_kind: str, transformer: str | None) -> dict[str, str]:
    """Dotted config prefix -> the config.json that states it (for messages)."""
    names = (transformer,) if transformer else TRANSFORMER_FOLDERS.get(text_kind, ())
    tf = next((n for n in names if (folder / n).is_dir()), names[0] if names else "diffusion_transformer_*")
    multistep = transformer is not None and transformer.endswith("_multistep_t2v")
    return {
        "model.text.clip_l.": "text_encoder/config.json",
        "model.text.clip_g.": "text_encoder_2/config.json",
        "model.text.t5.": "text_encoder_3/config.json",
        "model.text.distil_t5.": "text_encoder_3/config.json",
        "model.text.context_adapter.": ("context_adapter_multistep_t2v" if multistep else "context_adapter")
                                       + "/config.json",
        "model.mmdit.": f"{tf}/config.json",
        "model.vae.": f"{VAE_FOLDER}/config.json",
    }


def config_from_official_folder(folder: str | Path, base: Config, *, transformer: str | None = None) -> Config:
    """``base`` with ``model.text`` / ``model.mmdit`` / ``model.vae`` taken from the folder's ``config.json`` files.

    Our own folders carry the exact component configs (the ``_neodragon_jax`` entry); for the official
    release the architecture fields present in each file are mapped (CLIP / T5 sizes, context adapter widths,
    MMDiT widths and depth, VAE widths, norm groups and decoder); what a file does not say stays as in ``base``.
    """
    folder = Path(folder)
    model = base.model
    text = model.text

    def ours_or(sub: str, cls, official: Callable[[dict], Any], current):
        cfg = _read_json(folder / sub / "config.json")
        if cfg is None:
            return current
        return _from_plain(cls, cfg[OURS]) if OURS in cfg else official(cfg)

    def clip_official(cur: CLIPTextConfig):
        return lambda j: dataclasses.replace(cur, **_pick(j, _CLIP_KEYS))

    def t5_official(cur: T5Config):
        return lambda j: dataclasses.replace(cur, **_pick(j, _T5_KEYS))

    clip_l = ours_or(TEXT_FOLDERS["clip_l"], CLIPTextConfig, clip_official(text.clip_l), text.clip_l)
    clip_g = ours_or(TEXT_FOLDERS["clip_g"], CLIPTextConfig, clip_official(text.clip_g), text.clip_g)
    text = dataclasses.replace(text, clip_l=clip_l, clip_g=clip_g)
    if text.kind == "teacher":
        t5 = ours_or(TEXT_FOLDERS["t5"], T5Config, t5_official(text.t5), text.t5)
        text = dataclasses.replace(text, t5=t5)
    else:
        def dt5_official(j):
            body = t5_official(text.distil_t5.body)(j["encoder"]) if isinstance(j.get("encoder"), dict) \
                else text.distil_t5.body
            return dataclasses.replace(text.distil_t5, body=body, **_pick(j, {"projection_dim": "projection_dim"}))

        dt5 = ours_or(TEXT_FOLDERS["distil_t5"], DistilT5Config, dt5_official, text.distil_t5)
        multistep = transformer is not None and transformer.endswith("_multistep_t2v")
        ca_folder = "context_adapter_multistep_t2v" if multistep else "context_adapter"
        ca = ours_or(ca_folder, ContextAdapterConfig,
                     lambda j: dataclasses.replace(text.context_adapter, **_pick(j, _CA_KEYS)), text.context_adapter)
        text = dataclasses.replace(text, distil_t5=dt5, context_adapter=ca)

    names = (transformer,) if transformer else TRANSFORMER_FOLDERS[text.kind]
    mmdit = model.mmdit

    def mmdit_official(j):
        fields = _pick(j, _MMDIT_KEYS)
        if "joint_attention_dim" in j:
            uses = j.get("use_context_embedder", text.kind == "teacher")
            fields["context_in_dim"] = int(j["joint_attention_dim"]) if uses else None
        return dataclasses.replace(model.mmdit, **fields)

    for n in names:
        if (folder / n).is_dir():
            mmdit = ours_or(n, MMDiTConfig, mmdit_official, model.mmdit)
            break

    vae = model.vae
    vjson = _read_json(folder / VAE_FOLDER / "config.json")
    if vjson is not None and OURS in vjson:
        vae = dataclasses.replace(_from_plain(VAEConfig, vjson[OURS]["vae"]), decoder=vjson[OURS]["decoder"])
    elif vjson is not None:
        causal = dataclasses.replace(vae.causal, **_pick(vjson, _VAE_KEYS, _VAE_CONVERT))
        decoder = _DECODER_TYPES.get(vjson.get("decoder_type"), vae.decoder)
        vae = dataclasses.replace(vae, causal=causal, decoder=decoder)
    return dataclasses.replace(base, model=dataclasses.replace(model, text=text, mmdit=mmdit, vae=vae))


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_toml(x) for x in v) + "]"
    return str(v)


def reconcile_official_config(folder: str | Path, cfg: Config, *, transformer: str | None = None) -> Config:
    """The config to load ``folder`` with: ``cfg``'s model fields as the folder's ``config.json`` files state
    them, run-time fields (:data:`RUNTIME_FIELDS`) as ``cfg`` has them.

    Raises :class:`OfficialConfigMismatch` naming every field where ``cfg`` contradicts a ``config.json``
    (apart from :data:`FOLDER_WINS`: dropout, CLIP token ids, pruning bookkeeping).
    """
    folder = Path(folder)
    stated = config_from_official_folder(folder, cfg, transformer=transformer)
    mine = _flat(dataclasses.asdict(cfg.model), "model.")
    theirs = _flat(dataclasses.asdict(stated.model), "model.")
    sources = _component_sources(folder, cfg.model.text.kind, transformer)
    conflicts = []
    for key in sorted(theirs):
        a, b = mine.get(key), theirs[key]
        if a == b or key in RUNTIME_FIELDS or key.rsplit(".", 1)[-1] in FOLDER_WINS:
            continue
        source = next((f for p, f in sources.items() if key.startswith(p)), "config.json")
        conflicts.append((key, a, b, source))
    if conflicts:
        said = "; ".join(f"{k} is {_toml(a)} in the config, {_toml(b)} in {src}" for k, a, b, src in conflicts)
        sets = " ".join(f"--set {k}={_toml(b)}" for k, _, b, _ in conflicts)
        raise OfficialConfigMismatch(
            f"{str(folder)!r}: config {cfg.name!r} contradicts the checkpoint's config.json: {said}. Weights loaded "
            f"with these settings would compute something else; use the preset made for this checkpoint or set "
            f"the checkpoint's values ({sets})", conflicts)
    runtime = {k.rsplit(".", 1)[-1]: getattr(cfg.model.mmdit, k.rsplit(".", 1)[-1]) for k in RUNTIME_FIELDS}
    return dataclasses.replace(
        stated, model=dataclasses.replace(stated.model, mmdit=dataclasses.replace(stated.model.mmdit, **runtime)))


# ---- the folder ------------------------------------------------------------------------------------------------


def _components(folder: Path, kind: str, transformer: str | None) -> tuple[dict[str, Path], list[str]]:
    """Component name -> folder, and the list of missing entries (with alternatives spelled out)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in TOKENIZER_FOLDERS:
        if not (folder / name).is_dir():
            missing.append(f"{name}/")
    text = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    text["t5" if kind == "teacher" else "distil_t5"] = "text_encoder_3"
    if kind == "neodragon":
        multistep = transformer is not None and transformer.endswith("_multistep_t2v")
        text["context_adapter"] = "context_adapter_multistep_t2v" if multistep else "context_adapter"
    for comp, name in text.items():
        if (folder / name).is_dir():
            found[comp] = folder / name
        else:
            missing.append(f"{name}/")
    names = (transformer,) if transformer else TRANSFORMER_FOLDERS[kind]
    tf = [n for n in names if (folder / n).is_dir()]
    if tf:
        found["mmdit"] = folder / tf[0]
    else:
        missing.append(" or ".join(f"{n}/" for n in names))
    if (folder / VAE_FOLDER).is_dir():
        found["vae"] = folder / VAE_FOLDER
    else:
        missing.append(f"{VAE_FOLDER}/")
    return found, missing


def _kind_hint(folder: Path, kind: str) -> str:
    if kind == "teacher" and any((folder / n).is_dir() for n in ("context_adapter", "context_adapter_multistep_t2v")):
        return (" It has context_adapter/, so it looks like a Neodragon folder: load it with a Neodragon config "
                "(e.g. the neodragon-320p preset).")
    if kind == "neodragon" and any((folder / n).is_dir() for n in TRANSFORMER_FOLDERS["teacher"][1:]):
        return (" It has a 384p/768p transformer, so it looks like a Pyramid Flow SD3 folder: load it with a "
                "teacher config (e.g. the pyramid-flow-sd3-320p preset).")
    return ""


def check_official_folder(folder: str | Path, kind: str, *, transformer: str | None = None) -> dict[str, Path]:
    """Check ``folder`` before loading anything: every component folder present (one error listing all that
    are missing), weights in each and every safetensors file whole (header and length). Returns component
    name -> folder. Raises :class:`CheckpointNotFoundError` or :class:`CheckpointReadError`, naming the path
    and the expected layout."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise CheckpointNotFoundError(f"checkpoint folder {str(folder)!r} does not exist; {layout_help(kind)}")
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"checkpoint {str(folder)!r} is a file, not a folder; {layout_help(kind)}")
    found, missing = _components(folder, kind, transformer)
    if missing:
        what = "is empty" if not any(folder.iterdir()) else f"lacks {', '.join(missing)}"
        raise CheckpointNotFoundError(
            f"checkpoint folder {str(folder)!r} {what}: it is not a complete {KIND_NAMES[kind]} folder; "
            f"{layout_help(kind)}.{_kind_hint(folder, kind)}"
        )
    for comp, sub in found.items():
        try:
            files = safetensors_files(sub)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"{str(sub)!r} holds no weights: expected diffusion_pytorch_model.safetensors or model.safetensors "
                f"(or a sharded *.safetensors.index.json with its shards) in it; {layout_help(kind)}"
            ) from None
        for f in files:
            check_safetensors_file(f)
    return found


def load_official(pipeline_cls, folder: Path, cfg: Config, *, transformer: str | None = None):
    from flax import nnx

    from neodragon_jax.convert.mmdit import infer_mmdit_config, mmdit_from_checkpoint
    from neodragon_jax.convert.text import load_text_conditioner
    from neodragon_jax.convert.vae import load_vae
    from neodragon_jax.models.build import abstract
    from neodragon_jax.models.text.tokenizers import TextTokenizers
    from neodragon_jax.models.vae import CausalVideoVAE

    folder = Path(folder).expanduser()
    kind = cfg.model.text.kind
    found = check_official_folder(folder, kind, transformer=transformer)
    cfg = reconcile_official_config(folder, cfg, transformer=transformer)
    kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))
    text_cfg = dataclasses.replace(cfg.model.text, tokenizer_dir=str(folder))
    try:
        tokenizers = TextTokenizers.from_folder(folder, text_cfg)
    except (OSError, ValueError) as err:
        raise CheckpointReadError(f"the tokenizers of {str(folder)!r} do not load: {err}") from None
    text_paths = {k: found[k] for k in ("clip_l", "clip_g", "t5", "distil_t5", "context_adapter") if k in found}
    text = load_text_conditioner(cfg.model.text, **text_paths, **kw)
    tensors = read_safetensors(found["mmdit"])
    mmdit_cfg = infer_mmdit_config(tensors, cfg.model.mmdit)
    mmdit = mmdit_from_checkpoint(mmdit_cfg, tensors, **kw)
    vae = abstract(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0), **kw))
    load_vae(vae, found["vae"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mmdit=mmdit_cfg, text=text_cfg))
    return pipeline_cls(cfg, tokenizers, text, mmdit, vae, random_weights=False, source=str(folder))


__all__ = [
    "LAYOUT", "OURS", "OfficialConfigMismatch", "TRANSFORMER_FOLDERS", "check_official_folder",
    "config_from_official_folder", "layout_help", "load_official", "reconcile_official_config",
]
