"""Text conditioning stack (spec §1.3 step 3, §4): token ids in, MMDiT text tokens + mask + pooled vector out.

* ``kind='teacher'`` (Pyramid Flow SD3): ``t5`` = T5-XXL encoder, tokens [B,S,4096]; the teacher MMDiT's own
  ``context_embedder`` maps them to its width.
* ``kind='neodragon'``: ``distil_t5`` -> ``context_adapter``, tokens [B,S,1536] at the MMDiT width.

Both add the pooled vector ``concat(clip_l text_embeds, clip_g text_embeds)`` [B,2048]. Tokenisation lives
elsewhere; this module only takes id arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config.schema import TextConfig
from neodragon_jax.models.text.clip import CLIPTextEncoder
from neodragon_jax.models.text.context_adapter import ContextAdapter
from neodragon_jax.models.text.distil_t5 import DistilT5
from neodragon_jax.models.text.t5 import T5Encoder


class TextConditioner(nnx.Module):
    """Holds ``clip_l``, ``clip_g`` and either ``t5`` (teacher) or ``distil_t5`` + ``context_adapter``."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.clip_l = CLIPTextEncoder(cfg.clip_l, **kw)
        self.clip_g = CLIPTextEncoder(cfg.clip_g, **kw)
        if cfg.kind == "teacher":
            self.t5 = T5Encoder(cfg.t5, **kw)
        elif cfg.kind == "neodragon":
            if cfg.distil_t5.projection_dim != cfg.context_adapter.in_dim:
                raise ValueError(
                    f"DistilT5 projection_dim ({cfg.distil_t5.projection_dim}) must equal the ContextAdapter "
                    f"in_dim ({cfg.context_adapter.in_dim})"
                )
            self.distil_t5 = DistilT5(cfg.distil_t5, **kw)
            self.context_adapter = ContextAdapter(cfg.context_adapter, **kw)
        else:
            raise ValueError(f"unknown text conditioner kind {cfg.kind!r}: expected 'teacher' or 'neodragon'")

    def encode_tokens(self, t5_ids: jax.Array, t5_mask: jax.Array) -> jax.Array:
        """Only the token stream ``[B,S,token_dim]`` (what text distillation trains)."""
        if self.cfg.kind == "teacher":
            return self.t5(t5_ids, t5_mask)
        return self.context_adapter(self.distil_t5(t5_ids, t5_mask))

    def encode_pooled(self, clip_l_ids: jax.Array, clip_g_ids: jax.Array) -> jax.Array:
        """``concat(clip_l text_embeds, clip_g text_embeds)`` ``[B, pooled_dim]``."""
        _, pooled_l = self.clip_l(clip_l_ids)
        _, pooled_g = self.clip_g(clip_g_ids)
        return jnp.concatenate([pooled_l, pooled_g], axis=-1)

    def __call__(self, t5_ids: jax.Array, t5_mask: jax.Array, clip_l_ids: jax.Array, clip_g_ids: jax.Array):
        """``t5_ids``/``t5_mask`` [B,S], ``clip_l_ids``/``clip_g_ids`` [B,77] ->
        ``(text_tokens [B,S,D], mask [B,S] (``t5_mask`` unchanged), pooled [B,2048])``."""
        batch = {jnp.shape(a)[0] for a in (t5_ids, t5_mask, clip_l_ids, clip_g_ids)}
        if len(batch) != 1:
            raise ValueError(
                "TextConditioner inputs disagree on the batch size: "
                f"t5_ids {jnp.shape(t5_ids)}, t5_mask {jnp.shape(t5_mask)}, clip_l_ids {jnp.shape(clip_l_ids)}, "
                f"clip_g_ids {jnp.shape(clip_g_ids)}"
            )
        tokens = self.encode_tokens(t5_ids, t5_mask)
        pooled = self.encode_pooled(clip_l_ids, clip_g_ids)
        return tokens, t5_mask, pooled
