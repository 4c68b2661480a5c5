"""PyTorch text stack in the official layouts (spec §4, §9.3, §9.4).

T5 and CLIP are transformers' own PyTorch classes (``T5EncoderModel``, ``CLIPTextModelWithProjection``)
built from our configs; the Neodragon wrappers are small torch modules with the official attribute names:

- :class:`DistilT5` (``T5EncoderWithProjection``): ``encoder`` (a ``T5EncoderModel``, hence the doubled
  ``encoder.encoder.block...`` keys) + ``final_projection`` (``Linear, ReLU, Dropout, Linear``, no biases);
- :class:`ContextAdapter` (SkipMLP): ``network_layers.{i}`` = ``(Identity, Linear, GELU)`` for hidden layers and
  ``(Linear, Identity)`` for the output layer; every layer after the first sees ``[x_in; h]`` (input first);
- :class:`TextConditioner`: token ids -> ``(text tokens [B, S, D], mask [B, S], pooled [B, 2048])`` like the
  JAX conditioner, for whole-pipeline replays.
"""

from __future__ import annotations

import torch
from torch import nn

from neodragon_jax.config.schema import CLIPTextConfig, ContextAdapterConfig, DistilT5Config, T5Config, TextConfig


def hf_t5_config(cfg: T5Config):
    """transformers ``T5Config`` of a T5 v1.1 encoder (gated tanh-GELU FFN, no dropout at inference)."""
    from transformers import T5Config as HFT5Config

    return HFT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=cfg.dropout_rate,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False,
    )


def hf_clip_config(cfg: CLIPTextConfig):
    """transformers ``CLIPTextConfig`` (the pooling rule follows ``eos_token_id``, legacy 2 = argmax)."""
    from transformers import CLIPTextConfig as HFCLIPTextConfig

    return HFCLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, projection_dim=cfg.projection_dim,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, bos_token_id=max(cfg.vocab_size - 2, 0),
    )


def t5_encoder(cfg: T5Config):
    """transformers ``T5EncoderModel`` (Pyramid Flow ``text_encoder_3``), eager attention, eval mode."""
    from transformers import T5EncoderModel

    return T5EncoderModel._from_config(hf_t5_config(cfg), attn_implementation="eager").eval()


def clip_text(cfg: CLIPTextConfig):
    """transformers ``CLIPTextModelWithProjection`` (``text_encoder`` / ``text_encoder_2``), eval mode."""
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection._from_config(hf_clip_config(cfg), attn_implementation="eager").eval()


class DistilT5(nn.Module):
    """``T5EncoderWithProjection``: ``(ids [B, S], mask [B, S]) -> [B, S, P]``."""

    def __init__(self, cfg: DistilT5Config):
        super().__init__()
        d, p = cfg.body.d_model, cfg.projection_dim
        self.encoder = t5_encoder(cfg.body)
        self.final_projection = nn.Sequential(
            nn.Linear(d, p, bias=False), nn.ReLU(), nn.Dropout(cfg.head_dropout), nn.Linear(p, p, bias=False)
        )
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.final_projection(h)


class ContextAdapter(nn.Module):
    """SkipMLP ``[B, S, C_in] -> [B, S, C_out]`` (exact GELU, skips from the original input, input first)."""

    def __init__(self, cfg: ContextAdapterConfig):
        super().__init__()
        cin, hid = cfg.in_dim, cfg.hidden_dim
        layers = [nn.Sequential(nn.Identity(), nn.Linear(cin, hid), nn.GELU())]
        layers += [
            nn.Sequential(nn.Identity(), nn.Linear(cin + hid, hid), nn.GELU()) for _ in range(cfg.num_hidden_layers - 1)
        ]
        layers.append(nn.Sequential(nn.Linear(cin + hid, cfg.out_dim), nn.Identity()))
        self.network_layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.network_layers[0](x)
        for layer in self.network_layers[1:]:
            h = layer(torch.cat([x, h], dim=-1))
        return h


class TextConditioner(nn.Module):
    """``clip_l``, ``clip_g`` and ``t5`` (teacher) or ``distil_t5`` + ``context_adapter`` (Neodragon)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.clip_l = clip_text(cfg.clip_l)
        self.clip_g = clip_text(cfg.clip_g)
        if cfg.kind == "teacher":
            self.t5 = t5_encoder(cfg.t5)
        elif cfg.kind == "neodragon":
            self.distil_t5 = DistilT5(cfg.distil_t5)
            self.context_adapter = ContextAdapter(cfg.context_adapter)
        else:
            raise ValueError(f"unknown text kind {cfg.kind!r}: expected 'teacher' or 'neodragon'")
        self.eval()

    def encode_tokens(self, t5_ids: torch.Tensor, t5_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.kind == "teacher":
            return self.t5(input_ids=t5_ids, attention_mask=t5_mask).last_hidden_state
        return self.context_adapter(self.distil_t5(t5_ids, t5_mask))

    def forward(self, t5_ids, t5_mask, clip_l_ids, clip_g_ids):
        pooled = torch.cat(
            [self.clip_l(input_ids=clip_l_ids).text_embeds, self.clip_g(input_ids=clip_g_ids).text_embeds], dim=-1
        )
        return self.encode_tokens(t5_ids, t5_mask), t5_mask, pooled


__all__ = [
    "ContextAdapter", "DistilT5", "TextConditioner", "clip_text", "hf_clip_config", "hf_t5_config", "t5_encoder",
]
