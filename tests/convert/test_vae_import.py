"""VAE key maps: the official key sets map exactly onto our parameter trees (full size, abstract only),
pinned parameter counts, and strict loading of small random safetensors checkpoints (spec §9.5, §9.6)."""

import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.config.schema import VAEConfig
from neodragon_jax.convert import CheckpointMismatchError, export_state_dict, param_arrays, param_count, param_shapes
from neodragon_jax.convert.io import write_safetensors
from neodragon_jax.convert.vae import (
    asym_vae_keymap,
    encoder_keymap,
    light_decoder_keymap,
    load_vae,
    native_decoder_keymap,
    pf_vae_keymap,
    vae_keymap,
)
from neodragon_jax.models.vae import AsymmetricVAE, CausalVideoVAE


def _abstract(kind: str, cfg: VAEConfig):
    if kind == "asym_vae":
        return nnx.eval_shape(lambda: AsymmetricVAE(cfg, rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda: CausalVideoVAE(cfg, decoder="native", rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def full_models():
    cfg = VAEConfig()
    return {k: _abstract(k, cfg) for k in ("asym_vae", "pf_vae")}


@pytest.mark.parametrize("kind", ["asym_vae", "pf_vae"])
def test_full_size_keys_map_exactly(kind, full_models, official_shapes):
    model = full_models[kind]
    keymap = asym_vae_keymap(VAEConfig()) if kind == "asym_vae" else pf_vae_keymap(VAEConfig())
    shapes = param_shapes(model)
    assert keymap.jax_paths() == set(shapes)  # every parameter filled by exactly one key
    ours = keymap.torch_shapes(shapes)
    official = {k: tuple(v) for k, v in official_shapes[kind].items()}
    assert set(ours) == set(official), (sorted(set(ours) - set(official))[:5], sorted(set(official) - set(ours))[:5])
    bad = {k: (ours[k], official[k]) for k in ours if ours[k] != official[k]}
    assert not bad, bad
    assert len(ours) == (180 if kind == "asym_vae" else 260)


def test_full_size_param_counts(full_models, official_shapes):
    """Spec §5: encoder 109.63M, native decoder 225.77M ("226M"), light decoder 9.91M.

    Each figure is the module alone: the encoder excludes ``quant_conv`` (1,056), both decoders exclude
    ``post_quant_conv`` (272).
    """
    asym, pf = full_models["asym_vae"], full_models["pf_vae"]
    assert param_count(asym.encoder) == param_count(pf.encoder) == 109_632_032
    assert param_count(asym.quant_conv) == 1_056 and param_count(asym.post_quant_conv) == 272
    assert param_count(pf.decoder) == 225_768_707
    assert param_count(asym.decoder) == 9_910_147
    assert round(param_count(asym.encoder) / 1e6, 2) == 109.63
    assert round(param_count(pf.decoder) / 1e6, 2) == 225.77
    assert round(param_count(asym.decoder) / 1e6, 2) == 9.91
    for kind, model in (("asym_vae", asym), ("pf_vae", pf)):
        assert param_count(model) == sum(int(np.prod(s)) for s in official_shapes[kind].values())


def test_component_keymaps_cover_components(full_models):
    asym, pf = full_models["asym_vae"], full_models["pf_vae"]
    cfg = VAEConfig()
    assert encoder_keymap(cfg.causal).jax_paths() == set(param_shapes(pf.encoder))
    assert native_decoder_keymap(cfg.causal).jax_paths() == set(param_shapes(pf.decoder))
    assert light_decoder_keymap(cfg.light_decoder).jax_paths() == set(param_shapes(asym.decoder))


def _zeros_model(ctor):
    """A concrete model with zero weights built from its abstract shapes (no initialiser compiles)."""
    import jax
    import jax.numpy as jnp

    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))


@pytest.mark.parametrize("kind", ["asym_vae", "pf_vae"])
def test_load_small_checkpoint(kind, tmp_path):
    """A random official-format safetensors checkpoint loads strictly and exports back bit-identically."""
    cfg = load_config("tiny").model.vae
    decoder = "light" if kind == "asym_vae" else "native"
    model = _zeros_model(lambda: CausalVideoVAE(cfg, decoder=decoder, rngs=nnx.Rngs(0)))
    keymap = vae_keymap(model)
    assert keymap.component == kind
    rng = np.random.default_rng(0)
    tensors = {
        k: rng.standard_normal(s).astype(np.float32) for k, s in keymap.torch_shapes(param_shapes(model)).items()
    }
    # Official layouts: Conv3d [O, I, kT, kH, kW], Linear [out, in].
    assert tensors["encoder.conv_in.conv.weight"].shape == (16, 3, 3, 3, 3)
    assert tensors["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_safetensors(tensors, path)

    load_vae(model, tmp_path)
    arrays = param_arrays(model)
    # Spot-check the layout transforms: Conv3d OIDHW -> DHWIO, Linear [out, in] -> [in, out].
    np.testing.assert_array_equal(
        arrays["encoder.conv_in.conv.kernel"], tensors["encoder.conv_in.conv.weight"].transpose(2, 3, 4, 1, 0)
    )
    np.testing.assert_array_equal(
        arrays["encoder.mid_block.attentions.0.to_out.0.kernel"],
        tensors["encoder.mid_block.attentions.0.to_out.0.weight"].T,
    )
    np.testing.assert_array_equal(arrays["encoder.conv_norm_out.scale"], tensors["encoder.conv_norm_out.weight"])
    back = export_state_dict(model, keymap)
    assert set(back) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k], err_msg=k)

    # Strictness: one missing, one unexpected and one mis-shaped key are all reported at once.
    broken = dict(tensors)
    missing = "quant_conv.conv.bias"
    del broken[missing]
    broken["decoder.extra.weight"] = np.zeros((1,), np.float32)
    misshaped = "encoder.conv_out.conv.weight"
    broken[misshaped] = np.zeros((1, 2, 3, 3, 3), np.float32)
    write_safetensors(broken, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_vae(model, path)
    assert err.value.missing == [missing]
    assert err.value.unexpected == ["decoder.extra.weight"]
    assert [m[0] for m in err.value.misshaped] == [misshaped]


def test_wrong_decoder_kind_is_reported(tmp_path):
    """An asymmetric checkpoint loaded into a native-decoder model names the decoder keys that differ."""
    cfg = load_config("tiny").model.vae
    src = nnx.eval_shape(lambda: AsymmetricVAE(cfg, rngs=nnx.Rngs(0)))
    fake = {k: np.zeros(s, np.float32) for k, s in asym_vae_keymap(cfg).torch_shapes(param_shapes(src)).items()}
    write_safetensors(fake, tmp_path / "model.safetensors")
    native = _zeros_model(lambda: CausalVideoVAE(cfg, decoder="native", rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointMismatchError) as err:
        load_vae(native, tmp_path)
    assert any(k.startswith("decoder.blocks.") for k in err.value.unexpected)
    assert any(k.startswith("decoder.up_blocks.") for k in err.value.missing)
    assert not any(k.startswith("encoder.") for k in err.value.missing + err.value.unexpected)
