"""The teacher MMDiT's ``context_embedder`` on its own (spec §4.1, §4.4): Linear T5 width -> MMDiT width.

Text-encoder distillation targets the DiT's own text tokens ``CE(T5(p))``, so the CE is needed without the
2B-parameter MMDiT around it. The attribute name, logical axes, init and numerics are the MMDiT's
(``PyramidMMDiT.context_embedder``): the official keys ``context_embedder.{weight,bias}`` of a
``diffusion_transformer_*`` folder fill it (``neodragon_jax.convert.registry`` kind ``context_embedder``, a
part of the ``mmdit`` component's file).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.layers.core import as_dtype, dense
from neodragon_jax.layers.embeddings import normal_init


class ContextEmbedder(nnx.Module):
    """``x [B, S, in_dim] -> [B, S, out_dim]`` float32, exactly as inside the teacher MMDiT."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.dtype = as_dtype(dtype)
        self.context_embedder = dense(self.in_dim, self.out_dim, axes=(None, "embed"), kernel_init=normal_init(0.02),
                                      dtype=self.dtype, param_dtype=as_dtype(param_dtype), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"ContextEmbedder expects features of width {self.in_dim}, got shape {x.shape}")
        return self.context_embedder(x.astype(self.dtype)).astype(jnp.float32)
