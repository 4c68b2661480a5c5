"""Key maps and loaders for the video VAEs (spec §9.5, §9.6).

- ``asym_vae``: Neodragon's ``causal_video_vae`` (AsymmetricCausalVideoVAE, 180 tensors) = PF encoder +
  ``quant_conv`` + ``post_quant_conv`` + the light decoder (``decoder.blocks.{i}``).
- ``pf_vae``: Pyramid Flow's ``causal_video_vae`` (260 tensors) = PF encoder + quant convs + native decoder.

The maps are functions of the config so depths and widths follow it; torch names equal our attribute
paths except ``weight -> kernel`` for convs / linears and ``weight -> scale`` for group norms.
"""

from __future__ import annotations

import os

from neodragon_jax.config.schema import CausalVAEConfig, LightDecoderConfig, VAEConfig
from neodragon_jax.convert.keymap import Entry, KeyMap, entries_for_conv, entries_for_linear, entries_for_norm


def _same(prefix: str) -> tuple[str, str]:
    return prefix, prefix


def _cconv(prefix: str) -> list[Entry]:
    """A ``CausalConv3d`` (``<prefix>.conv.{weight,bias}``)."""
    return entries_for_conv(*_same(f"{prefix}.conv"), dims=3)


def _resnet(prefix: str, cin: int, cout: int) -> list[Entry]:
    out = entries_for_norm(*_same(f"{prefix}.norm1")) + _cconv(f"{prefix}.conv1")
    out += entries_for_norm(*_same(f"{prefix}.norm2")) + _cconv(f"{prefix}.conv2")
    if cin != cout:
        out += _cconv(f"{prefix}.conv_shortcut")
    return out


def _mid(prefix: str, c: int) -> list[Entry]:
    a = f"{prefix}.attentions.0"
    out = _resnet(f"{prefix}.resnets.0", c, c)
    out += entries_for_norm(*_same(f"{a}.group_norm"))
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        out += entries_for_linear(*_same(f"{a}.{name}"))
    out += _resnet(f"{prefix}.resnets.1", c, c)
    return out


def encoder_keymap(cfg: CausalVAEConfig) -> KeyMap:
    """:class:`CausalVAEEncoder` alone (torch names without the ``encoder.`` prefix)."""
    w = cfg.block_out_channels
    out = _cconv("conv_in")
    cin = w[0]
    for i, cout in enumerate(w):
        for j in range(cfg.encoder_layers_per_block):
            out += _resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if cfg.spatial_down[i]:
            out += _cconv(f"down_blocks.{i}.downsamplers.0.conv")
        if cfg.temporal_down[i]:
            out += _cconv(f"down_blocks.{i}.temporal_downsamplers.0.conv")
        cin = cout
    out += _mid("mid_block", w[-1])
    out += entries_for_norm(*_same("conv_norm_out")) + _cconv("conv_out")
    return KeyMap("vae_encoder", tuple(out))


def native_decoder_keymap(cfg: CausalVAEConfig) -> KeyMap:
    """:class:`CausalVAEDecoder` alone (torch names without the ``decoder.`` prefix)."""
    rev = tuple(reversed(cfg.block_out_channels))
    out = _cconv("conv_in") + _mid("mid_block", rev[0])
    cin = rev[0]
    for i, cout in enumerate(rev):
        for j in range(cfg.decoder_layers_per_block):
            out += _resnet(f"up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if cfg.spatial_down[i]:
            out += _cconv(f"up_blocks.{i}.upsamplers.0.conv")
        if cfg.temporal_down[i]:
            out += _cconv(f"up_blocks.{i}.temporal_upsamplers.0.conv")
        cin = cout
    out += entries_for_norm(*_same("conv_norm_out")) + _cconv("conv_out")
    return KeyMap("vae_native_decoder", tuple(out))


def light_decoder_keymap(cfg: LightDecoderConfig) -> KeyMap:
    """:class:`LightDecoder` alone: ``blocks.{i}`` with the official ``nn.Sequential`` indices."""
    out = entries_for_conv(*_same("blocks.1"), dims=2)
    i = 3  # 0 Clamp, 1 conv, 2 ReLU
    for _stage in cfg.channels:
        for _ in range(cfg.blocks_per_stage):
            for k in (0, 2, 4):
                out += entries_for_conv(*_same(f"blocks.{i}.conv.{k}"), dims=2)
            i += 1
        # i: Upsample (no params); i + 1: TGrow (1x1 conv, no bias); i + 2: conv (no bias)
        out += entries_for_conv(*_same(f"blocks.{i + 1}.conv"), dims=2, bias=False)
        out += entries_for_conv(*_same(f"blocks.{i + 2}"), dims=2, bias=False)
        i += 3
    out += entries_for_conv(*_same(f"blocks.{i + 1}"), dims=2)  # i: ReLU; i + 1: final conv
    return KeyMap("vae_light_decoder", tuple(out))


def _quant(cfg: CausalVAEConfig) -> KeyMap:
    return KeyMap("vae_quant", tuple(_cconv("quant_conv") + _cconv("post_quant_conv")))


def asym_vae_keymap(cfg: VAEConfig) -> KeyMap:
    """Neodragon ``causal_video_vae`` <-> :class:`~neodragon_jax.models.vae.AsymmetricVAE`."""
    parts = (
        encoder_keymap(cfg.causal).prefixed("encoder.", "encoder."),
        light_decoder_keymap(cfg.light_decoder).prefixed("decoder.", "decoder."),
        _quant(cfg.causal),
    )
    return KeyMap("asym_vae", tuple(e for p in parts for e in p.entries))


def pf_vae_keymap(cfg: VAEConfig) -> KeyMap:
    """Pyramid Flow ``causal_video_vae`` <-> :class:`~neodragon_jax.models.vae.CausalVideoVAE` (native)."""
    parts = (
        encoder_keymap(cfg.causal).prefixed("encoder.", "encoder."),
        native_decoder_keymap(cfg.causal).prefixed("decoder.", "decoder."),
        _quant(cfg.causal),
    )
    return KeyMap("pf_vae", tuple(e for p in parts for e in p.entries))


def encoder_part_keymap(cfg: VAEConfig) -> KeyMap:
    """:class:`~neodragon_jax.models.vae.VAEEncoderPart` (encoder + ``quant_conv``) read from a whole
    ``causal_video_vae`` checkpoint of either decoder: its ``post_quant_conv`` / ``decoder`` keys are left to
    the decoder part."""
    entries = encoder_keymap(cfg.causal).prefixed("encoder.", "encoder.").entries + tuple(_cconv("quant_conv"))
    return KeyMap("vae_encoder_part", entries, other_parts=("decoder.", "post_quant_conv."))


def decoder_part_keymap(cfg: VAEConfig, decoder: str) -> KeyMap:
    """:class:`~neodragon_jax.models.vae.VAEDecoderPart` (``post_quant_conv`` + the native or light decoder)
    read from a whole ``causal_video_vae`` checkpoint: its ``encoder`` / ``quant_conv`` keys are left alone."""
    dec = native_decoder_keymap(cfg.causal) if decoder == "native" else light_decoder_keymap(cfg.light_decoder)
    entries = tuple(_cconv("post_quant_conv")) + dec.prefixed("decoder.", "decoder.").entries
    return KeyMap(f"vae_{decoder}_decoder_part", entries, other_parts=("encoder.", "quant_conv."))


def vae_keymap(model) -> KeyMap:
    """The key map matching a ``CausalVideoVAE`` instance (by its decoder kind)."""
    return asym_vae_keymap(model.cfg) if model.decoder_kind == "light" else pf_vae_keymap(model.cfg)


def load_vae(model, path: str | os.PathLike) -> None:
    """Strictly load an official VAE checkpoint (safetensors file or folder) into ``model`` in place.

    ``model`` is a :class:`CausalVideoVAE` (native decoder: ``pf_vae`` keys) or an :class:`AsymmetricVAE`
    (light decoder: ``asym_vae`` keys). Raises ``CheckpointMismatchError`` listing every bad key.
    """
    from neodragon_jax.convert.io import load_state_dict, read_safetensors

    load_state_dict(model, read_safetensors(path), vae_keymap(model))


__all__ = [
    "asym_vae_keymap", "decoder_part_keymap", "encoder_keymap", "encoder_part_keymap", "light_decoder_keymap", "load_vae", "native_decoder_keymap",
    "pf_vae_keymap", "vae_keymap",
]
