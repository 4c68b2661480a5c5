"""PyTorch mirror of the pyramidal MMDiT: official state-dict keys/shapes at full size (meta device), parity
with the JAX model on multi-clip pyramid inputs with text padding, the static (padded) entry, and the
bit-identical JAX -> PyTorch -> JAX round trip through the shared key map.

Tolerances (float32): max abs error <= 1e-5 on the velocity (outputs of magnitude ~1-5) once the timestep
frequency table is aligned (see ``test_timestep_sinusoid``); <= 1e-4 with each side's own table.
"""

import contextlib
import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from export.convert import from_mirror, random_weights, to_mirror, torch_state_dict  # noqa: E402
from export.mirror.mmdit import PyramidMMDiT as TorchMMDiT  # noqa: E402
from export.mirror.mmdit import timestep_freqs, timestep_sinusoid  # noqa: E402
from neodragon_jax.config import load_config  # noqa: E402
from neodragon_jax.config.schema import MMDiTConfig  # noqa: E402
from neodragon_jax.convert.io import param_arrays  # noqa: E402
from neodragon_jax.layers.embeddings import timestep_sinusoid as jax_sinusoid  # noqa: E402
from neodragon_jax.models.mmdit import PyramidMMDiT, abstract_mmdit  # noqa: E402

pytestmark = [pytest.mark.needs_torch]

TOL = 1e-5  # max abs error, float32, aligned frequency table
TOL_OWN_FREQS = 1e-4  # each framework's own float32 exp() for the timestep frequencies
TINY = load_config("tiny").model.mmdit  # teacher layout: 4 blocks, width 64, context embedder 64 -> 64
TINY_NEO = dataclasses.replace(TINY, context_in_dim=None)  # Neodragon layout: no context embedder

# Clip layouts (F, H, W) of the tiny latent pyramid (stage 2 = 8x8 latents, patch 2):
LAYOUTS = {
    # unit 2, stage 2: frame 0 at stage 1, frame 1 at stage 2, current
    "unit2_stage2": [(1, 4, 4), (1, 8, 8), (1, 8, 8)],
    # unit 4, stage 2: frames 0-1 grouped at stage 0 (a 1x1 patch grid), frame 2 at stage 1, frame 3 at stage 2
    "unit4_stage2": [(2, 2, 2), (1, 4, 4), (1, 8, 8), (1, 8, 8)],
    # unit 1, stage 0: one history frame at stage 0 beside the current 2x2 latent
    "unit1_stage0": [(1, 2, 2), (1, 2, 2)],
}


def jax_freqs() -> np.ndarray:
    return np.array(jnp.exp(-math.log(10000.0) * jnp.arange(128, dtype=jnp.float32) / 128))  # writable copy


def make_pair(cfg: MMDiTConfig, seed: int = 0):
    model = random_weights(abstract_mmdit(cfg), seed)
    return model, to_mirror(model)


@contextlib.contextmanager
def aligned_freqs(mirror):
    """Temporarily give the mirror the JAX timestep frequency table (see ``test_timestep_sinusoid``)."""
    buf = mirror.time_text_embed.timestep_freqs
    own = buf.clone()
    buf.copy_(torch.from_numpy(jax_freqs()))
    try:
        yield mirror
    finally:
        buf.copy_(own)


@pytest.fixture(scope="module")
def pairs():
    """One random (JAX model, mirror) pair per layout variant, shared by the tests that only read them."""
    return {"teacher": make_pair(TINY, seed=1), "neodragon": make_pair(TINY_NEO, seed=1)}


def make_inputs(cfg: MMDiTConfig, layout, seed: int = 0, b: int = 2, s: int = 8):
    rng = np.random.default_rng(seed)
    clips = [rng.standard_normal((b, cfg.in_channels, f, h, w)).astype(np.float32) for f, h, w in layout]
    text = rng.standard_normal((b, s, cfg.context_in_dim or cfg.hidden_size)).astype(np.float32)
    mask = np.ones((b, s), bool)
    mask[0, 5:] = False  # padded T5 positions differ per sample
    mask[1, 3:] = False
    pooled = rng.standard_normal((b, cfg.pooled_dim)).astype(np.float32)
    t = np.asarray([1000.0, 386.0][:b], np.float32)
    return clips, text, mask, pooled, t


@nnx.jit
def jax_forward(model, clips, text, mask, pooled, t):
    return model(clips, text, mask, pooled, t)


def torch_forward(mirror, clips, text, mask, pooled, t, history_valid=None):
    with torch.no_grad():
        out = mirror([torch.from_numpy(c) for c in clips], torch.from_numpy(text), torch.from_numpy(mask),
                     torch.from_numpy(pooled), torch.from_numpy(t),
                     None if history_valid is None else torch.from_numpy(history_valid))
    return out.numpy()


# ---- full size on the meta device ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("neodragon_mmdit_18", MMDiTConfig()),
        ("pf_sd3_mmdit_24", MMDiTConfig(num_layers=24, context_in_dim=4096)),
        ("neodragon_mmdit_18_plusCE", MMDiTConfig(context_in_dim=4096)),
    ],
)
def test_full_size_state_dict_is_the_official_one(name, cfg, official_shapes):
    with torch.device("meta"):
        mirror = TorchMMDiT(cfg)
    got = {k: list(v.shape) for k, v in mirror.state_dict().items()}
    want = official_shapes[name]
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    n_params = sum(p.numel() for p in mirror.parameters())
    if name == "neodragon_mmdit_18":
        assert n_params == 1_512_155_200  # spec §2.1, excluding the PE buffer
    if name == "pf_sd3_mmdit_24":
        assert n_params == 2_028_334_144


def test_full_size_mirror_keys_equal_the_key_map():
    """The mirror and the JAX key map agree on every key and shape (abstract JAX model, meta mirror)."""
    from export.convert import keymap_for
    from neodragon_jax.convert.io import param_shapes

    cfg = MMDiTConfig()
    model = abstract_mmdit(cfg)
    want = keymap_for(model).torch_shapes(param_shapes(model))
    with torch.device("meta"):
        got = {k: tuple(v.shape) for k, v in TorchMMDiT(cfg).state_dict().items()}
    assert got == want


# ---- parity -------------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize(
    "variant,layout",
    [("teacher", "unit2_stage2"), ("neodragon", "unit4_stage2"), ("neodragon", "unit1_stage0")],
    ids=["teacher-unit2_stage2", "neodragon-unit4_stage2", "neodragon-unit1_stage0"],
)
def test_matches_jax_on_pyramid_inputs(pairs, variant, layout):
    model, mirror = pairs[variant]
    cfg = model.cfg
    inputs = make_inputs(cfg, LAYOUTS[layout])
    got = np.asarray(jax_forward(model, [jnp.asarray(c) for c in inputs[0]], *map(jnp.asarray, inputs[1:])))
    own = torch_forward(mirror, *inputs)
    with aligned_freqs(mirror):
        aligned = torch_forward(mirror, *inputs)
    err, err_own = float(np.abs(got - aligned).max()), float(np.abs(got - own).max())
    print(f"MMDiT {layout}: max abs err {err:.3g} (own freq tables {err_own:.3g}), output max {np.abs(got).max():.3g}")
    assert got.shape == aligned.shape == inputs[0][-1].shape  # velocity of the current clip only
    assert np.abs(got).max() > 0.5  # non-degenerate: random non-zero AdaLN / proj_out weights
    assert err <= TOL
    assert err_own <= TOL_OWN_FREQS


@pytest.mark.parity
def test_history_and_padding_matter(pairs):
    """The comparison above can fail: the history clips and the text padding change the output."""
    _, mirror = pairs["teacher"]
    clips, text, mask, pooled, t = make_inputs(TINY, LAYOUTS["unit2_stage2"])
    base = torch_forward(mirror, clips, text, mask, pooled, t)
    other_hist = [clips[0] + 1.0] + clips[1:]
    assert np.abs(torch_forward(mirror, other_hist, text, mask, pooled, t) - base).max() > 1e-3
    other_pad = text.copy()
    other_pad[0, 6] += 5.0  # a padded position of sample 0: invisible
    assert np.abs(torch_forward(mirror, clips, other_pad, mask, pooled, t) - base).max() == 0.0
    other_real = text.copy()
    other_real[0, 1] += 5.0  # a real position: visible
    assert np.abs(torch_forward(mirror, clips, other_real, mask, pooled, t) - base).max() > 1e-3


@pytest.mark.parity
def test_static_padded_entry_matches_jax(pairs):
    """``history_valid`` (export's static graph): padded history slots are masked, real positions kept."""
    model, mirror = pairs["neodragon"]
    clips, text, mask, pooled, t = make_inputs(TINY_NEO, LAYOUTS["unit4_stage2"])
    valid = np.asarray([[False, True, True], [True, True, True]])
    clips[0][0] = 0.0  # the padded slot of sample 0 holds zeros
    got = np.asarray(
        nnx.jit(lambda m, c, v, *a: m.forward_static(c, v, *a))(
            model, [jnp.asarray(c) for c in clips], jnp.asarray(valid), *map(jnp.asarray, (text, mask, pooled, t))
        )
    )
    with aligned_freqs(mirror):
        want = torch_forward(mirror, clips, text, mask, pooled, t, history_valid=valid)
        # sample 0 equals an unpadded call without the first clip
        unpadded = torch_forward(mirror, [c[:1] for c in clips[1:]], text[:1], mask[:1], pooled[:1], t[:1])
    assert float(np.abs(got - want).max()) <= TOL
    assert float(np.abs(want[:1] - unpadded).max()) <= TOL


def test_pos_embed_buffer():
    """A fresh mirror's sin-cos buffer is the JAX table; a loaded (e.g. bf16-rounded) buffer is kept, as
    ``load_state_dict`` does for the official file; a meta build loaded with ``assign=True`` has no meta left."""
    from export.convert import load_mirror
    from neodragon_jax.convert.mmdit import pos_embed_table

    fresh = TorchMMDiT(TINY_NEO)
    assert np.abs(fresh.pos_embed.pos_embed.numpy() - pos_embed_table(TINY_NEO)).max() <= 1e-6
    state = fresh.state_dict()
    state["pos_embed.pos_embed"] = state["pos_embed.pos_embed"].to(torch.bfloat16).float()
    loaded = load_mirror(lambda: TorchMMDiT(TINY_NEO), state)
    assert torch.equal(loaded.pos_embed.pos_embed, state["pos_embed.pos_embed"])
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert torch.equal(loaded.time_text_embed.timestep_freqs, timestep_freqs())


def test_timestep_sinusoid():
    """cos-first sinusoid; at t ~ 1000 one float32 ulp of a frequency moves the argument by ~6e-5, so the
    XLA-CPU and torch float32 exp() tables give sinusoids that differ by up to ~1e-4 (both ~4e-5 from the
    float64 value). Everything downstream is compared with aligned tables."""
    t = np.asarray([0.0, 1.0, 386.0, 744.0, 1000.0], np.float32)
    exact = np.asarray(t, np.float64)[:, None] * np.exp(-math.log(10000.0) * np.arange(128) / 128)
    exact = np.concatenate([np.cos(exact), np.sin(exact)], 1)
    ours = timestep_sinusoid(torch.from_numpy(t)).numpy()
    assert np.abs(ours - exact).max() <= 1e-4
    assert np.abs(ours[:2] - exact[:2]).max() <= 1e-6  # small t: no amplification
    aligned = timestep_sinusoid(torch.from_numpy(t), torch.from_numpy(jax_freqs())).numpy()
    assert np.abs(aligned - np.asarray(jax_sinusoid(jnp.asarray(t)))).max() <= 1e-6
    assert timestep_freqs().shape == (128,)


# ---- conversion -------------------------------------------------------------------------------------------------


def test_jax_torch_jax_round_trip_is_bit_identical(pairs):
    model, mirror = pairs["teacher"]
    sd = mirror.state_dict()
    want = torch_state_dict(model)
    assert set(sd) == set(want)
    assert all(np.array_equal(sd[k].numpy(), want[k]) for k in want)
    back = from_mirror(mirror, lambda: PyramidMMDiT(TINY, rngs=nnx.Rngs(0)))
    a, b = param_arrays(model), param_arrays(back)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_mirror_backward_runs_and_reaches_every_parameter():
    _, mirror = make_pair(TINY_NEO, seed=5)  # own pair: backward fills .grad
    clips, text, mask, pooled, t = make_inputs(TINY_NEO, LAYOUTS["unit2_stage2"])
    out = mirror([torch.from_numpy(c) for c in clips], torch.from_numpy(text), torch.from_numpy(mask),
                 torch.from_numpy(pooled), torch.from_numpy(t))
    out.square().mean().backward()
    no_grad = {n for n, p in mirror.named_parameters() if p.grad is None or not torch.any(p.grad != 0)}
    # Only the last block's text queries are dead: its text output is discarded (keys/values still feed
    # the image tokens).
    last = f"transformer_blocks.{TINY_NEO.num_layers - 1}.attn"
    assert no_grad == {f"{last}.add_q_proj.weight", f"{last}.add_q_proj.bias", f"{last}.norm_add_q.weight"}


def test_bad_inputs_are_named(pairs):
    _, mirror = pairs["neodragon"]
    clips, text, mask, pooled, t = make_inputs(TINY_NEO, LAYOUTS["unit2_stage2"])
    big_first = [clips[1], clips[0]]
    with pytest.raises(ValueError, match="larger than the current clip"):
        torch_forward(mirror, big_first, text, mask, pooled, t)
    with pytest.raises(ValueError, match="text_tokens"):
        torch_forward(mirror, clips, text[..., :5], mask, pooled, t)
