"""Parity against diffusers 0.42.1: our teacher-variant MMDiT given the weights of a small random
``SD3Transformer2DModel`` through the PRODUCTION key map, on one frame with no text padding.

diffusers' SD3 has no RoPE and no causal mask; with one frame every RoPE position is 0 (identity) and
the mask is all-true, so the outputs must agree. Its token order ([image; text]) differs from ours
([text; image]), which attention does not see. Tolerance: max abs error <= 1e-5 in float32.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import MMDiTConfig
from neodragon_jax.convert.mmdit import load_mmdit_weights, pos_embed_table
from neodragon_jax.layers.embeddings import resize_bilinear_np
from neodragon_jax.models.mmdit import abstract_mmdit

TOL = 1e-5  # max abs error, float32

# pos_embed_max_size 24 with sample_size 16 (base grid 8): coordinates index/3 and a 4x6 patch grid
# cropped at rows 10.., cols 9.. — a non-trivial crop of a non-trivially scaled table.
CFG = MMDiTConfig(
    num_layers=3, num_heads=2, head_dim=16, patch_size=2, in_channels=4, pooled_dim=20, context_in_dim=24,
    pos_embed_max_size=24, sample_size=16,
    qk_norm_eps=1e-6,  # diffusers' Attention builds its QK RMSNorms with eps=1e-6
)

# diffusers spells the text-stream QK norms `norm_added_{q,k}`; the official Pyramid Flow / Neodragon
# checkpoints (and our key map) say `norm_add_{q,k}`. Everything else is named identically.
DIFFUSERS_RENAMES = (("attn.norm_added_q.", "attn.norm_add_q."), ("attn.norm_added_k.", "attn.norm_add_k."))


def diffusers_sd3(cfg: MMDiTConfig, seed: int = 0):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim, caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_dim, out_channels=cfg.in_channels,
        pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=(), qk_norm="rms_norm",
    ).eval()
    with torch.no_grad():  # default torch init is random but norms are ones and biases small: perturb all
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def official_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for a, b in DIFFUSERS_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out


@pytest.mark.parity
@pytest.mark.needs_torch
def test_matches_diffusers_sd3_one_frame():
    torch = pytest.importorskip("torch")
    ref = diffusers_sd3(CFG)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert "pos_embed.pos_embed" in state  # persistent buffer: checked by the key map's derived entry
    np.testing.assert_allclose(state["pos_embed.pos_embed"], pos_embed_table(CFG), atol=1e-6, rtol=0)
    ours = abstract_mmdit(CFG)
    load_mmdit_weights(ours, official_names(state))  # strict: every key used, every parameter filled

    rng = np.random.default_rng(0)
    b, h, w, s = 2, 8, 12, 7
    latent = rng.standard_normal((b, CFG.in_channels, h, w)).astype(np.float32)
    text = rng.standard_normal((b, s, CFG.context_in_dim)).astype(np.float32)
    pooled = rng.standard_normal((b, CFG.pooled_dim)).astype(np.float32)
    t = np.asarray([1000.0, 386.25], np.float32)
    with torch.no_grad():
        want = ref(
            hidden_states=torch.from_numpy(latent), encoder_hidden_states=torch.from_numpy(text),
            pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t), return_dict=False,
        )[0].numpy()
    got = nnx.jit(lambda m, *a: m(*a))(
        ours, [jnp.asarray(latent)[:, :, None]], jnp.asarray(text), jnp.ones((b, s), bool), jnp.asarray(pooled),
        jnp.asarray(t),
    )
    got = np.asarray(got)[:, :, 0]
    err = float(np.abs(got - want).max())
    print(f"MMDiT vs diffusers SD3: max abs err {err:.3g} (output max abs {np.abs(want).max():.3g})")
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.1  # a meaningful, non-degenerate output
    assert err <= TOL


@pytest.mark.parity
@pytest.mark.needs_torch
@pytest.mark.parametrize("src,dst", [((8, 12), (4, 6)), ((20, 32), (5, 8)), ((10, 16), (5, 8)), ((7, 9), (3, 5)), ((5, 8), (5, 3))])
def test_bilinear_resize_matches_torch_interpolate(src, dst):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((*src, 6)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode="bilinear", align_corners=False, antialias=False
    )[0].permute(1, 2, 0).numpy()
    # torch interpolates in float32 (a few ulps of rounding on non-integer ratios); we use float64 weights
    np.testing.assert_allclose(resize_bilinear_np(x, *dst), want, atol=4e-6, rtol=0)
    if src[0] % dst[0] == 0 and src[1] % dst[1] == 0:  # the 2x / 4x reductions the pyramid uses
        np.testing.assert_allclose(resize_bilinear_np(x, *dst), want, atol=1e-6, rtol=0)
