"""CLIP text transformer with projection (CLIP-L/14 and OpenCLIP bigG/14 text towers), spec §4.1.

Mirrors transformers' ``CLIPTextModelWithProjection``: ``text_model.embeddings.{token,position}_embedding``,
``text_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}``,
``text_model.final_layer_norm`` and ``text_projection`` (no bias). Causal self-attention, pre-LayerNorm,
quick-GELU (CLIP-L) or exact GELU (bigG), final LayerNorm, pooled vector at the EOS token, projected.

Pooling rule (transformers 5.24 ``CLIPTextTransformer.forward``, copied exactly):

* ``eos_token_id == 2`` (configs written before transformers PR #24773, e.g. the SD3 / Pyramid Flow text
  encoders): the position of the LARGEST token id in each row (``argmax(input_ids)``); with the real CLIP
  vocabularies that is the first ``<|endoftext|>`` (49407, the largest id).
* otherwise: the FIRST position whose id equals ``eos_token_id`` (position 0 if the row has none, as
  ``argmax`` of an all-false row gives).

SD3 / Pyramid Flow use only the projected pooled vector (``text_embeds``); SD3's token stream also takes the
penultimate hidden state, available with ``output_hidden_states=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config.schema import CLIPTextConfig
from neodragon_jax.layers.core import LOGICAL_AXES, dense

_normal = nnx.initializers.normal

# Configs written before transformers PR #24773 carry eos_token_id=2; transformers keeps their argmax pooling.
LEGACY_EOS_TOKEN_ID = 2


class LayerNorm(nnx.Module):
    """LayerNorm with affine ``scale``/``bias``, computed in float32 with torch's two-pass variance.

    Written out rather than ``nnx.LayerNorm`` because that one draws two RNG keys for its constant inits,
    and every RNG draw makes ``nnx.eval_shape`` of a full-size model noticeably slower (bigG has 65 norms).
    """

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **{LOGICAL_AXES: ("norm",)})
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), **{LOGICAL_AXES: ("norm",)})

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, param_dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, embedding_init=_normal(0.02),
            embedding_metadata={LOGICAL_AXES: ("vocab", "embed")}, rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, param_dtype=param_dtype, embedding_init=_normal(0.02),
            embedding_metadata={LOGICAL_AXES: (None, "embed")}, rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, dtype) -> jax.Array:
        s = input_ids.shape[1]
        tok = jnp.take(self.token_embedding.embedding[...], input_ids, axis=0)
        pos = self.position_embedding.embedding[...][:s]
        return (tok + pos[None]).astype(dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        in_std = d**-0.5 * (2 * cfg.num_layers) ** -0.5
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, d, axes=("embed", "heads"), kernel_init=_normal(in_std), **common)
        self.k_proj = dense(d, d, axes=("embed", "heads"), kernel_init=_normal(in_std), **common)
        self.v_proj = dense(d, d, axes=("embed", "heads"), kernel_init=_normal(in_std), **common)
        self.out_proj = dense(d, d, axes=("heads", "embed"), kernel_init=_normal(d**-0.5), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, d = x.shape
        n = self.cfg.num_heads
        q = self.q_proj(x).reshape(b, s, n, d // n)
        k = self.k_proj(x).reshape(b, s, n, d // n)
        v = self.v_proj(x).reshape(b, s, n, d // n)
        # XLA path: logits and softmax in float32, scale 1/sqrt(K), causal.
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.reshape(b, s, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, m = cfg.hidden_size, cfg.intermediate_size
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported CLIP hidden_act {cfg.hidden_act!r}: expected 'quick_gelu' (CLIP-L) or 'gelu' (bigG)"
            )
        self.hidden_act = cfg.hidden_act
        self.fc1 = dense(d, m, axes=("embed", "mlp"), kernel_init=_normal((2 * d) ** -0.5), **common)
        self.fc2 = dense(
            m, d, axes=("mlp", "embed"), kernel_init=_normal(d**-0.5 * (2 * cfg.num_layers) ** -0.5), **common
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        )


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(cfg, param_dtype=param_dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Pooling position per row ``[B]`` under transformers' rule (see the module docstring)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEncoder(nnx.Module):
    """``input_ids [B,S] -> (last_hidden [B,S,D], pooled_projected [B,P])`` (S <= 77)."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = dense(
            cfg.hidden_size, cfg.projection_dim, axes=("embed", None), use_bias=False, dtype=dtype,
            param_dtype=param_dtype, kernel_init=_normal(cfg.hidden_size**-0.5), rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False):
        """Returns ``(last_hidden [B,S,D], text_embeds [B,P])``; with ``output_hidden_states`` also the
        tuple of ``num_layers + 1`` residual-stream states ``[B,S,D]`` (embeddings, then after each layer,
        before the final LayerNorm; transformers' ``hidden_states``, SD3 uses ``[-2]``)."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"CLIPTextEncoder expects integer input_ids of shape [B, S], got {input_ids.dtype} {input_ids.shape}"
            )
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings}: tokenize with truncation to {self.cfg.max_position_embeddings}"
            )
        tm = self.text_model
        x = tm.embeddings(input_ids, self.dtype)
        states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            states.append(x)
        last = tm.final_layer_norm(x)
        pos = eos_positions(input_ids, self.cfg.eos_token_id)
        pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
        text_embeds = self.text_projection(pooled)
        if output_hidden_states:
            return last, text_embeds, tuple(states)
        return last, text_embeds
