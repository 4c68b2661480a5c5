"""DistilT5 (DT5): a T5 v1.1-base-style encoder plus a 768 -> 4096 -> 4096 projection head (spec §4.2).

The official module is ``T5EncoderWithProjection`` with attributes ``encoder`` (a transformers
``T5EncoderModel``, hence the doubled ``encoder.encoder.block...`` keys) and ``final_projection``
(``nn.Sequential(Linear, ReLU, Dropout, Linear)``, keys ``final_projection.0`` / ``.3``). We mirror that:
``encoder`` is our :class:`T5Encoder` and ``final_projection`` an ``nnx.Sequential`` in the same order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config.schema import DistilT5Config
from neodragon_jax.layers.core import dense
from neodragon_jax.models.text.t5 import T5Encoder, dropout_layer


class DistilT5(nnx.Module):
    """``(input_ids [B,S], attention_mask [B,S]) -> [B,S,P]`` tokens in the T5-XXL space (P = 4096).

    The head's dropout (``cfg.head_dropout``, 0.1 officially) and the body's dropout start in inference
    mode (deterministic); ``model.train()`` switches them on, ``model.eval()`` off again. Training-mode
    dropout draws from the ``dropout`` stream of the ``rngs`` given at construction.
    """

    def __init__(self, cfg: DistilT5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = T5Encoder(cfg.body, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, p = cfg.body.d_model, cfg.projection_dim
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_projection = nnx.Sequential(
            dense(d, p, axes=("embed", "mlp"), **common),
            nnx.relu,
            dropout_layer(cfg.head_dropout, rngs),
            dense(p, p, axes=("mlp", "embed"), **common),
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.final_projection(self.encoder(input_ids, attention_mask))
