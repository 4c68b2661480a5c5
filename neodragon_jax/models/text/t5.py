"""T5 v1.1 encoder (T5-XXL teacher text encoder; also the DistilT5 body), spec §4.1–§4.2.

Module and attribute names follow transformers' ``T5EncoderModel`` (``shared``, ``block.{i}.layer.0
.SelfAttention.{q,k,v,o}``, ``layer.1.DenseReluDense.{wi_0,wi_1,wo}``, ``final_layer_norm``) so the key map
in ``neodragon_jax.convert.text`` is an identity plus the Linear transpose.

T5 conventions that differ from most transformers and are easy to get wrong:

* no ``1/sqrt(K)`` attention scaling (the query init absorbs it);
* a learned relative position bias, bucketed (bidirectional), whose table lives only in layer 0 and is
  reused by every layer;
* RMSNorm without mean subtraction or bias, pre-norm, plus a final norm;
* gated-GELU FFN ``wo(gelu_tanh(wi_0 x) * wi_1 x)``;
* the padding mask hides keys only: padded query rows are still computed (the caller masks them later).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config.schema import T5Config
from neodragon_jax.layers.core import LOGICAL_AXES, RMSNorm, dense

_normal = nnx.initializers.normal


def relative_position_buckets(
    query_length: int, key_length: int, *, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """Bucket index ``[Sq, Sk]`` of each (query, key) offset, exactly as Mesh-TF / transformers compute it.

    Computed in numpy at trace time (the shapes are static) with float32 arithmetic, so the bucket edges
    (offsets 16, 32, 64 with the default 32/128 setting land exactly on a bucket boundary) round the same
    way as transformers' float32 torch code on every backend.
    """
    context = np.arange(query_length, dtype=np.int64)[:, None]
    memory = np.arange(key_length, dtype=np.int64)[None, :]
    rel = memory - context
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # log(0) is never selected (is_small covers it); clamp only to keep numpy quiet.
    scaled = (
        np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def dropout_layer(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    """``nnx.Dropout`` built in inference mode (pretrained text encoders are mostly frozen; ``model.train()``
    turns it on). A zero rate gets no RNG stream, so a dropout-free model carries no RNG state."""
    return nnx.Dropout(rate, deterministic=True, rngs=rngs if rate > 0 else None)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias ``[B|1, N, S, S]``."""

    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # transformers' T5 init: the query absorbs the missing 1/sqrt(K) scale.
        self.q = dense(d, inner, axes=("embed", "heads"), kernel_init=_normal((d * cfg.d_kv) ** -0.5), **common)
        self.k = dense(d, inner, axes=("embed", "heads"), kernel_init=_normal(d**-0.5), **common)
        self.v = dense(d, inner, axes=("embed", "heads"), kernel_init=_normal(d**-0.5), **common)
        self.o = dense(inner, d, axes=("heads", "embed"), kernel_init=_normal(inner**-0.5), **common)
        if has_relative_attention_bias:
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                param_dtype=param_dtype,
                embedding_init=_normal(d**-0.5),
                embedding_metadata={LOGICAL_AXES: (None, None)},
                rngs=rngs,
            )
        self.dropout = dropout_layer(cfg.dropout_rate, rngs)

    def compute_bias(self, query_length: int, key_length: int) -> jax.Array:
        """Relative position bias ``[1, N, Sq, Sk]`` in float32 (layer 0 only)."""
        buckets = relative_position_buckets(
            query_length,
            key_length,
            num_buckets=self.cfg.relative_attention_num_buckets,
            max_distance=self.cfg.relative_attention_max_distance,
        )
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)  # [buckets, N]
        values = jnp.take(table, jnp.asarray(buckets), axis=0)  # [Sq, Sk, N]
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """``x`` [B, S, D], ``bias`` [B|1, N, S, S] float32 (position bias + key padding) -> [B, S, D]."""
        b, s, _ = x.shape
        n, k = self.cfg.num_heads, self.cfg.d_kv
        q = self.q(x).reshape(b, s, n, k)
        key = self.k(x).reshape(b, s, n, k)
        v = self.v(x).reshape(b, s, n, k)
        logits = jnp.einsum("bqnk,bsnk->bnqs", q, key, preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1)
        probs = self.dropout(probs).astype(v.dtype)
        out = jnp.einsum("bnqs,bsnk->bqnk", probs, v).reshape(b, s, n * k)
        return self.o(out)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(
            cfg, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.dropout = dropout_layer(cfg.dropout_rate, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), bias))


class T5DenseGatedActDense(nnx.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)`` (T5 v1.1 "gated-gelu", transformers' ``gelu_new``)."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, m = cfg.d_model, cfg.d_ff
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = dense(d, m, axes=("embed", "mlp"), kernel_init=_normal(d**-0.5), **common)
        self.wi_1 = dense(d, m, axes=("embed", "mlp"), kernel_init=_normal(d**-0.5), **common)
        self.wo = dense(m, d, axes=("mlp", "embed"), kernel_init=_normal(m**-0.5), **common)
        self.dropout = dropout_layer(cfg.dropout_rate, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
        return self.wo(self.dropout(h))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseGatedActDense(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.dropout = dropout_layer(cfg.dropout_rate, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [
                T5LayerSelfAttention(
                    cfg, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                ),
                T5LayerFF(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](x, bias))


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder stack: ``(input_ids [B,S], attention_mask [B,S]) -> hidden [B,S,D]``.

    Dropout (``cfg.dropout_rate``, 0 by default) is built in inference mode; ``model.train()`` enables it
    and ``model.eval()`` disables it again.
    """

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.num_layers < 1:
            raise ValueError(f"T5Config.num_layers must be >= 1, got {cfg.num_layers}")
        self.cfg = cfg
        self.dtype = dtype
        self.shared = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            param_dtype=param_dtype,
            embedding_init=_normal(1.0),
            embedding_metadata={LOGICAL_AXES: ("vocab", "embed")},
            rngs=rngs,
        )
        self.block = nnx.List(
            [
                T5Block(cfg, has_relative_attention_bias=(i == 0), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i in range(cfg.num_layers)
            ]
        )
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.dropout = dropout_layer(cfg.dropout_rate, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """``input_ids`` [B, S] int, ``attention_mask`` [B, S] (1/True = real token) -> [B, S, D] in ``dtype``."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"T5Encoder expects integer input_ids of shape [B, S], got {input_ids.dtype} {input_ids.shape}"
            )
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=bool)
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} must equal input_ids shape {input_ids.shape}"
            )
        s = input_ids.shape[1]
        # Gather from the stored table, then cast: casting the whole 32128-row table every call is wasteful.
        x = jnp.take(self.shared.embedding[...], input_ids, axis=0).astype(self.dtype)
        x = self.dropout(x)
        # Same additive form as transformers (bias + finfo.min on padded keys), so even an all-padding row
        # gives the same (uniform) attention.
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(s, s)
        key_bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        bias = position_bias + key_bias
        for blk in self.block:
            x = blk(x, bias)
        return self.dropout(self.final_layer_norm(x))
