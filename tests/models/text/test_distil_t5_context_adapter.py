"""DistilT5 and ContextAdapter: parity vs torch compositions in the official layout, dropout modes,
full-size parameter counts."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import ContextAdapterConfig, DistilT5Config, T5Config
from neodragon_jax.convert.io import load_state_dict, param_count, param_shapes
from neodragon_jax.convert.text import context_adapter_keymap, distil_t5_keymap, fill_from_state_dict
from neodragon_jax.models.text.context_adapter import ContextAdapter
from neodragon_jax.models.text.distil_t5 import DistilT5

TOL = 1e-5  # max abs error, fp32

SMALL_DT5 = DistilT5Config(
    body=T5Config(vocab_size=80, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=48),
    projection_dim=40,
    head_dropout=0.5,
)
SMALL_CA = ContextAdapterConfig(in_dim=24, hidden_dim=20, num_hidden_layers=4, out_dim=12)


def torch_distil_t5(cfg: DistilT5Config):
    """The official layout: ``encoder`` = transformers T5EncoderModel, ``final_projection`` = Sequential."""
    import torch
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    b = cfg.body
    hf_cfg = HFT5Config(
        vocab_size=b.vocab_size, d_model=b.d_model, d_kv=b.d_kv, d_ff=b.d_ff, num_layers=b.num_layers,
        num_heads=b.num_heads, relative_attention_num_buckets=b.relative_attention_num_buckets,
        relative_attention_max_distance=b.relative_attention_max_distance, dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    )

    class T5EncoderWithProjection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = T5EncoderModel._from_config(hf_cfg, attn_implementation="eager")
            self.final_projection = torch.nn.Sequential(
                torch.nn.Linear(b.d_model, cfg.projection_dim, bias=False),
                torch.nn.ReLU(),
                torch.nn.Dropout(cfg.head_dropout),
                torch.nn.Linear(cfg.projection_dim, cfg.projection_dim, bias=False),
            )

        def forward(self, ids, mask):
            return self.final_projection(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)

    model = T5EncoderWithProjection().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def torch_skip_mlp(cfg: ContextAdapterConfig):
    """Reference SkipMLP written from spec §4.3 / §9.4 (module layout gives the official keys)."""
    import torch
    from torch import nn

    class SkipMLP(nn.Module):
        def __init__(self):
            super().__init__()
            cin, hid = cfg.in_dim, cfg.hidden_dim
            layers = [nn.Sequential(nn.Identity(), nn.Linear(cin, hid), nn.GELU())]
            layers += [nn.Sequential(nn.Identity(), nn.Linear(cin + hid, hid), nn.GELU())
                       for _ in range(cfg.num_hidden_layers - 1)]
            layers.append(nn.Sequential(nn.Linear(cin + hid, cfg.out_dim), nn.Identity()))
            self.network_layers = nn.ModuleList(layers)

        def forward(self, x):
            h = self.network_layers[0](x)
            for layer in self.network_layers[1:]:
                h = layer(torch.cat([x, h], dim=-1))  # original input first
            return h

    return SkipMLP().eval()


@pytest.mark.parity
@pytest.mark.needs_torch
def test_distil_t5_matches_torch_composition():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch_distil_t5(SMALL_DT5)
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    # Same layout as the official checkpoint: doubled encoder prefix, tied embedding alias, head indices 0/3.
    assert {"encoder.shared.weight", "encoder.encoder.embed_tokens.weight", "final_projection.0.weight",
            "final_projection.3.weight"} <= set(tensors)
    model = fill_from_state_dict(lambda: DistilT5(SMALL_DT5, rngs=nnx.Rngs(0)), tensors, distil_t5_keymap(SMALL_DT5))

    rng = np.random.default_rng(0)
    ids = rng.integers(1, SMALL_DT5.body.vocab_size, size=(2, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    got = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))
    err = float(np.max(np.abs(got - want)))
    print(f"DistilT5 parity: max abs err {err:.3g}")
    assert got.shape == (2, 24, SMALL_DT5.projection_dim)
    assert err <= TOL, err


@pytest.mark.parity
@pytest.mark.needs_torch
def test_context_adapter_matches_torch_reference():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch_skip_mlp(SMALL_CA)
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = ContextAdapter(SMALL_CA, rngs=nnx.Rngs(0))
    load_state_dict(model, tensors, context_adapter_keymap(SMALL_CA))
    x = np.random.default_rng(0).normal(size=(2, 7, SMALL_CA.in_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(model(jnp.asarray(x)))
    err = float(np.max(np.abs(got - want)))
    print(f"ContextAdapter parity: max abs err {err:.3g}")
    assert err <= TOL, err


def test_dropout_only_in_training_mode():
    """Body (T5 ``dropout_rate``) and head (``head_dropout``) dropout: off when built, on after ``train()``,
    off again after ``eval()``. One model covers both so the CPU compiles the dropout kernels once."""
    body = dataclasses.replace(SMALL_DT5.body, num_layers=1, dropout_rate=0.2)
    cfg = dataclasses.replace(SMALL_DT5, body=body)
    ctor = lambda: DistilT5(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    keymap = distil_t5_keymap(cfg)
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32)
               for k, s in keymap.torch_shapes(param_shapes(nnx.eval_shape(ctor))).items()}
    tensors["encoder.encoder.embed_tokens.weight"] = tensors["encoder.shared.weight"]
    model = fill_from_state_dict(ctor, tensors, keymap)  # also checks the loader gives dropout an RNG stream
    ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    mask = jnp.ones_like(ids)

    def run():  # eager: cheaper on CPU than compiling the whole graph in both modes
        return model.encoder(ids, mask), model(ids, mask)

    body0, out0 = run()
    np.testing.assert_array_equal(out0, run()[1])  # built in inference mode
    model.train()
    assert model.final_projection.layers[2].deterministic is False
    body1, _ = run()
    body2, _ = run()
    assert not np.allclose(body1, body0) and not np.allclose(body1, body2)  # T5 body dropout, fresh mask per call
    # the head's dropout alone (same body features in and out of training) also changes the output
    model.encoder.eval()
    head_only = model(ids, mask)
    assert not np.allclose(head_only, out0)
    model.eval()
    body3, out3 = run()
    np.testing.assert_array_equal(body3, body0)
    np.testing.assert_array_equal(out3, out0)


def test_context_adapter_rejects_wrong_width():
    model = nnx.eval_shape(lambda: ContextAdapter(SMALL_CA, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="width 24"):
        model(jnp.zeros((1, 3, 23)))


# DistilT5: embedding 32128*768 = 24,674,304 (counted once; the tied alias is not a parameter) + 12 layers *
# 7,079,424 + relative bias 32*12 + final norm 768 + head 768*4096 + 4096*4096 = 129,551,488 (spec §4.2).
# ContextAdapter: 4096*4096+4096 + 3*(8192*4096+4096) + 8192*1536+1536 = 130,041,344 (spec §4.3).
DT5_PARAMS = 129_551_488
CA_PARAMS = 130_041_344


def test_full_size_param_counts():
    assert param_count(nnx.eval_shape(lambda: DistilT5(DistilT5Config(), rngs=nnx.Rngs(0)))) == DT5_PARAMS
    assert param_count(nnx.eval_shape(lambda: ContextAdapter(ContextAdapterConfig(), rngs=nnx.Rngs(0)))) == CA_PARAMS
