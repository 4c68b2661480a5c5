"""Pyramidal MMDiT: init, positional tables, causality / text-padding masks, taps, remat, pruning, the
padded static entry point and input validation. Tiny widths; every model gets random non-zero weights
(the from-scratch init zeroes the modulation and output layers, which would hide most bugs)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config.schema import MMDiTConfig
from neodragon_jax.convert.io import param_variables
from neodragon_jax.layers.attention import MASK_BIAS, joint_attention_bias
from neodragon_jax.layers.embeddings import (
    bilinear_matrix,
    clip_pos_embed,
    resize_bilinear_np,
    sincos_2d_crop,
    sincos_2d_table,
    timestep_sinusoid,
)
from neodragon_jax.models.mmdit import PyramidMMDiT, abstract_mmdit, init_mmdit, prune

CFG = MMDiTConfig(
    num_layers=2, num_heads=2, head_dim=8, in_channels=4, pooled_dim=12, context_in_dim=None,
    pos_embed_max_size=16, sample_size=8,
)
D = CFG.hidden_size


def randomize(model: nnx.Module, seed: int = 0, scale: float = 0.3) -> nnx.Module:
    """Random non-zero weights (norm weights around 1) in place."""
    rng = np.random.default_rng(seed)
    for path, var in sorted(param_variables(model).items()):
        shape = var.get_value().shape
        if path.endswith(".weight"):  # RMSNorm scales
            val = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            fan_in = shape[0] if len(shape) == 2 else (int(np.prod(shape[:-1])) if len(shape) > 2 else 1)
            val = rng.standard_normal(shape) * (scale if len(shape) == 1 else 1.0 / math.sqrt(fan_in))
        var.set_value(jnp.asarray(np.asarray(val, var.get_value().dtype)))
    return model


def make_model(cfg=CFG, seed=0):
    # abstract construction + numpy values: no per-parameter eager init programs to compile
    return randomize(abstract_mmdit(cfg), seed)


def inputs(rng, b=2, s=6, text_dim=D, grids=((4, 4), (8, 8), (8, 8)), frames=None, c=4):
    frames = frames or [1] * len(grids)
    clips = [jnp.asarray(rng.standard_normal((b, c, f, h, w)), jnp.float32) for f, (h, w) in zip(frames, grids)]
    text = jnp.asarray(rng.standard_normal((b, s, text_dim)), jnp.float32)
    mask = jnp.ones((b, s), bool)
    pooled = jnp.asarray(rng.standard_normal((b, CFG.pooled_dim)), jnp.float32)
    t = jnp.asarray([1000.0, 386.0][:b] + [744.0] * max(0, b - 2), jnp.float32)
    return clips, text, mask, pooled, t


@nnx.jit(static_argnames=("return_taps",))
def run(model, clips, text, mask, pooled, t, return_taps=False):
    return model(clips, text, mask, pooled, t, return_taps=return_taps)


# ---- init -------------------------------------------------------------------------------------------


def test_from_scratch_init():
    model = init_mmdit(CFG, seed=0)
    v = {k: np.asarray(x.get_value()) for k, x in param_variables(model).items()}
    zero = [k for k in v if ".norm1.linear." in k or ".norm1_context.linear." in k or k.startswith(("norm_out.", "proj_out."))]
    assert len(zero) == 4 * CFG.num_layers + 4
    for k in zero:
        assert not v[k].any(), k
    for k in v:
        if k.endswith(".bias"):
            assert not v[k].any(), k
    # N(0, 0.02) conditioning MLPs
    w = v["time_text_embed.timestep_embedder.linear_1.kernel"]
    assert 0.015 < w.std() < 0.025
    # Xavier-uniform linears / patch conv (the conv like a Linear over C*p*p inputs)
    for k, fan_in, fan_out in [("transformer_blocks.0.attn.to_q.kernel", D, D), ("pos_embed.proj.kernel", 16, D)]:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(v[k]).max() <= bound and np.abs(v[k]).max() > 0.8 * bound, k
    # Zero-initialised output: the untrained model predicts zero velocity.
    out = run(model, *inputs(np.random.default_rng(0)))
    assert out.shape == (2, 4, 1, 8, 8) and not np.asarray(out).any()


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="remat"):
        PyramidMMDiT(dataclasses.replace(CFG, remat="sometimes"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="teacher_block_indices"):
        PyramidMMDiT(dataclasses.replace(CFG, teacher_block_indices=(0, 1, 2)), rngs=nnx.Rngs(0))
    model = make_model()
    clips, text, mask, pooled, t = inputs(np.random.default_rng(0))
    with pytest.raises(ValueError, match="channels-first"):
        model([clips[-1][:, :3]], text, mask, pooled, t)
    with pytest.raises(ValueError, match="larger than the current clip"):
        model([clips[-1], clips[0]], text, mask, pooled, t)
    with pytest.raises(ValueError, match="model width"):
        model(clips, text[..., :5], mask, pooled, t)
    with pytest.raises(ValueError, match="multiple of the patch"):
        model([clips[-1][..., :7]], text, mask, pooled, t)


# ---- embeddings -------------------------------------------------------------------------------------


def test_timestep_sinusoid_cos_first():
    e = np.asarray(timestep_sinusoid(jnp.asarray([0.0, 1000.0])))
    assert np.allclose(e[0, :128], 1) and np.allclose(e[0, 128:], 0)
    f = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    assert np.allclose(e[1, :128], np.cos(1000 * f), atol=2e-4) and np.allclose(e[1, 128:], np.sin(1000 * f), atol=2e-4)


def test_sincos_table_layout_and_crop():
    dim, grid, base = 16, 12, 4
    table = sincos_2d_table(dim, grid, base)[0].reshape(grid, grid, dim)
    # first half encodes the column, second the row; coordinate = index / (grid / base)
    r, c = 5, 7
    pos_c, pos_r = c / 3, r / 3
    w = 1.0 / 10000 ** (np.arange(4) / 4)
    assert np.allclose(table[r, c, :8], np.concatenate([np.sin(pos_c * w), np.cos(pos_c * w)]), atol=1e-6)
    assert np.allclose(table[r, c, 8:], np.concatenate([np.sin(pos_r * w), np.cos(pos_r * w)]), atol=1e-6)
    crop = sincos_2d_crop(dim, grid, base, 4, 6)
    assert np.array_equal(crop, table[4:8, 3:9])
    # spec §2.4: a 5x8 grid in the 192 table starts at row 93, col 92
    big = sincos_2d_crop(8, 192, 64, 5, 8)
    assert np.allclose(big[0, 0, 4:6], [np.sin(93 / 3), np.sin(93 / 3 * 0.01)], atol=1e-6)
    assert np.allclose(big[0, 0, 0], np.sin(92 / 3), atol=1e-6)


def test_bilinear_resize_reductions():
    x = np.random.default_rng(0).standard_normal((8, 12, 3)).astype(np.float32)
    half = x.reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert np.allclose(resize_bilinear_np(x, 4, 6), half, atol=1e-6)
    quarter = x.reshape(2, 4, 3, 4, 3)[:, 1:3, :, 1:3].mean(axis=(1, 3))  # central 2x2 of every 4x4
    assert np.allclose(resize_bilinear_np(x, 2, 3), quarter, atol=1e-6)
    m = bilinear_matrix(5, 3)
    assert np.allclose(m.sum(1), 1) and (m >= 0).all()
    # history PE = the current clip's crop resized, not the history grid's own crop
    pe = clip_pos_embed(16, 12, 4, 2, 3, 4, 6).reshape(2, 3, 16)
    assert np.allclose(pe, resize_bilinear_np(sincos_2d_crop(16, 12, 4, 4, 6), 2, 3))
    assert not np.allclose(pe, sincos_2d_crop(16, 12, 4, 2, 3))


# ---- masks ------------------------------------------------------------------------------------------


def test_attention_bias_rules():
    text_mask = jnp.asarray([[True, True, False]])
    ids = np.asarray([[1, 1, 1, 2]])
    pos = np.asarray([[0, 1, 1, 2]])
    allowed = np.asarray(joint_attention_bias(text_mask, ids, pos))[0, 0] == 0
    assert set(np.unique(np.asarray(joint_attention_bias(text_mask, ids, pos)))) == {0.0, MASK_BIAS}
    # order: text 0,1 (real), 2 (pad); image frame0, frame1, frame1, pad-slot
    expect = np.array(
        [
            [1, 1, 0, 1, 0, 0, 0],  # real text sees real text and frame 0 only
            [1, 1, 0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0],  # padded text sees padded text only
            [1, 1, 0, 1, 0, 0, 0],  # frame 0: text + frame 0
            [1, 1, 0, 1, 1, 1, 0],  # frame 1: text + frames 0..1
            [1, 1, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],  # padding slot: itself only
        ],
        bool,
    )
    assert np.array_equal(allowed, expect)


def test_temporal_causality_and_text_padding():
    model = make_model()
    rng = np.random.default_rng(1)
    # two history frames (one 2-frame clip of 4x4 latents) + a 2-frame current clip
    clips, text, mask, pooled, t = inputs(rng, grids=((4, 4), (8, 8)), frames=[2, 2])
    mask = mask.at[0, 4:].set(False).at[1, 5:].set(False)
    out, taps = run(model, clips, text, mask, pooled, t, return_taps=True)
    n0 = 2 * 2 * 2  # tokens of the history clip: frames 0 and 1, 2x2 patches each
    per_frame_cur = 4 * 4

    # change the last frame of the current clip: no earlier frame's tokens (nor text) may move
    cur = clips[-1].at[:, :, 1].add(1.0)
    out2, taps2 = run(model, [clips[0], cur], text, mask, pooled, t, return_taps=True)
    early = n0 + per_frame_cur  # frames 0, 1, 2
    for k in range(CFG.num_layers):
        np.testing.assert_array_equal(np.asarray(taps[k]["img_out"])[:, :early], np.asarray(taps2[k]["img_out"])[:, :early])
        if taps[k]["txt_out"] is not None:
            np.testing.assert_array_equal(np.asarray(taps[k]["txt_out"]), np.asarray(taps2[k]["txt_out"]))
    np.testing.assert_array_equal(np.asarray(out)[:, :, 0], np.asarray(out2)[:, :, 0])
    assert not np.allclose(np.asarray(out)[:, :, 1], np.asarray(out2)[:, :, 1])  # the changed frame does move

    # change history frame 1: frame 0 tokens and the text stay, everything later moves
    h = clips[0].at[:, :, 1].add(1.0)
    _, taps3 = run(model, [h, clips[1]], text, mask, pooled, t, return_taps=True)
    last = taps[-1]["img_out"]
    np.testing.assert_array_equal(np.asarray(last)[:, :4], np.asarray(taps3[-1]["img_out"])[:, :4])
    assert not np.allclose(np.asarray(last)[:, 4:], np.asarray(taps3[-1]["img_out"])[:, 4:])

    # change frame 0: the text stream (which sees frame 0) does move
    h0 = clips[0].at[:, :, 0].add(1.0)
    _, taps4 = run(model, [h0, clips[1]], text, mask, pooled, t, return_taps=True)
    assert not np.allclose(np.asarray(taps[0]["txt_out"]), np.asarray(taps4[0]["txt_out"]))

    # padded text tokens never change the output; real ones do
    text_pad = text.at[0, 4:].set(5.0).at[1, 5:].set(-3.0)
    np.testing.assert_array_equal(np.asarray(run(model, clips, text_pad, mask, pooled, t)), np.asarray(out))
    text_real = text.at[0, 0].set(5.0)
    assert not np.allclose(np.asarray(run(model, clips, text_real, mask, pooled, t))[0], np.asarray(out)[0])


def test_single_frame_positions_and_multi_frame_layout():
    model = make_model()
    clips, *_ = inputs(np.random.default_rng(0), grids=((2, 2), (4, 4), (8, 8)), frames=[3, 1, 2])
    lay = model.layout(clips)
    pos = lay.frame_positions()
    assert lay.num_tokens == 3 * 1 + 4 + 2 * 16 and lay.num_current_tokens == 32
    assert pos.tolist() == [0, 1, 2] + [3] * 4 + [4] * 16 + [5] * 16


# ---- taps / remat -----------------------------------------------------------------------------------


def test_taps_and_no_extra_outputs():
    model = make_model()
    args = inputs(np.random.default_rng(2))
    out, taps = run(model, *args, return_taps=True)
    assert len(taps) == CFG.num_layers
    for k, tap in enumerate(taps):
        assert tap["img_in"].shape == tap["img_out"].shape == (2, 4 + 16 + 16, D)
        assert tap["txt_in"].shape == (2, 6, D)
        if k + 1 < len(taps):
            np.testing.assert_array_equal(np.asarray(tap["img_out"]), np.asarray(taps[k + 1]["img_in"]))
            np.testing.assert_array_equal(np.asarray(tap["txt_out"]), np.asarray(taps[k + 1]["txt_in"]))
    assert taps[-1]["txt_out"] is None  # context_pre_only: the text output does not exist
    np.testing.assert_array_equal(np.asarray(out), np.asarray(run(model, *args)))

    graphdef, state = nnx.split(model)

    def f(state, *a, taps):
        return nnx.merge(graphdef, state)(*a, return_taps=taps)

    plain = jax.make_jaxpr(lambda s, *a: f(s, *a, taps=False))(state, *args)
    tapped = jax.make_jaxpr(lambda s, *a: f(s, *a, taps=True))(state, *args)
    assert len(plain.jaxpr.outvars) == 1
    assert len(tapped.jaxpr.outvars) == 1 + 4 * CFG.num_layers - 1


def test_remat_policy_is_applied():
    args = inputs(np.random.default_rng(3), b=1)

    def grad_fn(cfg):
        graphdef, state = nnx.split(make_model(cfg))

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state)(*args) ** 2)

        return jax.grad(loss), state

    text = {}
    for p in ("none", "full", "dots", "dots_no_batch"):
        g, state = grad_fn(dataclasses.replace(CFG, remat=p))
        text[p] = str(jax.make_jaxpr(g)(state))
    assert "remat" not in text["none"] and "checkpoint" not in text["none"]
    for p in ("full", "dots", "dots_no_batch"):
        assert text[p].count("remat") + text[p].count("checkpoint") >= CFG.num_layers, p
    # the same gradients with and without rematerialisation (one block keeps the compile cheap)
    grads = []
    for p in ("none", "dots"):
        g, state = grad_fn(dataclasses.replace(CFG, num_layers=1, remat=p))
        grads.append(jax.jit(g)(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# ---- pruning ----------------------------------------------------------------------------------------


def test_prune_shares_weights_and_keeps_teacher_indices():
    tcfg = dataclasses.replace(CFG, num_layers=4, context_in_dim=10)
    teacher = make_model(tcfg)
    kept = [0, 2, 3]
    student = prune(teacher, kept)
    assert student.teacher_block_indices == (0, 2, 3)
    assert student.cfg.num_layers == 3 and student.cfg.teacher_block_indices == (0, 2, 3)
    tv, sv = param_variables(teacher), param_variables(student)
    for path, var in sv.items():
        src = path
        if path.startswith("transformer_blocks."):
            i, rest = path.split(".", 2)[1:]
            src = f"transformer_blocks.{kept[int(i)]}.{rest}"
        assert var.get_value() is tv[src].get_value(), path  # the very same array, no copy
        assert var is not tv[src]  # but its own variable
    assert student.transformer_blocks[-1].context_pre_only and not student.transformer_blocks[1].context_pre_only

    # the student's first block computes exactly the teacher's first block
    rng = np.random.default_rng(4)
    args = inputs(rng, text_dim=10)
    _, t_taps = run(teacher, *args, return_taps=True)
    _, s_taps = run(student, *args, return_taps=True)
    np.testing.assert_array_equal(np.asarray(t_taps[0]["img_out"]), np.asarray(s_taps[0]["img_out"]))

    # training the student (rebinding its variables) leaves the teacher alone
    before = np.asarray(tv["transformer_blocks.2.attn.to_q.kernel"].get_value())
    sv["transformer_blocks.1.attn.to_q.kernel"].set_value(jnp.zeros_like(before))
    np.testing.assert_array_equal(np.asarray(tv["transformer_blocks.2.attn.to_q.kernel"].get_value()), before)

    # pruning a pruned model chains teacher indices; dropping the context embedder for Neodragon
    grand = prune(student, [1, 2], keep_context_embedder=False)
    assert grand.teacher_block_indices == (2, 3) and grand.context_embedder is None
    assert run(grand, *inputs(rng)).shape == (2, 4, 1, 8, 8)

    with pytest.raises(ValueError, match="context_pre_only"):
        prune(teacher, [0, 1, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        prune(teacher, [2, 0, 3])


# ---- static entry point -----------------------------------------------------------------------------


def test_padded_static_entry_matches_unpadded():
    model = make_model()
    rng = np.random.default_rng(5)
    s0 = lambda: jnp.asarray(rng.standard_normal((2, 4, 1, 4, 4)), jnp.float32)  # noqa: E731
    s1 = lambda: jnp.asarray(rng.standard_normal((2, 4, 1, 8, 8)), jnp.float32)  # noqa: E731
    a0, a1, b1, cur = s0(), s0(), s1(), s1()
    _, text, mask, pooled, t = inputs(rng)
    mask = mask.at[1, 3:].set(False)
    # static layout sized for the "last unit": [s0, s0, s1, cur]. Sample 0 really has [a1, b1, cur]
    # (slot 0 is padding); sample 1 has only [b1, cur] (slots 0 and 1 are padding). Padding holds garbage.
    garbage = jnp.full_like(a0, 7.0)
    slots = [garbage, a1.at[1].set(garbage[1]), b1, cur]
    valid = jnp.asarray([[False, True, True], [False, False, True]])
    static = nnx.jit(lambda m, *a: m.forward_static(*a))(model, slots, valid, text, mask, pooled, t)
    ref0 = run(model, [a1, b1, cur], text, mask, pooled, t)
    ref1 = run(model, [b1, cur], text, mask, pooled, t)
    # tolerance: the padded sequence changes reduction lengths, not the maths (masked keys contribute 0)
    np.testing.assert_allclose(np.asarray(static)[0], np.asarray(ref0)[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(static)[1], np.asarray(ref1)[1], atol=1e-5, rtol=0)
    assert np.abs(np.asarray(ref0)[1] - np.asarray(ref1)[1]).max() > 1e-3  # the history does matter
    with pytest.raises(ValueError, match="history_valid"):
        model.forward_static(slots, valid[:, :2], text, mask, pooled, t)


def test_bfloat16_compute_tracks_float32():
    from neodragon_jax.convert.io import assign_params, param_arrays

    m32 = make_model()
    m16 = abstract_mmdit(CFG, dtype="bfloat16", param_dtype="bfloat16")
    assign_params(m16, param_arrays(m32))
    assert param_arrays(m16)["transformer_blocks.0.attn.to_q.kernel"].dtype == jnp.bfloat16
    args = inputs(np.random.default_rng(0))
    a, b = np.asarray(run(m32, *args)), np.asarray(run(m16, *args))
    assert b.dtype == np.float32  # the velocity comes back in float32 for the Euler update
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03  # bf16 weights + matmuls, fp32 norms / softmax


# ---- scanned blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_blocks_match_the_unrolled_loop(remat):
    # a pruned-style model: teacher indices differ per block (static metadata the scan must ignore)
    base = dataclasses.replace(CFG, num_layers=4, teacher_block_indices=(0, 2, 5, 7), remat=remat)
    args = inputs(np.random.default_rng(5), frames=[1, 2, 2])
    grads, outs = {}, {}
    for scan in (False, True):
        graphdef, state = nnx.split(make_model(dataclasses.replace(base, scan_blocks=scan), seed=4))

        def loss(state, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(*args) ** 2)

        jaxpr = str(jax.make_jaxpr(loss)(state))
        assert ("scan[" in jaxpr) == scan
        outs[scan] = np.asarray(jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(*args))(state))
        grads[scan] = jax.jit(jax.grad(loss))(state)
    assert np.abs(outs[False]).max() > 0.1
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # taps need every block's input and output: that call runs the blocks unrolled, with the same result
    model = make_model(dataclasses.replace(base, scan_blocks=True), seed=4)
    out, taps = run(model, *args, return_taps=True)
    assert len(taps) == 4
    np.testing.assert_allclose(np.asarray(out), outs[False], rtol=1e-5, atol=1e-5)
