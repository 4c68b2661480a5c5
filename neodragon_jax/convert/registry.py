"""The key-map registry: which declarative key map (``neodragon_jax.convert.*``) belongs to a JAX module.

One place for the question "what are this module's official checkpoint names", shared by checkpoint import
(``train.weights`` loads official folders into any role of a stage), the PyTorch mirror and export
(``export.convert`` re-exports :func:`keymap_for`). It lives in the library so ``train/`` can use it
without importing ``export/``.
"""

from __future__ import annotations

from flax import nnx

from neodragon_jax.convert.keymap import KeyMap

#: Component kind -> the folder of the official layout (``neodragon_jax.pipelines.official``) that holds its
#: weights; a kind not listed here has no folder of its own (load it from its component folder or file).
OFFICIAL_FOLDERS = {
    "mmdit": ("diffusion_transformer_320p", "diffusion_transformer_384p", "diffusion_transformer_768p",
              "diffusion_transformer_320p_multistep_t2v"),
    "vae": ("causal_video_vae",),
    "vae_encoder_part": ("causal_video_vae",),
    "vae_decoder_part": ("causal_video_vae",),
    "context_adapter": ("context_adapter",),
    "distil_t5": ("text_encoder_3",),
    "t5": ("text_encoder_3",),
}
# The teacher MMDiT's context embedder alone (text-encoder distillation's frozen CE) lives in the MMDiT's folder.
OFFICIAL_FOLDERS["context_embedder"] = OFFICIAL_FOLDERS["mmdit"]

#: Kinds whose weights are a part of another component's file: a loader keeps only the tensors their key map
#: names (strict about those) and ignores the rest of the file.
PART_OF = {"context_embedder": "mmdit"}


def component_kind(model: nnx.Module) -> str:
    """The component kind of a JAX module (``mmdit``, ``vae``, ``text``, ``t5``, ...)."""
    from neodragon_jax.models.mmdit import PyramidMMDiT
    from neodragon_jax.models.text.clip import CLIPTextEncoder
    from neodragon_jax.models.text.conditioner import TextConditioner
    from neodragon_jax.models.text.context_adapter import ContextAdapter
    from neodragon_jax.models.text.context_embedder import ContextEmbedder
    from neodragon_jax.models.text.distil_t5 import DistilT5
    from neodragon_jax.models.text.t5 import T5Encoder
    from neodragon_jax.models.vae import (
        CausalVAEDecoder, CausalVAEEncoder, CausalVideoVAE, LightDecoder, VAEDecoderPart, VAEEncoderPart,
    )

    kinds = (
        (PyramidMMDiT, "mmdit"), (CausalVideoVAE, "vae"), (VAEEncoderPart, "vae_encoder_part"),
        (VAEDecoderPart, "vae_decoder_part"), (CausalVAEEncoder, "vae_encoder"),
        (CausalVAEDecoder, "vae_native_decoder"), (LightDecoder, "vae_light_decoder"), (TextConditioner, "text"),
        (DistilT5, "distil_t5"), (ContextAdapter, "context_adapter"), (T5Encoder, "t5"), (CLIPTextEncoder, "clip"),
        (ContextEmbedder, "context_embedder"),
    )
    for cls, name in kinds:
        if type(model) is cls or isinstance(model, cls):
            return name
    raise TypeError(
        f"no key map for {type(model).__name__}: expected one of {', '.join(c.__name__ for c, _ in kinds)}"
    )


def keymap_for(model: nnx.Module) -> KeyMap:
    """The official-name key map of a JAX component (the one checkpoint import uses)."""
    from neodragon_jax.convert import mmdit as cm
    from neodragon_jax.convert import text as ct
    from neodragon_jax.convert import vae as cv

    kind = component_kind(model)
    if kind == "mmdit":
        return cm.mmdit_keymap(model.cfg)
    if kind == "vae":
        return cv.vae_keymap(model)
    if kind == "vae_encoder_part":
        return cv.encoder_part_keymap(model.cfg)
    if kind == "vae_decoder_part":
        return cv.decoder_part_keymap(model.cfg, model.decoder_kind)
    if kind == "vae_encoder":
        return cv.encoder_keymap(model.cfg)
    if kind == "vae_native_decoder":
        return cv.native_decoder_keymap(model.cfg)
    if kind == "vae_light_decoder":
        return cv.light_decoder_keymap(model.cfg)
    if kind == "text":
        maps = ct.text_conditioner_keymaps(model.cfg)
        entries = tuple(e for n, m in maps.items() for e in m.prefixed(f"{n}.", f"{n}.").entries)
        return KeyMap("text_conditioner", entries)
    if kind == "distil_t5":
        return ct.distil_t5_keymap(model.cfg)
    if kind == "context_adapter":
        return ct.context_adapter_keymap(model.cfg)
    if kind == "t5":
        return ct.t5_encoder_keymap(model.cfg)
    if kind == "context_embedder":
        from neodragon_jax.convert.keymap import entries_for_linear

        return KeyMap("context_embedder", tuple(entries_for_linear("context_embedder", "context_embedder")))
    return ct.clip_text_keymap(model.cfg)
