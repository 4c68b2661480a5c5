"""CLIP text tower: parity vs transformers' CLIPTextModelWithProjection (quick-GELU and exact GELU, both
pooling rules), hidden states for SD3-style use, full-size parameter counts."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import CLIPTextConfig, TextConfig
from neodragon_jax.convert.io import param_count
from neodragon_jax.convert.text import clip_text_keymap, fill_from_state_dict
from neodragon_jax.models.text.clip import CLIPTextEncoder, eos_positions

TOL = 1e-5  # max abs error, fp32


def small_cfg(hidden_act: str, eos_token_id: int, pad_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=100, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
        max_position_embeddings=20, projection_dim=24, hidden_act=hidden_act,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def hf_clip(cfg: CLIPTextConfig):
    import torch
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModelWithProjection

    hf_cfg = HFCLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, projection_dim=cfg.projection_dim,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.vocab_size - 2,
    )
    model = CLIPTextModelWithProjection._from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):  # default 1/0: randomise so mistakes show
                p.add_(0.2 * torch.randn_like(p))
    return model


def prompts(cfg: CLIPTextConfig, lengths, rng) -> np.ndarray:
    """Rows as a CLIP tokenizer makes them: BOS, words, EOS, then padding (pad id)."""
    s = cfg.max_position_embeddings
    bos = cfg.vocab_size - 2
    eos = cfg.eos_token_id if cfg.eos_token_id != 2 else cfg.vocab_size - 1  # legacy: EOS is the largest id
    ids = np.full((len(lengths), s), cfg.pad_token_id, dtype=np.int64)
    for r, n in enumerate(lengths):
        ids[r, 0] = bos
        ids[r, 1 : n + 1] = rng.integers(3, cfg.vocab_size - 3, size=n)
        ids[r, n + 1] = eos
    return ids


@pytest.mark.parity
@pytest.mark.needs_torch
@pytest.mark.parametrize(
    "hidden_act,eos_token_id,pad_token_id",
    [
        ("quick_gelu", 2, 1),  # CLIP-L as shipped in SD3/PF: legacy eos id 2 -> argmax(input_ids) pooling
        ("gelu", 2, 0),  # bigG as shipped in SD3/PF
        ("quick_gelu", 99, 99),  # modern config, pad == eos: pool at the FIRST eos
        ("gelu", 97, 0),  # modern config, eos 97 is not the largest id in the rows
    ],
)
def test_clip_matches_transformers(hidden_act, eos_token_id, pad_token_id):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = small_cfg(hidden_act, eos_token_id, pad_token_id)
    ref = hf_clip(cfg)
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = fill_from_state_dict(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0)), tensors, clip_text_keymap(cfg))

    rng = np.random.default_rng(0)
    ids = prompts(cfg, [3, 10, 18], rng)
    if eos_token_id == 97:
        ids[:, 1] = 98  # a token id larger than EOS before it: argmax pooling would pick the wrong place
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    last, pooled, states = nnx.jit(lambda m, i: m(i, output_hidden_states=True))(model, jnp.asarray(ids))
    errs = {
        "last_hidden": float(np.max(np.abs(np.asarray(last) - out.last_hidden_state.numpy()))),
        "text_embeds": float(np.max(np.abs(np.asarray(pooled) - out.text_embeds.numpy()))),
        "hidden_states": max(
            float(np.max(np.abs(np.asarray(a) - b.numpy()))) for a, b in zip(states, out.hidden_states, strict=True)
        ),
    }
    print(f"CLIP parity {hidden_act} eos={eos_token_id}: {errs}")
    assert len(states) == len(out.hidden_states) == cfg.num_layers + 1
    assert all(e <= TOL for e in errs.values()), errs


def test_pooling_rule():
    ids = jnp.asarray([[5, 7, 49407, 49407, 49407], [5, 49407, 3, 0, 0]])
    np.testing.assert_array_equal(eos_positions(ids, 49407), [2, 1])  # first occurrence
    ids = jnp.asarray([[5, 9, 7, 1, 1]])
    np.testing.assert_array_equal(eos_positions(ids, 2), [1])  # legacy: argmax of the ids


def test_clip_rejects_too_long_sequence():
    cfg = small_cfg("gelu", 2, 0)
    model = nnx.eval_shape(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, cfg.max_position_embeddings + 1), jnp.int32))


# CLIP-L/14 text + projection: token 49408*768 + position 77*768 + 12 layers * 7,087,872 + final LN 1,536 +
# projection 768*768 = 123,650,304 (spec "≈123.7M"). bigG/14: 49408*1280 + 77*1280 + 32 * 19,677,440 + 2,560 +
# 1280*1280 = 694,659,840 (spec "≈694.7M"). The non-persistent position_ids buffer is not a parameter.
CLIP_L_PARAMS = 123_650_304
CLIP_BIGG_PARAMS = 694_659_840


def test_full_size_param_counts():
    text = TextConfig()
    clip_l = nnx.eval_shape(lambda: CLIPTextEncoder(text.clip_l, rngs=nnx.Rngs(0)))
    clip_g = nnx.eval_shape(lambda: CLIPTextEncoder(text.clip_g, rngs=nnx.Rngs(0)))
    assert param_count(clip_l) == CLIP_L_PARAMS
    assert param_count(clip_g) == CLIP_BIGG_PARAMS
