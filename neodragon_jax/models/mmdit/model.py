"""The pyramidal MMDiT denoiser of Pyramid Flow SD3 (teacher, 24 blocks + context embedder) and Neodragon
(18 pruned blocks, text tokens from the ContextAdapter). Spec §2.

Call: ``model(clips, text_tokens, text_mask, pooled, timestep) -> velocity [B, C, F_cur, H, W]`` where
``clips`` are the history clips oldest -> newest followed by the current noisy clip, each channels-first
``[B, C, F_i, H_i, W_i]`` like the official code. Frame indices run consecutively over all clips' frames
(temporal RoPE + causal mask); spatial PE is the centre crop for the current clip's grid, bilinearly
resized for smaller history clips. Only the current clip's tokens are projected out and unpatchified.

Numerics: LayerNorms, AdaLN modulation (its Linear included), QK RMSNorm, RoPE, softmax and the residual
stream are float32; the projection / FFN / patch matmuls run in ``dtype``; weights are stored in
``param_dtype``. The velocity is returned in float32 (the Euler update is done in float32).

Block boundaries are explicit (:meth:`PyramidMMDiT.embed_clips`, :meth:`embed_text`, :meth:`run_block`,
:meth:`final_layer`) so activation-sharding constraints and per-block losses can be attached there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config.schema import MMDiTConfig
from neodragon_jax.layers.attention import (
    ATTENTION_IMPLS,
    IMAGE_PAD_ID,
    REAL_ID,
    JointAttention,
    JointMask,
    joint_attention_bias,
    resolve_attention,
)
from neodragon_jax.layers.core import as_dtype, dense, layer_norm_no_affine, zeros
from neodragon_jax.sharding.constraints import active_rules, constrain
from neodragon_jax.layers.embeddings import (
    CombinedTimestepTextEmbedding,
    PatchEmbed,
    normal_init,
    rope_cos_sin,
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _validate_config(cfg: MMDiTConfig) -> None:
    if cfg.num_layers < 1:
        raise ValueError(f"MMDiT needs at least one block, got num_layers={cfg.num_layers}")
    if cfg.teacher_block_indices and len(cfg.teacher_block_indices) != cfg.num_layers:
        raise ValueError(
            f"teacher_block_indices has {len(cfg.teacher_block_indices)} entries but num_layers is "
            f"{cfg.num_layers}: give one teacher index per block (or leave it empty)"
        )
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {cfg.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    if cfg.attention not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {cfg.attention!r}; expected one of {list(ATTENTION_IMPLS)}")
    if cfg.head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {cfg.head_dim}")
    if cfg.sample_size % cfg.patch_size:
        raise ValueError(f"sample_size {cfg.sample_size} must be a multiple of patch_size {cfg.patch_size}")


# ---- modulation and feed-forward ------------------------------------------------------------------------


class AdaLayerNormZero(nnx.Module):
    """``norm1`` / ``norm1_context``: ``Linear(SiLU(temb)) -> 6 x [B, 1, D]`` in float32.

    Row order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; zero-initialised.
    """

    def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear = dense(
            dim, 6 * dim, axes=("embed", None), dtype=jnp.float32, param_dtype=param_dtype,
            kernel_init=zeros, rngs=rngs,
        )

    def __call__(self, temb: jax.Array) -> tuple[jax.Array, ...]:
        mod = self.linear(jax.nn.silu(temb.astype(jnp.float32)))
        return tuple(m[:, None, :] for m in jnp.split(mod, 6, axis=-1))


class AdaLayerNormContinuous(nnx.Module):
    """``norm_out`` / last block's ``norm1_context``: ``Linear(SiLU(temb)) -> (scale, shift)`` SCALE FIRST."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear = dense(
            dim, 2 * dim, axes=("embed", None), dtype=jnp.float32, param_dtype=param_dtype,
            kernel_init=zeros, rngs=rngs,
        )

    def __call__(self, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
        scale, shift = jnp.split(self.linear(jax.nn.silu(temb.astype(jnp.float32))), 2, axis=-1)
        return scale[:, None, :], shift[:, None, :]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``LN(x) * (1 + scale) + shift`` in float32 (LayerNorm without affine)."""
    return layer_norm_no_affine(x, eps) * (1.0 + scale) + shift


class FeedForward(nnx.Module):
    """GELU-tanh MLP ``D -> M -> D``; official keys ``net.0.proj`` (-> ``proj_in``) and ``net.2`` (-> ``proj_out``)."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.proj_in = dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.proj_out = dense(hidden, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x.astype(self.dtype)), approximate=True))


# ---- joint block ----------------------------------------------------------------------------------------


class JointTransformerBlock(nnx.Module):
    """One MMDiT joint block (spec §2.3). ``teacher_index``: the teacher block it came from (pruning, taps).

    ``context_pre_only`` (only a model's last block): text gets AdaLN-continuous modulation, no text
    out-projection / FFN, and its text output is ``None``.
    """

    def __init__(
        self,
        cfg: MMDiTConfig,
        *,
        context_pre_only: bool,
        teacher_index: int,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        d = cfg.hidden_size
        self.context_pre_only = context_pre_only
        self.teacher_index = int(teacher_index)
        self.eps = cfg.norm_eps
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = AdaLayerNormZero(d, param_dtype=param_dtype, rngs=rngs)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(d, param_dtype=param_dtype, rngs=rngs)
        else:
            self.norm1_context = AdaLayerNormZero(d, param_dtype=param_dtype, rngs=rngs)
        self.attn = JointAttention(
            d, cfg.num_heads, cfg.head_dim, qk_norm_eps=cfg.qk_norm_eps, context_pre_only=context_pre_only, **kw
        )
        self.ff = FeedForward(d, d * cfg.mlp_ratio, **kw)
        self.ff_context = None if context_pre_only else FeedForward(d, d * cfg.mlp_ratio, **kw)

    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        temb: jax.Array,
        rope_cos: jax.Array,
        rope_sin: jax.Array,
        bias: jax.Array,
    ) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, L, D]``, ``c [B, S, D]`` (float32 residual streams), ``temb [B, D]`` -> new ``(x, c)``."""
        eps, dt = self.eps, self.dtype
        if _shards_tokens():  # sequence-parallel rule sets: pin the token split at every block input
            x = constrain(x, ("batch", "length", "embed"))
            c = constrain(c, ("batch", "length", "embed"))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(temb)
        x_in = modulate(x, shift1, scale1, eps).astype(dt)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)
            c_in = modulate(c, c_shift, c_scale, eps).astype(dt)
        else:
            c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
            c_in = modulate(c, c_shift1, c_scale1, eps).astype(dt)

        x_attn, c_attn = self.attn(x_in, c_in, rope_cos, rope_sin, bias)

        x = x + gate1 * x_attn.astype(jnp.float32)
        x = x + gate2 * self.ff(modulate(x, shift2, scale2, eps)).astype(jnp.float32)
        if self.context_pre_only:
            return x, None
        c = c + c_gate1 * c_attn.astype(jnp.float32)
        c = c + c_gate2 * self.ff_context(modulate(c, c_shift2, c_scale2, eps)).astype(jnp.float32)
        return x, c


def _shards_tokens() -> bool:
    """Whether the active rule set splits activations along their tokens (``length``), e.g. ``fsdp_sp``."""
    rules = active_rules()
    return rules is not None and any(name == "length" for name, _ in rules.activations)


def _call_block(block: JointTransformerBlock, x, c, temb, rope_cos, rope_sin, bias):
    return block(x, c, temb, rope_cos, rope_sin, bias)


# ---- token layout ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceLayout:
    """Static token layout of one clip list: per clip ``(frames, h, w)`` patch grids (current clip last)."""

    grids: tuple[tuple[int, int, int], ...]

    @property
    def ref_hw(self) -> tuple[int, int]:
        return self.grids[-1][1], self.grids[-1][2]

    @property
    def tokens_per_clip(self) -> tuple[int, ...]:
        return tuple(f * h * w for f, h, w in self.grids)

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_per_clip)

    @property
    def num_current_tokens(self) -> int:
        return self.tokens_per_clip[-1]

    def clip_index(self) -> np.ndarray:
        """``[L]`` clip index of every image token."""
        return np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(self.tokens_per_clip)])

    def frame_in_clip(self) -> np.ndarray:
        """``[L]`` frame index of every image token inside its clip."""
        return np.concatenate([np.repeat(np.arange(f, dtype=np.int32), h * w) for f, h, w in self.grids])

    def frame_positions(self) -> np.ndarray:
        """``[L]`` global frame index (RoPE / causal position) when every clip is real."""
        offsets = np.concatenate([[0], np.cumsum([f for f, _, _ in self.grids])[:-1]]).astype(np.int32)
        return offsets[self.clip_index()] + self.frame_in_clip()


# ---- the model ------------------------------------------------------------------------------------------


class PyramidMMDiT(nnx.Module):
    """Pyramidal MMDiT (spec §2). ``cfg.context_in_dim`` set = teacher variant with ``context_embedder``."""

    def __init__(self, cfg: MMDiTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _validate_config(cfg)
        self.cfg = cfg
        self.dtype = as_dtype(dtype)
        self.param_dtype = as_dtype(param_dtype)
        d = cfg.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        self.pos_embed = PatchEmbed(
            cfg.in_channels, d, cfg.patch_size, pos_embed_max_size=cfg.pos_embed_max_size,
            base_size=cfg.sample_size // cfg.patch_size, **kw,
        )
        self.time_text_embed = CombinedTimestepTextEmbedding(d, cfg.pooled_dim, **kw)
        if cfg.context_in_dim:
            self.context_embedder = dense(
                cfg.context_in_dim, d, axes=(None, "embed"), kernel_init=normal_init(0.02), **kw
            )
        else:
            self.context_embedder = None
        indices = cfg.teacher_block_indices or tuple(range(cfg.num_layers))
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(
                    cfg, context_pre_only=(i == cfg.num_layers - 1), teacher_index=indices[i], **kw
                )
                for i in range(cfg.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(d, param_dtype=self.param_dtype, rngs=rngs)
        p = cfg.patch_size
        self.proj_out = dense(
            d, p * p * cfg.out_channels, axes=("embed", None), kernel_init=zeros, **kw
        )

    # -- public API -----------------------------------------------------------------------------------

    @property
    def teacher_block_indices(self) -> tuple[int, ...]:
        return tuple(b.teacher_index for b in self.transformer_blocks)

    def __call__(
        self,
        clips: Sequence[jax.Array],
        text_tokens: jax.Array,
        text_mask: jax.Array | None,
        pooled: jax.Array,
        timestep: jax.Array,
        *,
        return_taps: bool = False,
    ):
        """Velocity ``[B, C, F_cur, H, W]`` for the last clip of ``clips`` (each ``[B, C, F_i, H_i, W_i]``).

        ``text_tokens [B, S, Dt]`` (``Dt = context_in_dim`` for the teacher, else the model width),
        ``text_mask [B, S]`` (true = real token; ``None`` = all real), ``pooled [B, P]``, ``timestep [B]``
        (global, 0..1000). With ``return_taps`` also returns one dict per block with the image / text
        tokens entering and leaving it (``img_in [B, L, D]``, ``txt_in [B, S, D]``, ``img_out``,
        ``txt_out``; ``txt_out`` is ``None`` for the context_pre_only last block).
        """
        return self._forward(clips, None, text_tokens, text_mask, pooled, timestep, return_taps)

    def forward_static(
        self,
        clips: Sequence[jax.Array],
        history_valid: jax.Array,
        text_tokens: jax.Array,
        text_mask: jax.Array | None,
        pooled: jax.Array,
        timestep: jax.Array,
        *,
        return_taps: bool = False,
    ):
        """Static-shape entry point for export (spec §3.5 / §8.2): one graph per stage sized for the last unit.

        ``clips`` have the fixed layout of the last unit (zeros in unused slots); ``history_valid``
        ``[B, len(clips) - 1]`` or ``[len(clips) - 1]`` marks the history clips that are real. Padding
        slots are masked out (id 2: real tokens never attend to them) and real frames get the frame
        indices they would have without the padding, so the output equals the unpadded call.
        """
        n_hist = len(clips) - 1
        hv = jnp.asarray(history_valid).astype(bool)
        if hv.ndim == 1:
            hv = hv[None]
        if hv.shape[-1] != n_hist:
            raise ValueError(
                f"history_valid has {hv.shape[-1]} entries but there are {n_hist} history clips "
                f"(all clips but the last, current one)"
            )
        return self._forward(clips, hv, text_tokens, text_mask, pooled, timestep, return_taps)

    # -- pieces (block boundaries) ----------------------------------------------------------------------

    def layout(self, clips: Sequence[jax.Array]) -> SequenceLayout:
        """Validate the clip list and return its static token layout."""
        cfg = self.cfg
        if not clips:
            raise ValueError("clips is empty: pass the history clips (oldest first) and then the current clip")
        grids, batch = [], clips[-1].shape[0] if clips[-1].ndim == 5 else None
        p = cfg.patch_size
        for i, clip in enumerate(clips):
            if clip.ndim != 5 or clip.shape[1] != cfg.in_channels:
                raise ValueError(
                    f"clip {i} has shape {tuple(clip.shape)}; expected channels-first "
                    f"[B, {cfg.in_channels}, F, H, W]"
                )
            b, _, f, hh, ww = clip.shape
            if b != batch:
                raise ValueError(f"clip {i} has batch {b} but the current clip has batch {batch}")
            if hh % p or ww % p:
                raise ValueError(f"clip {i} spatial size {hh}x{ww} is not a multiple of the patch size {p}")
            grids.append((f, hh // p, ww // p))
        ref_h, ref_w = grids[-1][1], grids[-1][2]
        if ref_h > cfg.pos_embed_max_size or ref_w > cfg.pos_embed_max_size:
            raise ValueError(
                f"current clip patch grid {ref_h}x{ref_w} exceeds pos_embed_max_size {cfg.pos_embed_max_size}"
            )
        for i, (_, h, w) in enumerate(grids[:-1]):
            if h > ref_h or w > ref_w:
                raise ValueError(
                    f"history clip {i} has patch grid {h}x{w}, larger than the current clip's {ref_h}x{ref_w}: "
                    f"clips must be ordered oldest -> newest with the current (largest) clip last"
                )
        return SequenceLayout(tuple(grids))

    def embed_clips(self, clips: Sequence[jax.Array], layout: SequenceLayout) -> jax.Array:
        """Patch-embed every clip (+ spatial PE) and concatenate: ``[B, L, D]`` float32."""
        toks = [
            self.pos_embed(jnp.transpose(clip, (0, 2, 3, 4, 1)), layout.ref_hw)  # [B, F, H, W, C]
            for clip in clips
        ]
        return jnp.concatenate(toks, axis=1)

    def _check_text(self, text_tokens: jax.Array) -> None:
        want = self.cfg.context_in_dim or self.cfg.hidden_size
        if text_tokens.ndim != 3 or text_tokens.shape[-1] != want:
            what = "context_in_dim (teacher, T5 features)" if self.cfg.context_in_dim else "the model width (ContextAdapter output)"
            raise ValueError(f"text_tokens has shape {tuple(text_tokens.shape)}; expected [B, S, {want}] = {what}")

    def embed_text(self, text_tokens: jax.Array) -> jax.Array:
        """``[B, S, Dt] -> [B, S, D]`` float32 (context embedder for the teacher, identity otherwise)."""
        self._check_text(text_tokens)
        if self.context_embedder is None:
            return text_tokens.astype(jnp.float32)
        return self.context_embedder(text_tokens.astype(self.dtype)).astype(jnp.float32)

    def run_block(self, i: int, x, c, temb, rope_cos, rope_sin, bias):
        """Block ``i`` with the configured remat policy: ``(x [B, L, D], c [B, S, D]) -> (x, c | None)``."""
        block = self.transformer_blocks[i]
        name = self.cfg.remat
        if name == "none":
            return _call_block(block, x, c, temb, rope_cos, rope_sin, bias)
        return nnx.remat(_call_block, policy=REMAT_POLICIES[name])(block, x, c, temb, rope_cos, rope_sin, bias)

    def scan_blocks(self, n: int, x, c, temb, rope_cos, rope_sin, bias):
        """Blocks ``0..n-1`` (none context_pre_only) as one ``lax.scan`` over their stacked weights, each step
        with the configured remat policy; returns ``(x, c)`` after block ``n - 1``."""
        blocks = [self.transformer_blocks[i] for i in range(n)]
        if any(b.context_pre_only for b in blocks):
            raise ValueError("scan_blocks: only blocks before the context_pre_only last block can be scanned")
        # teacher_index is static metadata (it differs per block and changes no computation), so every
        # block runs through the first one's graph.
        graphdef = nnx.graphdef(blocks[0])
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])

        def body(carry, state):
            block = nnx.merge(graphdef, state)
            return block(*carry, temb, rope_cos, rope_sin, bias), None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat])
        (x, c), _ = jax.lax.scan(body, (x, c), stacked)
        return x, c

    def final_layer(self, x: jax.Array, temb: jax.Array, layout: SequenceLayout) -> jax.Array:
        """AdaLN-continuous + ``proj_out`` on the current clip's tokens, unpatchified to ``[B, C, F, H, W]``."""
        cfg = self.cfg
        x = x[:, x.shape[1] - layout.num_current_tokens :]
        scale, shift = self.norm_out(temb)
        y = self.proj_out(modulate(x, shift, scale, cfg.norm_eps).astype(self.dtype)).astype(jnp.float32)
        f, h, w = layout.grids[-1]
        p, c = cfg.patch_size, cfg.out_channels
        y = y.reshape(y.shape[0], f, h, w, p, p, c)
        y = jnp.transpose(y, (0, 6, 1, 2, 4, 3, 5))  # b c f h p1 w p2
        return y.reshape(y.shape[0], c, f, h * p, w * p)

    # -- internals --------------------------------------------------------------------------------------

    def _ids_positions(self, layout: SequenceLayout, history_valid):
        """Image token ids and frame positions, ``[1, L]`` numpy (all real) or ``[B, L]`` traced (padded)."""
        if history_valid is None:
            pos = layout.frame_positions()[None]
            return np.full_like(pos, REAL_ID), pos
        frames = np.asarray([f for f, _, _ in layout.grids], np.int32)
        valid = jnp.concatenate([history_valid, jnp.ones((history_valid.shape[0], 1), bool)], axis=1)
        counts = valid.astype(jnp.int32) * frames[None]
        offsets = jnp.cumsum(counts, axis=1) - counts  # exclusive: real frames before each clip
        clip_idx = layout.clip_index()
        pos = offsets[:, clip_idx] + layout.frame_in_clip()[None]
        ids = jnp.where(valid[:, clip_idx], REAL_ID, IMAGE_PAD_ID)
        return ids, pos

    def _forward(self, clips, history_valid, text_tokens, text_mask, pooled, timestep, return_taps):
        cfg = self.cfg
        layout = self.layout(clips)
        b = clips[-1].shape[0]
        self._check_text(text_tokens)
        if text_tokens.shape[0] != b:
            raise ValueError(f"text_tokens batch {text_tokens.shape[0]} != clip batch {b}")
        if text_mask is None:
            text_mask = jnp.ones(text_tokens.shape[:2], bool)
        if tuple(text_mask.shape) != tuple(text_tokens.shape[:2]):
            raise ValueError(f"text_mask has shape {tuple(text_mask.shape)}; expected {tuple(text_tokens.shape[:2])}")
        if pooled.shape != (b, cfg.pooled_dim):
            raise ValueError(f"pooled has shape {tuple(pooled.shape)}; expected [{b}, {cfg.pooled_dim}]")
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))

        x = self.embed_clips(clips, layout)
        c = self.embed_text(text_tokens)
        temb = self.time_text_embed(timestep, pooled)
        ids, pos = self._ids_positions(layout, history_valid)
        rope_cos, rope_sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
        impl = resolve_attention(cfg.attention, dtype=self.dtype)
        if impl == "dense":
            bias = joint_attention_bias(text_mask, ids, pos)
        else:  # the mask as block structure: the [B, heads, T, T] scores are never materialised
            bias = JointMask.build(text_mask, ids, pos, impl=impl)

        taps = []
        first = 0
        if cfg.scan_blocks and not return_taps and len(self.transformer_blocks) > 2:
            first = len(self.transformer_blocks) - 1
            x, c = self.scan_blocks(first, x, c, temb, rope_cos, rope_sin, bias)
        for i in range(first, len(self.transformer_blocks)):
            x_new, c_new = self.run_block(i, x, c, temb, rope_cos, rope_sin, bias)
            if return_taps:
                taps.append({"img_in": x, "txt_in": c, "img_out": x_new, "txt_out": c_new})
            x, c = x_new, c_new
        out = self.final_layer(x, temb, layout)
        return (out, taps) if return_taps else out


# ---- construction helpers -------------------------------------------------------------------------------


class _KeyStream:
    """Stand-in for ``nnx.Rngs`` when constructing under a trace (``eval_shape`` / ``jit``).

    ``nnx.Rngs`` keeps its counter in a Variable; updating it with a tracer makes flax probe the tracer's
    ``sharding``, whose error message walks the whole jaxpr — quadratic in the parameter count (about 15 s
    for the full model). A Python counter folded into one key gives the same kind of distinct,
    seed-deterministic keys with no traced state.
    """

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)
        self._n = 0

    def params(self) -> jax.Array:
        self._n += 1
        return jax.random.fold_in(self._key, self._n)

    __call__ = params


def abstract_mmdit(cfg: MMDiTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> PyramidMMDiT:
    """The model with ``ShapeDtypeStruct`` parameters (no allocation): shapes, counts, restore targets."""
    return nnx.eval_shape(lambda: PyramidMMDiT(cfg, dtype=dtype, param_dtype=param_dtype, rngs=_KeyStream(0)))


def init_mmdit(cfg: MMDiTConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> PyramidMMDiT:
    """From-scratch init (spec §2.1b) as ONE compiled program instead of one eager program per parameter.

    Deterministic by ``seed`` (keys differ from ``PyramidMMDiT(cfg, rngs=nnx.Rngs(seed))``'s).
    """

    def make():
        return PyramidMMDiT(cfg, dtype=dtype, param_dtype=param_dtype, rngs=_KeyStream(seed))

    graphdef = nnx.graphdef(abstract_mmdit(cfg, dtype=dtype, param_dtype=param_dtype))
    state = jax.jit(lambda: nnx.state(make()))()
    return nnx.merge(graphdef, state)


def _param_vars(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def prune(
    teacher: PyramidMMDiT,
    kept: Sequence[int],
    *,
    keep_context_embedder: bool = True,
) -> PyramidMMDiT:
    """A student made of the teacher's blocks at positions ``kept`` (strictly increasing), sharing weights.

    The student's parameters are the very same ``jax.Array`` objects as the teacher's (no copy, no extra
    memory) held in the student's own ``nnx.Param`` variables: updating the student (training) rebinds its
    variables and never changes the teacher. Embeddings, ``norm_out`` and ``proj_out`` are shared the same
    way; ``keep_context_embedder=False`` drops the teacher's context embedder (Neodragon takes
    ContextAdapter tokens at the model width instead).

    Only a model's last block has the ``context_pre_only`` layout (AdaLN-continuous text modulation, no
    text FFN / out-projection), so the last kept block must be the teacher's last block. Each student
    block remembers its teacher index (``teacher_block_indices``).
    """
    kept = [int(k) for k in kept]
    n = len(teacher.transformer_blocks)
    if not kept:
        raise ValueError("kept is empty: keep at least the teacher's last block")
    if any(k < 0 or k >= n for k in kept):
        raise ValueError(f"kept indices {kept} out of range for a teacher with {n} blocks")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ValueError(f"kept indices must be strictly increasing (block order is preserved), got {kept}")
    if kept[-1] != n - 1:
        raise ValueError(
            f"the last kept block must be the teacher's last block ({n - 1}): only it has the context_pre_only "
            f"layout the student's last block needs (AdaLN-continuous text modulation, no text FFN / "
            f"to_add_out); got kept[-1] = {kept[-1]}"
        )
    tcfg = teacher.cfg
    scfg = dataclasses.replace(
        tcfg,
        num_layers=len(kept),
        teacher_block_indices=tuple(teacher.transformer_blocks[k].teacher_index for k in kept),
        context_in_dim=tcfg.context_in_dim if keep_context_embedder else None,
    )
    student = abstract_mmdit(scfg, dtype=teacher.dtype, param_dtype=teacher.param_dtype)
    tvars = _param_vars(teacher)
    prefix = "transformer_blocks."
    for path, var in _param_vars(student).items():
        src = path
        if path.startswith(prefix):
            idx, rest = path[len(prefix) :].split(".", 1)
            src = f"{prefix}{kept[int(idx)]}.{rest}"
        value = tvars[src].get_value()
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ValueError(f"{path}: teacher {src} has shape {tuple(value.shape)}, student expects {var.get_value().shape}")
        var.set_value(value)
    return student
