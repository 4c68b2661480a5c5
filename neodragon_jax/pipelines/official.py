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
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from neodragon_jax.config import Config
from neodragon_jax.convert.io import CheckpointNotFoundError, read_safetensors
from neodragon_jax.layers.core import as_dtype

TRANSFORMER_FOLDERS = {
    "neodragon": ("diffusion_transformer_320p", "diffusion_transformer_320p_multistep_t2v"),
    "teacher": ("diffusion_transformer_320p", "diffusion_transformer_384p", "diffusion_transformer_768p"),
}


def _layout_help(kind: str) -> str:
    doc = __doc__.split("Neodragon (")[1]
    return ("Neodragon (" + doc) if kind == "neodragon" else ("Pyramid Flow SD3 (" + doc.split("Pyramid Flow SD3 (")[1])


def _need(folder: Path, name: str, kind: str) -> Path:
    p = folder / name
    if not p.exists():
        raise CheckpointNotFoundError(
            f"{str(folder)!r} lacks {name}/ : expected the official layout\n{_layout_help(kind)}"
        )
    return p


def load_official(pipeline_cls, folder: Path, cfg: Config, *, transformer: str | None = None):
    from neodragon_jax.convert.mmdit import infer_mmdit_config, mmdit_from_checkpoint
    from neodragon_jax.convert.text import load_text_conditioner
    from neodragon_jax.convert.vae import load_vae
    from neodragon_jax.models.build import abstract
    from neodragon_jax.models.text.tokenizers import TextTokenizers
    from neodragon_jax.models.vae import CausalVideoVAE
    from flax import nnx

    kind = cfg.model.text.kind
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"official model folder {str(folder)!r} does not exist.\n{_layout_help(kind)}")
    kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))
    text_cfg = dataclasses.replace(cfg.model.text, tokenizer_dir=str(folder))
    tokenizers = TextTokenizers.from_folder(folder, text_cfg)
    if kind == "neodragon":
        multistep = transformer is not None and transformer.endswith("_multistep_t2v")
        ca = "context_adapter_multistep_t2v" if multistep else "context_adapter"
        text = load_text_conditioner(
            cfg.model.text,
            clip_l=_need(folder, "text_encoder", kind),
            clip_g=_need(folder, "text_encoder_2", kind),
            distil_t5=_need(folder, "text_encoder_3", kind),
            context_adapter=_need(folder, ca, kind),
            **kw,
        )
    else:
        text = load_text_conditioner(
            cfg.model.text,
            clip_l=_need(folder, "text_encoder", kind),
            clip_g=_need(folder, "text_encoder_2", kind),
            t5=_need(folder, "text_encoder_3", kind),
            **kw,
        )
    names = (transformer,) if transformer else TRANSFORMER_FOLDERS[kind]
    found = [n for n in names if (folder / n).is_dir()]
    if not found:
        raise CheckpointNotFoundError(
            f"{str(folder)!r} has none of the transformer folders {list(names)}.\n{_layout_help(kind)}"
        )
    tensors = read_safetensors(folder / found[0])
    mmdit_cfg = infer_mmdit_config(tensors, cfg.model.mmdit)
    mmdit = mmdit_from_checkpoint(mmdit_cfg, tensors, **kw)
    vae = abstract(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0), **kw))
    load_vae(vae, _need(folder, "causal_video_vae", kind))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mmdit=mmdit_cfg, text=text_cfg))
    return pipeline_cls(cfg, tokenizers, text, mmdit, vae, random_weights=False, source=str(folder))
