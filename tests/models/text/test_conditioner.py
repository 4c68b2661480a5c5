"""TextConditioner on the tiny preset: output shapes and composition for both kinds."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.convert.io import param_shapes
from neodragon_jax.convert.keymap import KeyMap
from neodragon_jax.convert.text import fill_from_state_dict, text_conditioner_keymaps
from neodragon_jax.models.text.conditioner import TextConditioner


def random_conditioner(text_cfg, seed=0):
    """Random weights through the production key maps (much cheaper on CPU than compiling every RNG init)."""
    ctor = lambda: TextConditioner(text_cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    maps = text_conditioner_keymaps(text_cfg)
    keymap = KeyMap("text", tuple(e for n, m in maps.items() for e in m.prefixed(f"{n}.", f"{n}.").entries))
    rng = np.random.default_rng(seed)
    shapes = keymap.torch_shapes(param_shapes(nnx.eval_shape(ctor)))
    tensors = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    for e in keymap.entries:  # tied aliases must equal their tensor
        for a in e.aliases:
            tensors[a] = tensors[e.torch_key]
    return fill_from_state_dict(ctor, tensors, keymap)


def inputs(text_cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    s, c = text_cfg.max_length, text_cfg.clip_max_length
    t5_ids = rng.integers(1, text_cfg.t5.vocab_size, size=(batch, s)).astype(np.int32)
    t5_mask = np.ones((batch, s), np.int32)
    t5_mask[1, 5:] = 0
    clip_l = rng.integers(0, text_cfg.clip_l.vocab_size, size=(batch, c)).astype(np.int32)
    clip_g = rng.integers(0, text_cfg.clip_g.vocab_size, size=(batch, c)).astype(np.int32)
    return jnp.asarray(t5_ids), jnp.asarray(t5_mask), jnp.asarray(clip_l), jnp.asarray(clip_g)


@pytest.mark.parametrize("kind", ["teacher", "neodragon"])
def test_conditioner_shapes_and_composition(kind):
    text_cfg = dataclasses.replace(load_config("tiny").model.text, kind=kind)
    model = random_conditioner(text_cfg)
    t5_ids, t5_mask, clip_l, clip_g = inputs(text_cfg)

    @nnx.jit
    def run(m, t5_ids, t5_mask, clip_l, clip_g):
        parts = (m.t5(t5_ids, t5_mask) if kind == "teacher"
                 else m.context_adapter(m.distil_t5(t5_ids, t5_mask)), m.clip_l(clip_l)[1], m.clip_g(clip_g)[1])
        return m(t5_ids, t5_mask, clip_l, clip_g), parts

    (tokens, mask, pooled), (want_tokens, want_l, want_g) = run(model, t5_ids, t5_mask, clip_l, clip_g)

    b, s = t5_ids.shape
    assert tokens.shape == (b, s, text_cfg.token_dim)
    assert pooled.shape == (b, text_cfg.pooled_dim)
    np.testing.assert_array_equal(mask, t5_mask)
    if kind == "teacher":
        assert text_cfg.token_dim == text_cfg.t5.d_model and not hasattr(model, "distil_t5")
    else:
        assert text_cfg.token_dim == text_cfg.context_adapter.out_dim and not hasattr(model, "t5")
    np.testing.assert_allclose(tokens, want_tokens, atol=1e-5, rtol=0)
    # pooled = [clip_l text_embeds, clip_g text_embeds], in that order (the two towers differ, so a swap shows)
    assert not np.allclose(want_l, want_g)
    np.testing.assert_allclose(pooled[:, : text_cfg.clip_l.projection_dim], want_l, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled[:, text_cfg.clip_l.projection_dim :], want_g, atol=1e-5, rtol=0)


def test_conditioner_rejects_mismatched_batch_and_widths():
    text_cfg = dataclasses.replace(load_config("tiny").model.text, kind="neodragon")
    model = nnx.eval_shape(lambda: TextConditioner(text_cfg, rngs=nnx.Rngs(0)))
    t5_ids, t5_mask, clip_l, clip_g = inputs(text_cfg)
    with pytest.raises(ValueError, match="batch size"):
        model(t5_ids, t5_mask, clip_l[:1], clip_g)
    bad = dataclasses.replace(text_cfg, context_adapter=dataclasses.replace(text_cfg.context_adapter, in_dim=65))
    with pytest.raises(ValueError, match="projection_dim"):
        TextConditioner(bad, rngs=nnx.Rngs(0))
