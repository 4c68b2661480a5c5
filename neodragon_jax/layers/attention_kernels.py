"""Attention kernels that never materialise the ``[B, heads, T, T]`` score matrix, for the pyramid mask.

The MMDiT's mask (spec §2.5) is ``allowed(i, j) = (id_i == id_j) and (pos_i >= pos_j)`` over the sequence
``[text (S); image (L)]``: ids are 0 for padded text, 1 for real tokens, 2 for padded image slots of the static
entry point; positions are 0 for text and the frame index for image tokens. Because the image tokens are laid
out frame after frame, oldest first, ``pos`` is non-decreasing along the sequence: the temporal-causal part is
a block-lower-triangular matrix whose blocks are frames (text joins frame 0's block), and the id part is a
per-example segment mask. Every kernel here takes the mask in that form, never as a dense bias:

* :func:`chunked_attention` (any backend; the CPU choice for memory): online softmax over key chunks with a
  ``custom_vjp`` whose backward recomputes each chunk from ``q, k, v``, the output and the log-sum-exp. The
  mask of a ``[T, chunk]`` tile is computed from the per-token ``ids`` / ``pos`` (which may be traced), so
  temporaries grow linearly in ``T``.
* :func:`splash_attention` (TPU): Pallas splash attention. The frame blocks become a static splash
  ``NumpyMask`` (fully masked ``block x block`` tiles are skipped, partial ones masked in the kernel) and the
  ids become ``SegmentIds``. The sequence is padded to a multiple of 128 (pad tokens form their own segment).
  Under a mesh the kernel runs inside ``shard_map`` over the batch (and, where the batch does not divide the
  devices, the heads). ``interpret=True`` runs the same kernel in the Pallas interpreter (CPU tests).
* :func:`cudnn_attention` (GPU): ``jax.nn.dot_product_attention(implementation="cudnn")`` with the mask as a
  ``[B, 1, T, T]`` bias in the compute dtype (broadcast over heads: 1/heads of the score matrix, and in
  bf16). ``implementation="xla"`` runs the same call anywhere (how the tests check the mask).
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

#: Key chunk of :func:`chunked_attention`: temporaries are ``B x heads x T x CHUNK`` float32 per tile.
CHUNK = 512
#: Splash pads the sequence to a multiple of this (TPU lane width) and tiles it in blocks of up to 512.
SPLASH_ALIGN = 128
# Masked logits of the online softmax: finite, so a tile whose keys are all masked for a row gives
# exp(0) = 1 garbage that the first real key's rescale exp(NEG - m) = 0 erases (every row has a real key).
_NEG = -1.0e30
# ids / positions of padding tokens: pad tokens only see pad tokens, real ones never see them.
_PAD_ID = -1
_PAD_POS = 1 << 30
_F32 = jnp.float32


def positions_from_bounds(bounds: tuple[int, ...], length: int) -> np.ndarray:
    """``[length]`` positions from the token indices where each new (higher) position starts."""
    return np.searchsorted(np.asarray(bounds, np.int64), np.arange(length), side="right").astype(np.int32)


def bounds_from_positions(pos: np.ndarray) -> tuple[int, ...] | None:
    """The start index of every new position of a non-decreasing ``pos [T]`` whose values are 0, 1, 2, ...
    without gaps (so ``positions_from_bounds`` inverts it); None when ``pos`` is not of that form."""
    pos = np.asarray(pos).reshape(-1)
    d = np.diff(pos)
    if pos.size == 0 or pos[0] != 0 or np.any((d != 0) & (d != 1)):
        return None
    return tuple(int(i) + 1 for i in np.nonzero(d)[0])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- chunked online softmax (custom_vjp) -------------------------------------------------------------------


def _pad_seq(x: jax.Array, axis: int, pad: int, value) -> jax.Array:
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _key_chunks(x: jax.Array, n: int) -> jax.Array:
    """``[B, N, Tp, K] -> [n, B, N, Tp/n, K]`` (scan over the leading axis)."""
    b, h, t, k = x.shape
    return jnp.moveaxis(x.reshape(b, h, n, t // n, k), 2, 0)


def _mask_chunks(x: jax.Array, n: int) -> jax.Array:
    """``[B, Tp] -> [n, B, Tp/n]``."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n), 1, 0)


def _tile_allowed(ids, pos, ids_k, pos_k) -> jax.Array:
    """``[B, 1, Tq, Tk]``: ids ``[B, Tq]`` / ``[B, Tk]``, positions ``[B|1, Tq]`` / ``[B|1, Tk]``."""
    same = ids[:, :, None] == ids_k[:, None, :]
    causal = pos[:, :, None] >= pos_k[:, None, :]
    return (same & causal)[:, None]


def _chunked_forward(qt, kt, vt, ids, pos, scale, n):
    b, h, t, k = qt.shape

    def body(carry, xs):
        m, l, acc = carry
        kj, vj, idj, pj = xs
        s = jnp.einsum("bnqk,bnsk->bnqs", qt, kj, preferred_element_type=_F32) * scale
        s = jnp.where(_tile_allowed(ids, pos, idj, pj), s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bnqs,bnsk->bnqk", p.astype(vj.dtype), vj, preferred_element_type=_F32)
        return (m_new, l, alpha[..., None] * acc + pv), None

    init = (jnp.full((b, h, t), _NEG, _F32), jnp.zeros((b, h, t), _F32), jnp.zeros((b, h, t, vt.shape[-1]), _F32))
    xs = (_key_chunks(kt, n), _key_chunks(vt, n), _mask_chunks(ids, n), _mask_chunks(pos, n))
    (m, l, acc), _ = jax.lax.scan(body, init, xs)
    return acc / l[..., None], m + jnp.log(l)


def _prepare(q, k, v, ids, pos, chunk):
    """Heads-major, padded operands: ``[B, N, Tp, K]`` x3, ``ids [B, Tp]``, ``pos [B|1, Tp]``, chunk count."""
    t = q.shape[1]
    # Equal chunks of at most ``chunk`` keys, rounded to 8: padding a 768-token sequence to two chunks of
    # 512 would add a third of wasted work.
    n = -(-t // chunk)
    c = _round_up(-(-t // n), 8)
    tp = c * n
    qt, kt, vt = (_pad_seq(jnp.swapaxes(x, 1, 2), 2, tp - t, 0) for x in (q, k, v))
    ids = _pad_seq(jnp.asarray(ids, jnp.int32), 1, tp - t, _PAD_ID)
    pos = _pad_seq(jnp.asarray(pos, jnp.int32), 1, tp - t, _PAD_POS)
    return qt, kt, vt, ids, pos, n


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked(q, k, v, ids, pos, scale, chunk):
    return _chunked_fwd(q, k, v, ids, pos, scale, chunk)[0]


def _chunked_fwd(q, k, v, ids, pos, scale, chunk):
    t = q.shape[1]
    qt, kt, vt, idp, posp, n = _prepare(q, k, v, ids, pos, chunk)
    out_t, lse = _chunked_forward(qt, kt, vt, idp, posp, scale, n)
    out = jnp.swapaxes(out_t[:, :, :t], 1, 2).astype(v.dtype)
    return out, (q, k, v, ids, pos, out, lse)


def _chunked_bwd(scale, chunk, res, g):
    q, k, v, ids, pos, out, lse = res
    t = q.shape[1]
    qt, kt, vt, idp, posp, n = _prepare(q, k, v, ids, pos, chunk)
    tp = qt.shape[2]
    do = _pad_seq(jnp.swapaxes(g, 1, 2), 2, tp - t, 0)
    o = _pad_seq(jnp.swapaxes(out, 1, 2), 2, tp - t, 0)
    delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1)  # [B, N, Tp]

    def body(dq, xs):
        kj, vj, idj, pj = xs
        s = jnp.einsum("bnqk,bnsk->bnqs", qt, kj, preferred_element_type=_F32) * scale
        allowed = _tile_allowed(idp, posp, idj, pj)
        p = jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bnqs,bnqk->bnsk", p.astype(do.dtype), do, preferred_element_type=_F32)
        dp = jnp.einsum("bnqk,bnsk->bnqs", do, vj, preferred_element_type=_F32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bnqs,bnsk->bnqk", ds.astype(kj.dtype), kj, preferred_element_type=_F32)
        dk = jnp.einsum("bnqs,bnqk->bnsk", ds.astype(qt.dtype), qt, preferred_element_type=_F32)
        return dq, (dk, dv)

    xs = (_key_chunks(kt, n), _key_chunks(vt, n), _mask_chunks(idp, n), _mask_chunks(posp, n))
    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(qt.shape, _F32), xs)

    def unchunk(x):  # [n, B, N, c, K] -> [B, T, N, K]
        x = jnp.moveaxis(x, 0, 2)
        return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])[:, :, :t]

    back = lambda x, like: jnp.swapaxes(x[:, :, :t], 1, 2).astype(like.dtype)  # noqa: E731
    return back(dq, q), jnp.swapaxes(unchunk(dk), 1, 2).astype(k.dtype), \
        jnp.swapaxes(unchunk(dv), 1, 2).astype(v.dtype), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q, k, v, ids, pos, *, scale: float | None = None, chunk: int = CHUNK) -> jax.Array:
    """``[B, T, N, K] x3 -> [B, T, N, K]`` with ``allowed(i, j) = ids_i == ids_j and pos_i >= pos_j``.

    ``ids [B, T]``, ``pos [B|1, T]`` integer (numpy or traced). Scores in float32, probabilities cast to
    ``v``'s dtype before the value product (as ``jax.nn.dot_product_attention``); output in ``v``'s dtype.
    Temporaries: ``B x N x T x chunk`` float32 per tile, forward and backward.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), q.shape[:2])
    pos = jnp.asarray(pos, jnp.int32)
    return _chunked(q, k, v, ids, pos, scale, int(chunk))


# ---- cuDNN (GPU) ----------------------------------------------------------------------------------------------


def cudnn_attention(q, k, v, ids, pos, *, scale: float | None = None, implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention with the pyramid mask as a ``[B, 1, T, T]`` additive bias in ``q``'s dtype."""
    from neodragon_jax.layers.attention import MASK_BIAS

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), q.shape[:2])
    pos = jnp.asarray(pos, jnp.int32)
    allowed = _tile_allowed(ids, pos, ids, pos)
    bias = jnp.where(allowed, 0.0, MASK_BIAS).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)


# ---- Pallas splash attention (TPU) -----------------------------------------------------------------------------


#: Largest splash tile (tests lower it to exercise several tiles on short sequences).
SPLASH_MAX_BLOCK = 512


def splash_block(tp: int) -> int:
    """Largest of 512 / 256 / 128 (at most :data:`SPLASH_MAX_BLOCK`) dividing the padded length ``tp``."""
    return next(b for b in (512, 256, 128) if tp % b == 0 and b <= max(SPLASH_MAX_BLOCK, 128))


@functools.lru_cache(maxsize=64)
def _splash_mask(bounds: tuple[int, ...], t: int, heads: int):
    """The static splash mask of one layout (cached: splash's own mask processing is cached by mask)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    tp = _round_up(t, SPLASH_ALIGN)
    pos = positions_from_bounds(bounds, tp)
    pos[t:] = _PAD_POS
    return sa.MultiHeadMask([sa.NumpyMask(pos[:, None] >= pos[None, :])] * heads)


def _splash_kernel(bounds: tuple[int, ...], t: int, heads: int, interpret: bool):
    """Built per trace (it holds the block tables as arrays of the trace that made it)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    blk = splash_block(_round_up(t, SPLASH_ALIGN))
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    return sa.make_splash_mha(_splash_mask(bounds, t, heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_specs(b: int, heads: int):
    """Shard-map specs ``(qkv [B, N, Tp, K], seg [B, Tp])`` under the active mesh and rule set, or None.

    The batch takes the mesh axes the rule set gives it (as far as they divide ``b``); the heads take as many
    of the remaining axes as divide them, so a stage column smaller than the device count still splits."""
    from jax.sharding import PartitionSpec as P

    from neodragon_jax.sharding.constraints import active_rules
    from neodragon_jax.sharding.rules import activation_spec

    rules = active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return None
    shape = dict(mesh.shape)
    batch = activation_spec(("batch",), (b,), rules, shape)[0]
    used = set((batch,) if isinstance(batch, str) else (batch or ()))
    free, head_axes = [a for a in mesh.axis_names if a not in used and shape[a] > 1], []
    for a in free:
        if heads % (math.prod(shape[x] for x in head_axes) * shape[a]) == 0:
            head_axes.append(a)
    hspec = None if not head_axes else head_axes[0] if len(head_axes) == 1 else tuple(head_axes)
    return P(batch, hspec, None, None), P(batch, None), math.prod(shape[a] for a in head_axes) if head_axes else 1


class _CostedPallas:
    """``jax.experimental.pallas`` as the splash kernel module sees it, but every ``pallas_call`` named like a
    splash phase (``..._fwd...``, ``..._dq...``, ``..._dkv...``) gets a ``CostEstimate``: without one XLA's
    cost analysis counts a Mosaic kernel as zero FLOPs and zero time, and the TPU plan's FLOPs, step time and
    MFU would leave attention out."""

    def __init__(self, real, estimates: dict):
        self._real, self._estimates = real, estimates

    def __getattr__(self, name):
        return getattr(self._real, name)

    def pallas_call(self, *args, **kwargs):
        name = str(kwargs.get("name") or "")
        for phase in ("_dkv", "_dq", "_fwd"):
            if phase in name and kwargs.get("cost_estimate") is None:
                kwargs["cost_estimate"] = self._estimates[phase]
                break
        return self._real.pallas_call(*args, **kwargs)


def splash_costs(bounds: tuple[int, ...], t: int, heads: int, head_dim: int, itemsize: int) -> dict:
    """Per-call ``CostEstimate`` of each splash phase for one example and ``heads`` heads: the ``block x block``
    tiles the kernel executes (those with an allowed pair) times 2 FLOPs per multiply-add of each of the
    phase's matmuls (fwd: QK^T, PV; dq: QK^T, dP, dQ; dkv: QK^T, dP, dV, dK), one exp per tile entry; bytes:
    the q side read once and the k/v side once per q block (approximate)."""
    from jax.experimental import pallas as pl

    tp = _round_up(t, SPLASH_ALIGN)
    blk = splash_block(tp)
    pos = positions_from_bounds(bounds, tp)
    pos[t:] = _PAD_POS
    nb = tp // blk
    allowed = (pos[:, None] >= pos[None, :]).reshape(nb, blk, nb, blk).any(axis=(1, 3))
    pairs = int(allowed.sum()) * blk * blk * heads
    io = heads * tp * head_dim * itemsize * (2 + 2 * nb)
    est = lambda mm, io_mult: pl.CostEstimate(flops=2 * mm * pairs * head_dim, transcendentals=pairs,  # noqa: E731
                                              bytes_accessed=int(io * io_mult))
    return {"_fwd": est(2, 1.0), "_dq": est(3, 1.5), "_dkv": est(4, 2.0)}


@contextlib.contextmanager
def _splash_cost_estimates(estimates: dict):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak

    real = sak.pl
    sak.pl = _CostedPallas(real, estimates)
    try:
        yield
    finally:
        sak.pl = real


def _splash_run(qt, kt, vt, seg, bounds, t, interpret):
    """The splash kernel on local ``[B, N, Tp, K]`` operands (vmapped over the batch)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kernel = _splash_kernel(bounds, t, qt.shape[1], interpret)
    return jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sa.SegmentIds(s, s)))(qt, kt, vt, seg)


def _costs_for(qt, bounds, t):
    return splash_costs(bounds, t, qt.shape[1], qt.shape[-1], jnp.dtype(qt.dtype).itemsize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _splash_costed(qt, kt, vt, seg, bounds, t, interpret):
    with _splash_cost_estimates(_costs_for(qt, bounds, t)):
        return _splash_run(qt, kt, vt, seg, bounds, t, interpret)


def _splash_costed_fwd(qt, kt, vt, seg, bounds, t, interpret):
    # The splash backward kernels are traced when the vjp is applied: do that inside the estimates too.
    with _splash_cost_estimates(_costs_for(qt, bounds, t)):
        out, vjp = jax.vjp(lambda a, b, c: _splash_run(a, b, c, seg, bounds, t, interpret), qt, kt, vt)
    return out, (vjp, qt)


def _splash_costed_bwd(bounds, t, interpret, res, g):
    vjp, qt = res
    with _splash_cost_estimates(_costs_for(qt, bounds, t)):
        dq, dk, dv = vjp(g)
    return dq, dk, dv, None


_splash_costed.defvjp(_splash_costed_fwd, _splash_costed_bwd)


def splash_attention(q, k, v, ids, bounds: tuple[int, ...], *, scale: float | None = None,
                     interpret: bool = False) -> jax.Array:
    """Pallas splash attention: ``[B, T, N, K] x3 -> [B, T, N, K]`` with the static frame ``bounds`` (token
    indices where the position increases; positions start at 0) and per-token ``ids [B, T]`` as segments."""
    b, t, heads, _ = q.shape
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    tp = _round_up(t, SPLASH_ALIGN)
    q = (q.astype(_F32) * scale).astype(q.dtype)
    qt, kt, vt = (_pad_seq(jnp.swapaxes(x, 1, 2), 2, tp - t, 0) for x in (q, k, v))
    # Segments: ids 0/1/2 as given, padding its own segment (it sees only itself, nobody sees it).
    seg = _pad_seq(jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (b, t)), 1, tp - t, 3)
    specs = _splash_specs(b, heads)
    run = functools.partial(_splash_costed, bounds=tuple(bounds), t=t, interpret=bool(interpret))
    if specs is None:
        out = run(qt, kt, vt, seg)
    else:
        qkv, sseg, _ = specs
        out = jax.shard_map(run, in_specs=(qkv, qkv, qkv, sseg), out_specs=qkv, check_vma=False)(qt, kt, vt, seg)
    return jnp.swapaxes(out[:, :, :t], 1, 2).astype(v.dtype)
