"""Every attention implementation against the dense reference, with text padding and temporal-causal masks.

The reference is :func:`masked_attention` on the ``[B, 1, T, T]`` float32 bias (what the MMDiT always ran).
``splash`` runs the same Pallas kernel in interpret mode on CPU, ``cudnn`` the same
``jax.nn.dot_product_attention`` call with ``implementation="xla"`` (its kernel needs a GPU). Tolerance
1e-5 in float32, forward and gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.layers import attention_kernels as kern
from neodragon_jax.layers.attention import (
    JointMask,
    attend,
    attention_platform,
    joint_attention_bias,
    masked_attention,
    resolve_attention,
)

TOL = 1e-5


def _case(frames=(40, 40, 80, 80), s=16, b=2, heads=2, k=64, seed=0):
    """Text ``s`` tokens (example 0 padded after 5, example 1 all real) + image frames of the given sizes."""
    pos = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(frames)])[None]
    ids = np.full_like(pos, 1)
    tm = np.zeros((b, s), bool)
    tm[0, :5] = True
    tm[1:, :] = True
    rng = np.random.default_rng(seed)
    t = s + sum(frames)
    q, kk, v = (jnp.asarray(rng.standard_normal((b, t, heads, k)), jnp.float32) for _ in range(3))
    ct = jnp.asarray(rng.standard_normal((b, t, heads, k)), jnp.float32)
    return jnp.asarray(tm), ids, pos, q, kk, v, ct


def _value_and_grads(fn, q, k, v, ct):
    """Output and the gradients of ``sum(out * ct)`` from one compiled function."""

    @jax.jit
    def both(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)

    return both(q, k, v, ct)


def _max_err(a, b):
    return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("impl", ["chunked", "splash", "cudnn"])
def test_path_matches_reference(impl, monkeypatch):
    # frames of 112 / 64 / 64 tokens after 16 text tokens: with 128-token splash tiles the first tile's queries
    # (text + frame 0) skip the second tile's keys, the other tiles are partly masked
    monkeypatch.setattr(kern, "SPLASH_MAX_BLOCK", 128)
    tm, ids, pos, q, k, v, ct = _case(frames=(112, 64, 64))
    bias = joint_attention_bias(tm, ids, pos)
    ref, gref = _value_and_grads(lambda a, b, c: masked_attention(a, b, c, bias), q, k, v, ct)
    mask = JointMask.build(tm, ids, pos, impl=impl)
    assert mask.bounds == (16 + 112, 16 + 176)  # text joins frame 0's block
    out, grads = _value_and_grads(lambda a, b, c: attend(a, b, c, mask), q, k, v, ct)
    assert _max_err(out, ref) < TOL
    for g, gr in zip(grads, gref):
        assert _max_err(g, gr) < TOL
    # the padded text rows see only padding, real rows never see it: a wrong mask moves these by O(1)
    assert _max_err(out[0, 5:16], ref[0, 5:16]) < TOL


def test_chunked_many_chunks_and_traced_positions():
    """Several key chunks (and a length that is not a multiple of the chunk), positions and ids traced (the
    padded static entry point: image padding slots have id 2), forward and gradients."""
    tm, _, pos, q, k, v, ct = _case(frames=(40, 40, 80, 90))
    ids = np.full_like(pos, 1)
    ids[:, 40:80] = 2  # a padding slot
    bias = joint_attention_bias(tm, jnp.asarray(ids), jnp.asarray(pos))
    ref, gref = _value_and_grads(lambda a, b, c: masked_attention(a, b, c, bias), q, k, v, ct)
    mask = JointMask.build(tm, jnp.asarray(ids), jnp.asarray(pos), impl="chunked")
    assert mask.bounds is None
    fn = lambda a, b, c: kern.chunked_attention(a, b, c, mask.ids, mask.pos, chunk=64)  # noqa: E731
    out, grads = _value_and_grads(fn, q, k, v, ct)
    assert _max_err(out, ref) < TOL
    for g, gr in zip(grads, gref):
        assert _max_err(g, gr) < TOL


def test_chunked_bf16_close_to_reference():
    tm, ids, pos, q, k, v, _ = _case()
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ref = masked_attention(q, k, v, joint_attention_bias(tm, ids, pos)).astype(jnp.float32)
    out = attend(q, k, v, JointMask.build(tm, ids, pos, impl="chunked"))
    assert out.dtype == jnp.bfloat16
    assert _max_err(out.astype(jnp.float32), ref) < 2e-2


def test_bounds_and_positions_roundtrip():
    pos = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    b = kern.bounds_from_positions(pos)
    assert b == (3, 5, 6)
    np.testing.assert_array_equal(kern.positions_from_bounds(b, 8), pos)
    assert kern.bounds_from_positions(np.array([0, 2, 2])) is None  # a gap
    assert kern.bounds_from_positions(np.array([1, 1])) is None


def test_resolve_attention():
    assert resolve_attention("auto", platform="cpu") == "dense"
    assert resolve_attention("auto", platform="tpu") == "splash"
    assert resolve_attention("auto", platform="gpu", dtype=jnp.bfloat16) == "cudnn"
    assert resolve_attention("auto", platform="gpu", dtype=jnp.float32) == "dense"
    assert resolve_attention("chunked", platform="tpu") == "chunked"
    with attention_platform("tpu"):
        assert resolve_attention("auto") == "splash"
    assert resolve_attention("auto") == ("dense" if jax.default_backend() == "cpu" else resolve_attention("auto"))
    with pytest.raises(ValueError, match="expected one of"):
        resolve_attention("flash")


def test_splash_cost_estimate_counts_executed_tiles():
    """The TPU plan's FLOPs for splash come from these estimates: fwd 2, dq 3, dkv 4 matmuls per executed tile.
    Two frames of 512 tokens tile as 2 x 2 blocks of 512; the first frame's queries skip the second frame's
    keys, so 3 of the 4 tiles run."""
    assert kern.splash_block(1024) == 512
    est = kern.splash_costs((512,), 1024, heads=2, head_dim=64, itemsize=2)
    executed = 3 * 512 * 512 * 2
    assert est["_fwd"].flops == 2 * 2 * executed * 64
    assert est["_dq"].flops == 2 * 3 * executed * 64
    assert est["_dkv"].flops == 2 * 4 * executed * 64
    assert est["_fwd"].transcendentals == executed


# ---- the MMDiT with each implementation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mmdit():
    """The tiny preset's MMDiT (2 blocks) with every parameter random and non-zero (the from-scratch init
    zeroes the output projection and the modulation), built without compiling an init."""
    from flax import nnx

    from neodragon_jax.models.mmdit import abstract_mmdit

    cfg = dataclasses.replace(load_config("tiny").model.mmdit, num_layers=2)
    graphdef, state = nnx.split(abstract_mmdit(cfg))
    rng = np.random.default_rng(3)
    state = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), state)
    return cfg, graphdef, state


def _forwards(tiny_mmdit, impl):
    """(plain call, padded static entry point) of the tiny MMDiT with ``impl``, one compiled function."""
    from flax import nnx

    cfg, graphdef, state = tiny_mmdit
    rng = np.random.default_rng(0)
    b, s, c = 2, 8, cfg.in_channels
    clips = [jnp.asarray(rng.standard_normal((b, c, 1, h, h)), jnp.float32) for h in (4, 8, 8)]
    tokens = jnp.asarray(rng.standard_normal((b, s, cfg.context_in_dim or cfg.hidden_size)), jnp.float32)
    mask = jnp.asarray(np.arange(s)[None] < np.array([[3], [8]]))
    pooled = jnp.asarray(rng.standard_normal((b, cfg.pooled_dim)), jnp.float32)
    t = jnp.asarray([900.0, 300.0])
    hv = jnp.asarray([[True, False], [True, True]])

    @jax.jit
    def run(state, clips, tokens, mask, pooled, t, hv):
        model = nnx.merge(graphdef, state)
        model.cfg = dataclasses.replace(cfg, attention=impl)
        return model(clips, tokens, mask, pooled, t), model.forward_static(clips, hv, tokens, mask, pooled, t)

    return run(state, clips, tokens, mask, pooled, t, hv)


@pytest.fixture(scope="module")
def dense_outputs(tiny_mmdit):
    return _forwards(tiny_mmdit, "dense")


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_mmdit_paths_match_dense(tiny_mmdit, dense_outputs, impl):
    """The MMDiT's output with each implementation, plain and through the padded static entry point (traced
    positions: splash falls back to chunked there), against the dense path."""
    got = _forwards(tiny_mmdit, impl)
    for g, r in zip(got, dense_outputs):
        assert float(jnp.max(jnp.abs(g - r))) < TOL


def test_default_attention_is_dense_on_cpu(tiny_mmdit, dense_outputs):
    """``auto`` on CPU is the dense path, bit for bit (the tiny models and CPU runs depend on it)."""
    assert tiny_mmdit[0].attention == "auto" and jax.default_backend() == "cpu"
    for a, d in zip(_forwards(tiny_mmdit, "auto"), dense_outputs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


def test_unknown_attention_is_refused():
    from neodragon_jax.models.mmdit import abstract_mmdit

    cfg = dataclasses.replace(load_config("tiny").model.mmdit, attention="flash")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        abstract_mmdit(cfg)
