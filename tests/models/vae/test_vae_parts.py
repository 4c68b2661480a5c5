"""The VAE's two halves as modules (decoder distillation's frozen encoder and trained decoder): sub-trees of
the whole VAE, read from a whole official checkpoint each, strict about their own keys; the light decoder's
spatial / temporal up-sampling flags (4x in space, none in time, for the tiny presets)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.convert.io import write_safetensors
from neodragon_jax.convert.keymap import CheckpointMismatchError
from neodragon_jax.convert.vae import light_decoder_keymap, pf_vae_keymap
from neodragon_jax.models.build import init_jit
from neodragon_jax.models.vae import CausalVideoVAE, VAEDecoderPart, VAEEncoderPart, join_parts
from train.weights import assign, flatten, load_weights

# 4x spatial, no temporal compression (the tiny teacher's layout) at test size.
SMALL = ["model.vae.causal.latent_channels=4", "model.vae.causal.block_out_channels=[8,8]",
         "model.vae.causal.spatial_down=[true,true]", "model.vae.causal.temporal_down=[false,false]",
         "model.vae.causal.norm_groups=0", "model.vae.light_decoder.latent_channels=4",
         "model.vae.light_decoder.channels=[8,8]", "model.vae.light_decoder.blocks_per_stage=1",
         "model.vae.light_decoder.spatial_upscale=[true,true]",
         "model.vae.light_decoder.temporal_upscale=[false,false]"]


def _vae_cfg(*extra):
    return load_config("tiny", SMALL + list(extra)).model.vae


def test_light_decoder_flags_give_4x_space_1x_time_and_streaming_equals_whole_clip():
    cfg = _vae_cfg()
    part = init_jit(lambda: VAEDecoderPart(cfg, decoder="light", rngs=nnx.Rngs(0)))
    assert part.decoder.spatial_factor == 4 and part.decoder.temporal_factor == 1
    z = jax.random.normal(jax.random.key(1), (2, 4, 3, 4, 4))
    whole = part.decode(z)
    assert whole.shape == (2, 3, 3, 16, 16)
    np.testing.assert_allclose(np.asarray(part.decode_stream(z)), np.asarray(whole), atol=1e-5)
    # The stage without spatial up-sampling keeps its (parameter-free) block index: official keys unchanged.
    keys = {frozenset(light_decoder_keymap(dataclasses.replace(cfg.light_decoder, spatial_upscale=f)).torch_keys())
            for f in ((True, True), (False, True), (True, False))}
    assert len(keys) == 1
    with pytest.raises(ValueError, match="up-samples 2x in space"):
        VAEDecoderPart(_vae_cfg("model.vae.light_decoder.spatial_upscale=[true,false]"), decoder="light",
                       rngs=nnx.Rngs(0))


def test_parts_are_subtrees_of_the_whole_vae_and_load_from_its_official_file(tmp_path):
    cfg = _vae_cfg()
    vae = init_jit(lambda: CausalVideoVAE(cfg, decoder="native", rngs=nnx.Rngs(3)))
    flat = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(vae, nnx.Param))).items()}
    folder = tmp_path / "release" / "causal_video_vae"
    folder.mkdir(parents=True)
    write_safetensors(pf_vae_keymap(cfg).to_torch(flat), folder / "diffusion_pytorch_model.safetensors")

    enc = nnx.eval_shape(lambda: VAEEncoderPart(cfg, rngs=nnx.Rngs(0)))
    dec = nnx.eval_shape(lambda: VAEDecoderPart(cfg, decoder="native", rngs=nnx.Rngs(0)))
    got_enc = load_weights(f"official:{tmp_path / 'release'}", enc)  # the whole folder: its causal_video_vae/
    got_dec = load_weights(f"official:{folder}", dec)
    assert set(got_enc) | set(got_dec) == set(flat) and not set(got_enc) & set(got_dec)
    for k, v in {**got_enc, **got_dec}.items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)

    # Strict about its own keys: a light decoder part finds none of its keys in a native VAE's file, and a
    # key of no part at all is still unexpected.
    light = nnx.eval_shape(lambda: VAEDecoderPart(cfg, decoder="light", rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing keys.*decoder\.blocks\.1\.weight"):
        load_weights(f"official:{folder}", light)
    extra = dict(pf_vae_keymap(cfg).to_torch(flat), **{"stray.weight": np.zeros(3, np.float32)})
    write_safetensors(extra, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)unexpected keys.*stray\.weight"):
        load_weights(f"official:{folder}", enc)

    # Together the parts are the whole VAE.
    e = init_jit(lambda: VAEEncoderPart(cfg, rngs=nnx.Rngs(0)))
    d = init_jit(lambda: VAEDecoderPart(cfg, decoder="native", rngs=nnx.Rngs(0)))
    assign(e, got_enc)
    assign(d, got_dec)
    joined = join_parts(e, d)
    x = jax.random.uniform(jax.random.key(2), (1, 3, 3, 16, 16), minval=-1, maxval=1)
    np.testing.assert_allclose(np.asarray(joined(x)), np.asarray(vae(x)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(d.decode(e.encode(x).mean)), np.asarray(vae(x)), atol=1e-5)
    assert jnp.shape(e.encode(x).mean) == (1, 4, 3, 4, 4)
