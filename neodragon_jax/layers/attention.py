"""Joint (text + image) attention of the MMDiT with QK RMSNorm, temporal RoPE and the pyramid mask.

Spec §2.3 / §2.5. Per sample the sequence is ``[text (S); image (L)]``; ``allowed(i, j)`` needs equal
token ids and ``pos_i >= pos_j`` (temporal causality). Ids: padded text 0, real tokens 1, padded image
slots of the static entry point 2 — so real tokens never see padding and every row keeps at least itself.
Text tokens sit at RoPE position 0 (their rotation is the identity, so it is skipped).

Implementations (``model.mmdit.attention``; :func:`resolve_attention`): ``dense`` is the reference, a
``[B, 1, T, T]`` float32 bias added to the materialised scores (``jax.nn.dot_product_attention``); it is
what ``auto`` means on CPU, bit for bit what this module always computed. ``chunked``, ``splash`` and
``cudnn`` take the mask as block structure (:class:`JointMask`: per-token ids and frame positions, plus the
static frame boundaries) and never materialise the ``[B, heads, T, T]`` scores
(:mod:`neodragon_jax.layers.attention_kernels`). ``auto`` is ``splash`` on TPU, ``cudnn`` on GPU for
bf16/fp16 compute (``dense`` for float32) and ``dense`` on CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.layers.core import RMSNorm, dense
from neodragon_jax.layers.embeddings import apply_rope

# Additive bias of a disallowed (query, key) pair. -1e4 is exactly representable in fp16/bf16/fp32 (the
# fp16 NPU export can use the same constant, spec §8.2) and exp(-1e4) underflows to exactly 0 in float32,
# so masked keys contribute nothing while real logits stay far smaller: with QK RMSNorm
# |logit| <= sqrt(K) * max|w_q| * max|w_k| (8 * ... for K = 64).
MASK_BIAS = -1.0e4

TEXT_PAD_ID, REAL_ID, IMAGE_PAD_ID = 0, 1, 2

ATTENTION_IMPLS = ("auto", "dense", "chunked", "splash", "cudnn")

log = logging.getLogger(__name__)
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("neodragon_attention_platform",
                                                                             default=None)


@contextlib.contextmanager
def attention_platform(platform: str | None):
    """Trace for ``platform`` (``tpu``, ``gpu``, ``cpu``) instead of JAX's default backend: what ``auto``
    resolves to and whether splash runs as a TPU kernel. Ahead-of-time plans for a TPU topology on a CPU
    host trace inside ``attention_platform("tpu")``. A trace-time setting: jit caches do not see it."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform attention is traced for: :func:`attention_platform`'s, else JAX's default backend."""
    p = _TARGET_PLATFORM.get() or jax.default_backend()
    return "gpu" if p in ("cuda", "rocm") else p


def resolve_attention(name: str, *, platform: str | None = None, dtype=None) -> str:
    """The implementation ``name`` stands for on ``platform`` (default: :func:`target_platform`).

    ``auto``: ``splash`` on TPU; ``cudnn`` on GPU when the compute dtype is bf16/fp16 (cuDNN flash attention
    has no float32 kernel), else ``dense``; ``dense`` on CPU (the numbers every CPU run had so far)."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; expected one of {list(ATTENTION_IMPLS)}")
    if name != "auto":
        return name
    platform = platform or target_platform()
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "dense"


@dataclasses.dataclass(frozen=True)
class JointMask:
    """The joint mask in block form, for the implementations that do not build the dense bias.

    ``ids [B, S+L]`` (text padding 0 / real 1 / image padding slot 2) and ``pos [B|1, S+L]`` frame positions
    of the whole sequence; ``bounds``: the static token indices where the (non-decreasing) position
    increases, None when positions are traced (the padded static entry point: splash then falls back to
    ``chunked``). ``impl`` is one of ``chunked`` / ``splash`` / ``cudnn``. ``portable``: run splash in the
    Pallas interpreter and cudnn as the same ``jax.nn.dot_product_attention`` call with
    ``implementation="xla"``; :meth:`build` sets it when the target platform is not the kernel's own (how the
    CPU tests check both paths' numerics)."""

    ids: jax.Array
    pos: jax.Array
    impl: str = "chunked"
    bounds: tuple[int, ...] | None = None
    portable: bool = False

    @classmethod
    def build(cls, text_mask: jax.Array, image_ids, image_pos, *, impl: str) -> "JointMask":
        from neodragon_jax.layers.attention_kernels import bounds_from_positions

        native = {"splash": "tpu", "cudnn": "gpu"}.get(impl)
        portable = native is not None and target_platform() != native
        if portable and (impl, target_platform()) not in _WARNED:
            _WARNED.add((impl, target_platform()))
            log.warning("attention %r on %s runs its portable stand-in (%s): same numbers, not the kernel's speed",
                        impl, target_platform(), "Pallas interpreter" if impl == "splash" else "XLA attention")

        b, s = text_mask.shape
        text_ids = jnp.where(text_mask.astype(bool), REAL_ID, TEXT_PAD_ID).astype(jnp.int32)
        image_ids = jnp.broadcast_to(jnp.asarray(image_ids, jnp.int32), (b, np.shape(image_ids)[-1]))
        ids = jnp.concatenate([text_ids, image_ids], axis=1)
        bounds = None
        if isinstance(image_pos, np.ndarray) and image_pos.shape[0] == 1:
            full = np.concatenate([np.zeros(s, np.int32), np.asarray(image_pos, np.int32)[0]])
            bounds = bounds_from_positions(full)
            pos = full[None]
        else:
            ip = jnp.asarray(image_pos, jnp.int32)
            pos = jnp.concatenate([jnp.zeros((ip.shape[0], s), jnp.int32), ip], axis=1)
        return cls(ids, jnp.asarray(pos), impl, bounds, portable)


_WARNED: set[tuple[str, str]] = set()
jax.tree_util.register_dataclass(JointMask, data_fields=["ids", "pos"], meta_fields=["impl", "bounds", "portable"])


def joint_attention_bias(
    text_mask: jax.Array,
    image_ids,
    image_pos,
) -> jax.Array:
    """Additive bias ``[B, 1, S+L, S+L]`` float32 for the sequence ``[text; image]``.

    ``text_mask [B, S]`` (true = real token), ``image_ids [B|1, L]`` (1 real, 2 padding slot),
    ``image_pos [B|1, L]`` frame indices. Text has position 0.
    """
    b, s = text_mask.shape
    text_ids = jnp.where(text_mask.astype(bool), REAL_ID, TEXT_PAD_ID).astype(jnp.int32)
    image_ids = jnp.broadcast_to(jnp.asarray(image_ids, jnp.int32), (b, np.shape(image_ids)[-1]))
    image_pos = jnp.broadcast_to(jnp.asarray(image_pos, jnp.int32), image_ids.shape)
    ids = jnp.concatenate([text_ids, image_ids], axis=1)
    pos = jnp.concatenate([jnp.zeros((b, s), jnp.int32), image_pos], axis=1)
    allowed = (ids[:, :, None] == ids[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
    return jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)[:, None]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """``[B, T, N, K] x3, bias [B, 1, T, T] -> [B, T, N, K]``; scale ``1/sqrt(K)``, softmax in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(jnp.float32), scale=scale)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """The one attention entry: ``[B, T, N, K] x3 -> [B, T, N, K]``, scale ``1/sqrt(K)``.

    ``mask``: the dense bias ``[B, 1, T, T]`` (reference path, :func:`masked_attention`) or a
    :class:`JointMask`, dispatched to its implementation."""
    if not isinstance(mask, JointMask):
        return masked_attention(q, k, v, mask)
    from neodragon_jax.layers import attention_kernels as kern

    impl = mask.impl
    if impl == "splash" and mask.bounds is None:
        impl = "chunked"  # traced positions: no static block structure for the splash mask
    if impl == "splash":
        return kern.splash_attention(q, k, v, mask.ids, mask.bounds, interpret=mask.portable)
    if impl == "cudnn":
        return kern.cudnn_attention(q, k, v, mask.ids, mask.pos, implementation="xla" if mask.portable else "cudnn")
    if impl == "chunked":
        return kern.chunked_attention(q, k, v, mask.ids, mask.pos)
    raise ValueError(f"JointMask.impl must be chunked, splash or cudnn, got {impl!r}")


class JointAttention(nnx.Module):
    """SD3 joint attention (official names ``to_q/k/v``, ``add_{q,k,v}_proj``, ``to_out.0``, ``to_add_out``).

    ``context_pre_only``: the last block's layout, whose text output is discarded (no ``to_add_out``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        qk_norm_eps: float,
        context_pre_only: bool,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.context_pre_only = context_pre_only
        inner = num_heads * head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.to_k = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.to_v = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.add_q_proj = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.add_k_proj = dense(dim, inner, axes=("embed", "heads"), **kw)
        self.add_v_proj = dense(dim, inner, axes=("embed", "heads"), **kw)
        norm = lambda: RMSNorm(head_dim, eps=qk_norm_eps, param_dtype=param_dtype)  # noqa: E731
        self.norm_q, self.norm_k = norm(), norm()
        self.norm_add_q, self.norm_add_k = norm(), norm()
        # Official key `to_out.0` (a ModuleList with a parameter-free dropout at index 1).
        self.to_out = dense(inner, dim, axes=("heads", "embed"), **kw)
        self.to_add_out = None if context_pre_only else dense(inner, dim, axes=("heads", "embed"), **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        rope_cos: jax.Array,
        rope_sin: jax.Array,
        bias,
    ) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, L, D]`` image, ``c [B, S, D]`` text (both already modulated), RoPE ``[B|1, L, K/2]``;
        ``bias``: the dense mask bias or a :class:`JointMask` (see :func:`attend`).

        Returns image ``[B, L, D]`` and text ``[B, S, D]`` outputs (text ``None`` when context_pre_only).
        """
        s = c.shape[1]
        q = apply_rope(self.norm_q(self._heads(self.to_q(x))), rope_cos, rope_sin)
        k = apply_rope(self.norm_k(self._heads(self.to_k(x))), rope_cos, rope_sin)
        v = self._heads(self.to_v(x))
        cq = self.norm_add_q(self._heads(self.add_q_proj(c)))
        ck = self.norm_add_k(self._heads(self.add_k_proj(c)))
        cv = self._heads(self.add_v_proj(c))
        dt = v.dtype
        out = attend(
            jnp.concatenate([cq.astype(dt), q.astype(dt)], axis=1),
            jnp.concatenate([ck.astype(dt), k.astype(dt)], axis=1),
            jnp.concatenate([cv, v], axis=1),
            bias,
        )
        out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
        x_out = self.to_out(out[:, s:])
        c_out = None if self.to_add_out is None else self.to_add_out(out[:, :s])
        return x_out, c_out
