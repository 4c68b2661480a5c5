"""T5 v1.1 encoder: bucket function, parity vs transformers' T5EncoderModel (small and full-width), dropout,
and the T5-XXL parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import T5Config
from neodragon_jax.convert.io import load_state_dict, param_count, param_shapes
from neodragon_jax.convert.text import fill_from_state_dict, t5_encoder_keymap
from neodragon_jax.models.text.t5 import T5Encoder, relative_position_buckets

TOL = 1e-5  # max abs error, fp32, for every parity test in this file


def hf_t5(cfg: T5Config):
    """A transformers T5EncoderModel with our config, T5 init, and non-trivial (random) norm weights."""
    import torch
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    hf_cfg = HFT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu",
    )
    model = T5EncoderModel._from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # T5 inits norms to 1: randomise so a missed norm weight shows up
                p.uniform_(0.5, 1.5)
    return model


def torch_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def random_model(ctor, keymap, seed=0):
    """Random weights through the production key map (cheaper on CPU than compiling every RNG init)."""
    rng = np.random.default_rng(seed)
    shapes = keymap.torch_shapes(param_shapes(nnx.eval_shape(ctor)))
    tensors = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    for e in keymap.entries:
        for a in e.aliases:
            tensors[a] = tensors[e.torch_key]
    return fill_from_state_dict(ctor, tensors, keymap)


def padded_batch(rng, vocab: int, s: int, valid: tuple[int, ...]):
    ids = rng.integers(0, vocab, size=(len(valid), s)).astype(np.int64)
    mask = (np.arange(s)[None] < np.asarray(valid)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)  # T5 pads with id 0
    return ids, mask


@pytest.mark.needs_torch
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 64), (16, 32), (64, 256), (8, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 300  # offsets -299..299, well past max_distance and across every log-bucket edge
    ours = relative_position_buckets(n, n, num_buckets=num_buckets, max_distance=max_distance)
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(ours, ref)


def _parity(cfg: T5Config, s: int, valid: tuple[int, ...], *, via_fill: bool):
    import torch

    torch.manual_seed(0)
    ref = hf_t5(cfg)
    tensors = torch_state(ref)
    assert "encoder.embed_tokens.weight" in tensors  # the tied alias is exercised
    keymap = t5_encoder_keymap(cfg)
    if via_fill:  # production loader path, no random init of the (large) JAX model
        model = fill_from_state_dict(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)), tensors, keymap)
    else:
        model = T5Encoder(cfg, rngs=nnx.Rngs(0))
        load_state_dict(model, tensors, keymap)
    ids, mask = padded_batch(np.random.default_rng(1), cfg.vocab_size, s, valid)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))
    err = float(np.max(np.abs(got - want)))
    print(f"T5 parity d_model={cfg.d_model} heads={cfg.num_heads}: max abs err {err:.3g}")
    assert got.shape == want.shape
    assert err <= TOL, err
    return err


@pytest.mark.parity
@pytest.mark.needs_torch
def test_t5_matches_transformers_small_with_padding():
    pytest.importorskip("torch")
    cfg = T5Config(vocab_size=96, d_model=48, num_layers=3, num_heads=4, d_kv=12, d_ff=80)
    # S = 70 covers the offsets 16/32/64 that sit exactly on bucket edges; row 1 is mostly padding.
    _parity(cfg, s=70, valid=(70, 23, 1), via_fill=False)


@pytest.mark.parity
@pytest.mark.needs_torch
def test_t5_matches_transformers_full_width():
    pytest.importorskip("torch")
    # T5-XXL width and head layout (4096 = 64 x 64); depth, vocabulary and d_ff shrunk to stay cheap.
    cfg = T5Config(vocab_size=64, d_model=4096, num_layers=2, num_heads=64, d_kv=64, d_ff=256)
    _parity(cfg, s=20, valid=(20, 9), via_fill=True)


def test_t5_rejects_bad_inputs():
    cfg = T5Config(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))  # inputs are checked before any compute
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integer input_ids"):
        model(jnp.zeros((2, 5), jnp.float32))


# Parameter bookkeeping for T5-XXL: shared embedding 32128*4096 = 131,596,288; per layer q,k,v,o 4*4096^2 +
# wi_0,wi_1,wo 3*4096*10240 + two norms = 192,946,176 (x24 = 4,630,708,224); relative bias 32*64 = 2,048 (layer 0
# only); final norm 4,096. Total 4,762,310,656 = the spec's "4.762B" (the 4.726B/4.732B digests are off).
T5_XXL_PARAMS = 4_762_310_656


def test_t5_xxl_param_count_and_abstract_forward():
    model = nnx.eval_shape(lambda: T5Encoder(T5Config(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert param_count(model) == T5_XXL_PARAMS
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(
        lambda st, i, m: nnx.merge(graphdef, st)(i, m),
        state,
        jax.ShapeDtypeStruct((2, 128), jnp.int32),
        jax.ShapeDtypeStruct((2, 128), jnp.int32),
    )
    assert out.shape == (2, 128, 4096) and out.dtype == jnp.bfloat16
    # The key map covers exactly the model's parameters at full size (relative bias only in block 0).
    keymap = t5_encoder_keymap(T5Config())
    assert keymap.jax_paths() == set(param_shapes(model))
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in keymap.torch_keys()
