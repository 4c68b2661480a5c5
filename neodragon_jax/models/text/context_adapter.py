"""ContextAdapter (CA): the SkipMLP mapping DistilT5 tokens to MMDiT context tokens (spec §4.3, §9.4).

Layer 0: ``h = gelu(W0 x)``; layers 1..n-1: ``h = gelu(Wi [x; h])``; output: ``y = Wout [x; h]`` (no
activation). ``[x; h]`` is the concatenation with the ORIGINAL input first. GELU is the exact (erf) one.
Official keys: ``network_layers.{i}.1.*`` for the hidden layers (the Linear sits at index 1 of
``(Identity, Linear, GELU)``) and ``network_layers.{n}.0.*`` for the output layer (``(Linear, Identity)``);
we keep the five Linears in one ``nnx.List`` and let the key map add those indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config.schema import ContextAdapterConfig
from neodragon_jax.layers.core import dense


class ContextAdapter(nnx.Module):
    """``x [B,S,C_in] -> [B,S,C_out]`` (4096 -> 1536 at full size)."""

    def __init__(self, cfg: ContextAdapterConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.num_hidden_layers < 1:
            raise ValueError(f"ContextAdapterConfig.num_hidden_layers must be >= 1, got {cfg.num_hidden_layers}")
        self.cfg = cfg
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        skip_in = cfg.in_dim + cfg.hidden_dim
        layers = [dense(cfg.in_dim, cfg.hidden_dim, axes=("embed", "mlp"), **common)]
        layers += [
            dense(skip_in, cfg.hidden_dim, axes=("embed", "mlp"), **common) for _ in range(cfg.num_hidden_layers - 1)
        ]
        layers.append(dense(skip_in, cfg.out_dim, axes=("mlp", "embed"), **common))
        self.network_layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"ContextAdapter expects features of width {self.cfg.in_dim}, got shape {x.shape}")
        h = jax.nn.gelu(self.network_layers[0](x), approximate=False)
        for layer in self.network_layers[1:-1]:
            h = jax.nn.gelu(layer(jnp.concatenate([x, h.astype(x.dtype)], axis=-1)), approximate=False)
        return self.network_layers[-1](jnp.concatenate([x, h.astype(x.dtype)], axis=-1))
