"""MMDiT key maps: the full official key sets map completely onto our (abstract, full-size) parameter trees
with exact shapes and pinned parameter counts; a small random checkpoint loads from safetensors; strictness."""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import MMDiTConfig
from neodragon_jax.convert import CheckpointMismatchError, export_state_dict, param_arrays, write_safetensors
from neodragon_jax.convert.io import param_count, param_shapes
from neodragon_jax.convert.keymap import to_jax_layout, torch_shape
from neodragon_jax.convert.mmdit import (
    infer_mmdit_config,
    load_mmdit_weights,
    mmdit_from_checkpoint,
    mmdit_keymap,
    pos_embed_shape,
    pos_embed_table,
)
from neodragon_jax.models.mmdit import abstract_mmdit

FULL = {
    # official state dict name -> (config, exact parameter count without the sin-cos buffer)
    "neodragon_mmdit_18": (MMDiTConfig(num_layers=18), 1_512_155_200),
    "pf_sd3_mmdit_24": (MMDiTConfig(num_layers=24, context_in_dim=4096), 2_028_334_144),
    "neodragon_mmdit_18_plusCE": (MMDiTConfig(num_layers=18, context_in_dim=4096), 1_518_448_192),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_official_key_sets_map_completely_at_full_size(name, official_shapes):
    cfg, count = FULL[name]
    official = {k: tuple(v) for k, v in official_shapes[name].items()}
    model = abstract_mmdit(cfg, param_dtype=jnp.bfloat16)  # shapes only: nothing is allocated
    shapes = param_shapes(model)
    km = mmdit_keymap(cfg)
    assert km.torch_keys() == set(official)
    assert km.jax_paths() == set(shapes)
    for e in km.entries:
        want = official[e.torch_key]
        got = pos_embed_shape(cfg) if e.jax_path is None else torch_shape(shapes[e.jax_path], e.layout)
        assert got == want, e.torch_key
    assert param_count(model) == count
    assert sum(int(np.prod(s)) for k, s in official.items() if k != "pos_embed.pos_embed") == count
    # infer the config back from the key set alone (zero-cost broadcast views stand in for tensors)
    fake = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in official.items()}
    inferred = infer_mmdit_config(fake)
    assert (inferred.num_layers, inferred.context_in_dim) == (cfg.num_layers, cfg.context_in_dim)


SMALL = MMDiTConfig(
    num_layers=3, num_heads=2, head_dim=8, in_channels=4, pooled_dim=12, context_in_dim=10,
    pos_embed_max_size=12, sample_size=8,
)


def random_official_state(cfg: MMDiTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict with the official names and PyTorch layouts (from the key map alone)."""
    rng = np.random.default_rng(seed)
    km = mmdit_keymap(cfg)
    shapes = param_shapes(abstract_mmdit(cfg))
    out = {}
    for e in km.entries:
        if e.jax_path is None:
            out[e.torch_key] = e.derive()
        else:
            out[e.torch_key] = rng.standard_normal(torch_shape(shapes[e.jax_path], e.layout)).astype(np.float32)
    return out


def test_load_small_random_checkpoint_from_safetensors(tmp_path):
    state = random_official_state(SMALL)
    write_safetensors(state, tmp_path / "diffusion_pytorch_model.safetensors")
    model = mmdit_from_checkpoint(SMALL, tmp_path)
    arrays = param_arrays(model)
    km = mmdit_keymap(SMALL)
    for e in km.entries:
        if e.jax_path is not None:
            np.testing.assert_array_equal(arrays[e.jax_path], to_jax_layout(state[e.torch_key], e.layout))
    # named spot checks of the two renamed ModuleList entries and a layout transform
    np.testing.assert_array_equal(arrays["transformer_blocks.0.attn.to_out.kernel"], state["transformer_blocks.0.attn.to_out.0.weight"].T)
    np.testing.assert_array_equal(arrays["transformer_blocks.1.ff_context.proj_in.kernel"], state["transformer_blocks.1.ff_context.net.0.proj.weight"].T)
    np.testing.assert_array_equal(arrays["pos_embed.proj.kernel"], state["pos_embed.proj.weight"].transpose(2, 3, 1, 0))
    # export is the exact inverse (the PyTorch mirror gets the official keys back, buffer included)
    back = export_state_dict(model, km)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    # and the loaded model runs
    b = 1
    out = nnx.jit(lambda m, *a: m(*a))(
        model, [jnp.ones((b, 4, 1, 8, 8))], jnp.ones((b, 5, 10)), jnp.ones((b, 5), bool), jnp.ones((b, 12)),
        jnp.asarray([500.0]),
    )
    assert out.shape == (b, 4, 1, 8, 8) and np.isfinite(np.asarray(out)).all()


def test_bf16_checkpoint_buffer_is_accepted():
    # the official file is bf16: its sin-cos buffer must pass the derived-entry check
    state = random_official_state(SMALL)
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    model = abstract_mmdit(SMALL, param_dtype=jnp.bfloat16)
    load_mmdit_weights(model, state)
    assert param_arrays(model)["proj_out.kernel"].dtype == jnp.bfloat16


def test_strictness_lists_every_problem():
    state = random_official_state(SMALL)
    bad = dict(state)
    del bad["transformer_blocks.1.attn.norm_add_k.weight"]
    bad["transformer_blocks.2.attn.to_add_out.weight"] = np.zeros((16, 16), np.float32)  # last block has none
    bad["proj_out.weight"] = np.zeros((32, 16), np.float32)
    bad["pos_embed.pos_embed"] = state["pos_embed.pos_embed"] + 0.1
    with pytest.raises(CheckpointMismatchError) as info:
        load_mmdit_weights(abstract_mmdit(SMALL), bad)
    err = info.value
    assert err.missing == ["transformer_blocks.1.attn.norm_add_k.weight"]
    assert err.unexpected == ["transformer_blocks.2.attn.to_add_out.weight"]
    assert [m[0] for m in err.misshaped] == ["proj_out.weight"]
    assert any("pos_embed.pos_embed" in m for m in err.mismatched)
    # a teacher checkpoint (with context embedder) does not load into the student layout, and says why
    student = dataclasses.replace(SMALL, context_in_dim=None)
    with pytest.raises(CheckpointMismatchError, match="context_embedder.weight"):
        load_mmdit_weights(abstract_mmdit(student), state)


def test_derived_table_is_the_model_table():
    # the buffer written on export is the table the model crops from (centre crop of the full grid)
    from neodragon_jax.layers.embeddings import sincos_2d_crop

    t = pos_embed_table(SMALL)[0].reshape(12, 12, SMALL.hidden_size)
    np.testing.assert_array_equal(sincos_2d_crop(SMALL.hidden_size, 12, 4, 4, 6), t[4:8, 3:9])
