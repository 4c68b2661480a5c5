"""Text-encoder key maps vs the official key sets, import strictness, and the safetensors loaders."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.config.schema import ContextAdapterConfig, DistilT5Config
from neodragon_jax.convert import CheckpointMismatchError, CheckpointNotFoundError, write_safetensors
from neodragon_jax.convert.io import param_arrays, param_shapes
from neodragon_jax.convert.text import (
    CLIP_LEGACY_POSITION_IDS,
    clip_text_keymap,
    context_adapter_keymap,
    distil_t5_keymap,
    fill_from_state_dict,
    load_clip_text,
    load_context_adapter,
    load_distil_t5,
    load_t5_encoder,
    load_text_conditioner,
    t5_encoder_keymap,
)
from neodragon_jax.models.text.clip import CLIPTextEncoder
from neodragon_jax.models.text.context_adapter import ContextAdapter
from neodragon_jax.models.text.distil_t5 import DistilT5
from neodragon_jax.models.text.t5 import T5Encoder

TINY = load_config("tiny").model.text


def random_state(keymap, ctor, seed=0, dtype=np.float32):
    """A state dict in the torch layout with random values (tied aliases equal to their tensor)."""
    rng = np.random.default_rng(seed)
    shapes = keymap.torch_shapes(param_shapes(nnx.eval_shape(ctor)))
    out = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    for e in keymap.entries:
        for a in e.aliases:
            out[a] = out[e.torch_key]
    return out


# ---- official key sets (spec state_dict_shapes.json), abstract shapes only ---------------------------


def test_distil_t5_keymap_covers_official_keys_exactly(official_shapes):
    model = nnx.eval_shape(lambda: DistilT5(DistilT5Config(), rngs=nnx.Rngs(0)))
    ours = distil_t5_keymap(DistilT5Config()).torch_shapes(param_shapes(model))
    official = {k: tuple(v) for k, v in official_shapes["distil_t5"].items()}
    assert set(ours) == set(official), (sorted(set(ours) - set(official)), sorted(set(official) - set(ours)))
    assert ours == official


def test_context_adapter_keymap_covers_official_keys_exactly(official_shapes):
    model = nnx.eval_shape(lambda: ContextAdapter(ContextAdapterConfig(), rngs=nnx.Rngs(0)))
    ours = context_adapter_keymap(ContextAdapterConfig()).torch_shapes(param_shapes(model))
    assert ours == {k: tuple(v) for k, v in official_shapes["context_adapter"].items()}


@pytest.mark.parametrize(
    "name,make,keymap_fn",
    [
        ("t5", lambda c: T5Encoder(c.t5, rngs=nnx.Rngs(0)), lambda c: t5_encoder_keymap(c.t5)),
        ("distil_t5", lambda c: DistilT5(c.distil_t5, rngs=nnx.Rngs(0)), lambda c: distil_t5_keymap(c.distil_t5)),
        ("clip_g", lambda c: CLIPTextEncoder(c.clip_g, rngs=nnx.Rngs(0)), lambda c: clip_text_keymap(c.clip_g)),
    ],
)
def test_keymaps_use_every_parameter_once(name, make, keymap_fn):
    model = nnx.eval_shape(lambda: make(TINY))
    assert keymap_fn(TINY).jax_paths() == set(param_shapes(model)), name


# ---- strictness ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dt5():
    ctor = lambda: DistilT5(TINY.distil_t5, rngs=nnx.Rngs(0))  # noqa: E731
    keymap = distil_t5_keymap(TINY.distil_t5)
    return ctor, keymap, random_state(keymap, ctor)


def test_import_round_trip_is_bit_identical(tiny_dt5):
    ctor, keymap, tensors = tiny_dt5
    model = fill_from_state_dict(ctor, tensors, keymap)
    back = keymap.to_torch(param_arrays(model))
    assert set(back) == set(tensors)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_missing_key_is_named(tiny_dt5):
    ctor, keymap, tensors = tiny_dt5
    broken = dict(tensors)
    del broken["encoder.encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys[\s\S]*block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        fill_from_state_dict(ctor, broken, keymap)


def test_extra_key_is_named(tiny_dt5):
    ctor, keymap, tensors = tiny_dt5
    broken = dict(tensors, **{"encoder.encoder.block.0.layer.0.SelfAttention.q.bias": np.zeros(32, np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys[\s\S]*SelfAttention\.q\.bias"):
        fill_from_state_dict(ctor, broken, keymap)


def test_misshaped_key_is_named(tiny_dt5):
    ctor, keymap, tensors = tiny_dt5
    broken = dict(tensors, **{"final_projection.3.weight": np.zeros((64, 63), np.float32)})
    msg = r"final_projection\.3\.weight: checkpoint \(64, 63\), model expects \(64, 64\)"
    with pytest.raises(CheckpointMismatchError, match=msg):
        fill_from_state_dict(ctor, broken, keymap)


def test_untied_embedding_alias_is_rejected(tiny_dt5):
    ctor, keymap, tensors = tiny_dt5
    broken = dict(tensors)
    broken["encoder.encoder.embed_tokens.weight"] = tensors["encoder.shared.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match="embed_tokens.weight differs"):
        fill_from_state_dict(ctor, broken, keymap)


def test_alias_may_be_absent(tiny_dt5):
    # save_pretrained drops tied copies: a checkpoint with only `shared` must load.
    ctor, keymap, tensors = tiny_dt5
    fill_from_state_dict(ctor, {k: v for k, v in tensors.items() if "embed_tokens" not in k}, keymap)


# ---- loaders ---------------------------------------------------------------------------------------


def test_load_t5_sharded_fp16_folder(tmp_path):
    cfg = TINY.t5
    ctor = lambda: T5Encoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    tensors = random_state(t5_encoder_keymap(cfg), ctor, dtype=np.float16)
    tensors.pop("encoder.embed_tokens.weight")  # as save_pretrained writes it
    folder = tmp_path / "text_encoder_3"
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        write_safetensors({k: tensors[k] for k in ks}, folder / name)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}})
    )
    model = load_t5_encoder(folder, cfg, param_dtype=jnp.float32)
    emb = model.shared.embedding[...]
    assert emb.dtype == jnp.float32
    np.testing.assert_array_equal(emb, tensors["shared.weight"].astype(np.float32))
    q = model.block[1].layer[0].SelfAttention.q.kernel[...]
    np.testing.assert_array_equal(q, tensors["encoder.block.1.layer.0.SelfAttention.q.weight"].astype(np.float32).T)
    out = model(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    assert out.shape == (1, 4, cfg.d_model) and np.isfinite(np.asarray(out)).all()


def test_load_distil_t5_from_a_file_path(tmp_path, tiny_dt5):
    _, _, tensors = tiny_dt5
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    write_safetensors(half, tmp_path / "distil_t5.safetensors")
    model = load_distil_t5(tmp_path / "distil_t5.safetensors", TINY.distil_t5, param_dtype=jnp.bfloat16)
    kernel = model.final_projection.layers[0].kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel, half["final_projection.0.weight"].T.astype(jnp.bfloat16))


def test_load_clip_accepts_legacy_position_ids_and_rejects_wrong_ones(tmp_path):
    cfg = TINY.clip_l
    tensors = random_state(clip_text_keymap(cfg), lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0)))
    good = dict(tensors, **{CLIP_LEGACY_POSITION_IDS: np.arange(cfg.max_position_embeddings)[None]})
    write_safetensors(good, tmp_path / "good" / "model.safetensors")
    model = load_clip_text(tmp_path / "good", cfg)
    np.testing.assert_array_equal(
        model.text_projection.kernel[...], tensors["text_projection.weight"].T
    )
    bad = dict(tensors, **{CLIP_LEGACY_POSITION_IDS: np.arange(cfg.max_position_embeddings)[None][:, ::-1].copy()})
    write_safetensors(bad, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="position_ids"):
        load_clip_text(tmp_path / "bad", cfg)


def test_missing_checkpoint_names_path_and_layout(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nowhere[\s\S]*T5EncoderModel[\s\S]*model\.safetensors"):
        load_t5_encoder(tmp_path / "nowhere", TINY.t5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"empty[\s\S]*network_layers"):
        load_context_adapter(tmp_path / "empty", TINY.context_adapter)


def test_load_text_conditioner_neodragon(tmp_path):
    cfg = dataclasses.replace(TINY, kind="neodragon")
    parts = {
        "clip_l": (clip_text_keymap(cfg.clip_l), lambda: CLIPTextEncoder(cfg.clip_l, rngs=nnx.Rngs(0))),
        "clip_g": (clip_text_keymap(cfg.clip_g), lambda: CLIPTextEncoder(cfg.clip_g, rngs=nnx.Rngs(0))),
        "distil_t5": (distil_t5_keymap(cfg.distil_t5), lambda: DistilT5(cfg.distil_t5, rngs=nnx.Rngs(0))),
        "context_adapter": (context_adapter_keymap(cfg.context_adapter),
                            lambda: ContextAdapter(cfg.context_adapter, rngs=nnx.Rngs(0))),
    }
    saved = {}
    for i, (name, (km, ctor)) in enumerate(parts.items()):
        saved[name] = random_state(km, ctor, seed=i, dtype=np.float16)
        write_safetensors(saved[name], tmp_path / name / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['context_adapter'\]"):
        load_text_conditioner(cfg, **{n: tmp_path / n for n in ("clip_l", "clip_g", "distil_t5")})
    model = load_text_conditioner(cfg, **{n: tmp_path / n for n in parts})
    np.testing.assert_array_equal(
        model.context_adapter.network_layers[4].bias[...],
        saved["context_adapter"]["network_layers.4.0.bias"].astype(np.float32),
    )
    np.testing.assert_array_equal(
        model.clip_g.text_model.final_layer_norm.scale[...],
        saved["clip_g"]["text_model.final_layer_norm.weight"].astype(np.float32),
    )
    # The head dropout's RNG stream was materialised, so training mode runs.
    model.train()
    assert model.distil_t5.final_projection.layers[2].rngs is not None
