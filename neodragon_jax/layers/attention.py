"""Joint (text + image) attention of the MMDiT with QK RMSNorm, temporal RoPE and the pyramid mask.

Spec §2.3 / §2.5. Per sample the sequence is ``[text (S); image (L)]``; ``allowed(i, j)`` needs equal
token ids and ``pos_i >= pos_j`` (temporal causality). Ids: padded text 0, real tokens 1, padded image
slots of the static entry point 2 — so real tokens never see padding and every row keeps at least itself.
Text tokens sit at RoPE position 0 (their rotation is the identity, so it is skipped).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.layers.core import RMSNorm, dense
from neodragon_jax.layers.embeddings import apply_rope

# Additive bias of a disallowed (query, key) pair. -1e4 is exactly representable in fp16/bf16/fp32 (the
# fp16 NPU export can use the same constant, spec §8.2) and exp(-1e4) underflows to exactly 0 in float32,
# so masked keys contribute nothing while real logits stay far smaller: with QK RMSNorm
# |logit| <= sqrt(K) * max|w_q| * max|w_k| (8 * ... for K = 64).
MASK_BIAS = -1.0e4

TEXT_PAD_ID, REAL_ID, IMAGE_PAD_ID = 0, 1, 2


def joint_attention_bias(
    text_mask: jax.Array,
    image_ids,
    image_pos,
) -> jax.Array:
    """Additive bias ``[B, 1, S+L, S+L]`` float32 for the sequence ``[text; image]``.

    ``text_mask [B, S]`` (true = real token), ``image_ids [B|1, L]`` (1 real, 2 padding slot),
    ``image_pos [B|1, L]`` frame indices. Text has position 0.
    """
    b, s = text_mask.shape
    text_ids = jnp.where(text_mask.astype(bool), REAL_ID, TEXT_PAD_ID).astype(jnp.int32)
    image_ids = jnp.broadcast_to(jnp.asarray(image_ids, jnp.int32), (b, np.shape(image_ids)[-1]))
    image_pos = jnp.broadcast_to(jnp.asarray(image_pos, jnp.int32), image_ids.shape)
    ids = jnp.concatenate([text_ids, image_ids], axis=1)
    pos = jnp.concatenate([jnp.zeros((b, s), jnp.int32), image_pos], axis=1)
    allowed = (ids[:, :, None] == ids[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
    return jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)[:, None]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """``[B, T, N, K] x3, bias [B, 1, T, T] -> [B, T, N, K]``; scale ``1/sqrt(K)``, softmax in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(jnp.float32), scale=scale)


class JointAttention(nnx.Module):
    """SD3 joint attention (official names ``to_q/k/v``, ``add_{q,k,v}_proj``, ``to_out.0``, ``to_add_out``).

    ``context_pre_only``: the last block's layout, whose text output is discarded (no ``to_add_out``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        qk_norm_eps: float,
        context_pre_only: bool,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.context_pre_only = context_pre_only
        inner = num_heads * head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.to_k = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.to_v = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.add_q_proj = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.add_k_proj = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.add_v_proj = dense(dim, inner, axes=("embed", "heads"), **kw)
        norm = lambda: RMSNorm(head_dim, eps=qk_norm_eps, param_dtype=param_dtype)  # noqa: E731
        self.norm_q, self.norm_k = norm(), norm()
        self.norm_add_q, self.norm_add_k = norm(), norm()
        # Official key `to_out.0` (a ModuleList with a parameter-free dropout at index 1).
        self.to_out = dense(inner, dim, axes=("heads", "embed"), **kw)
        self.to_add_out = None if context_pre_only else dense(inner, dim, axes=("heads", "embed"), **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        rope_cos: jax.Array,
        rope_sin: jax.Array,
        bias: jax.Array,
    ) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, L, D]`` image, ``c [B, S, D]`` text (both already modulated), RoPE ``[B|1, L, K/2]``.

        Returns image ``[B, L, D]`` and text ``[B, S, D]`` outputs (text ``None`` when context_pre_only).
        """
        s = c.shape[1]
        q = apply_rope(self.norm_q(self._heads(self.to_q(x))), rope_cos, rope_sin)
        k = apply_rope(self.norm_k(self._heads(self.to_k(x))), rope_cos, rope_sin)
        v = self._heads(self.to_v(x))
        cq = self.norm_add_q(self._heads(self.add_q_proj(c)))
        ck = self.norm_add_k(self._heads(self.add_k_proj(c)))
        cv = self._heads(self.add_v_proj(c))
        dt = v.dtype
        out = masked_attention(
            jnp.concatenate([cq.astype(dt), q.astype(dt)], axis=1),
            jnp.concatenate([ck.astype(dt), k.astype(dt)], axis=1),
            jnp.concatenate([cv, v], axis=1),
            bias,
        )
        out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
        x_out = self.to_out(out[:, s:])
        c_out = None if self.to_add_out is None else self.to_add_out(out[:, :s])
        return x_out, c_out
