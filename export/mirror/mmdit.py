"""PyTorch mirror of the pyramidal MMDiT (spec §2), written from the spec in plain ``torch.nn``.

``PyramidMMDiT(cfg).state_dict()`` has exactly the official checkpoint keys and shapes
(``diffusion_transformer_320p``: 585 tensors for 18 blocks; Pyramid Flow SD3: 779 with the context embedder),
so official weights load with ``load_state_dict(strict=True)`` and our JAX weights reach it through the shared
key map (``export.convert``).

Call: ``model(clips, text_tokens, text_mask, pooled, timestep) -> velocity [B, C, F_cur, H, W]``; ``clips`` are
the history clips oldest -> newest then the current noisy clip, each ``[B, C, F_i, H_i, W_i]``; ``text_tokens
[B, S, Dt]`` (``Dt = context_in_dim`` with a context embedder, else the width D), ``text_mask [B, S]`` (true =
real), ``pooled [B, P]``, ``timestep [B]`` (global, 0..1000).

Implementation choices (the official code's, so the mirror is also an export source):
- the spatial PE is cropped from the persistent ``pos_embed.pos_embed`` buffer ``[1, G*G, D]`` for the current
  clip's patch grid, and resized with ``F.interpolate(bilinear, align_corners=False)`` for history clips;
- temporal RoPE rotates interleaved pairs of every head's Q and K over the whole ``[text; image]`` sequence
  (text sits at position 0, a no-op rotation);
- attention is ``F.scaled_dot_product_attention`` with a boolean ``[B, 1, T, T]`` mask (text-padding id rule
  and temporal causality, spec §2.5).
- ``history_valid`` (optional) is the static-shape export entry: padded history slots get id 2 (never seen
  by real tokens) and real frames keep the positions they would have without padding.

Everything runs in the parameters' dtype except LayerNorm/RMSNorm/RoPE/softmax, which upcast to float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neodragon_jax.config.schema import MMDiTConfig

TIMESTEP_CHANNELS = 256
TEXT_PAD_ID, REAL_ID, IMAGE_PAD_ID = 0, 1, 2


# ---- deterministic tables ---------------------------------------------------------------------------------


def sincos_2d_table(dim: int, grid: int, base_size: int) -> np.ndarray:
    """SD3 ``get_2d_sincos_pos_embed``: ``[1, G*G, D]`` float32, first half encodes the column, second the row."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    coords = (np.arange(grid, dtype=np.float32) / np.float32(grid / base_size)).astype(np.float64)
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ang = np.outer(coords, omega)
    e = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)  # [G, D/2]
    col = np.broadcast_to(e[None, :, :], (grid, grid, dim // 2))
    row = np.broadcast_to(e[:, None, :], (grid, grid, dim // 2))
    return np.concatenate([col, row], axis=-1).reshape(1, grid * grid, dim).astype(np.float32)


def timestep_freqs(dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    """``f_i = exp(-ln(max_period) i / (dim/2))`` in float32, computed as diffusers does."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_sinusoid(t: torch.Tensor, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """``[B] -> [B, 2 * len(freqs)]`` float32 ``[cos(t f), sin(t f)]`` (``flip_sin_to_cos=True``, shift 0).

    At ``t ~ 1000`` one ulp of a frequency moves the argument by ~6e-5, so implementations whose float32
    ``exp`` rounds differently (XLA-CPU vs torch) differ by up to that much here; the table is a buffer
    so a parity check can align it and compare everything downstream tightly.
    """
    freqs = timestep_freqs().to(t.device) if freqs is None else freqs
    args = t.float()[:, None] * freqs.float()[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---- layers -----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """QK RMSNorm over the head dim with a learnable ``weight`` (float32 math)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LN(x) (1 + scale) + shift`` with ``shift``/``scale`` ``[B, D]``."""
    return layer_norm(x, eps) * (1.0 + scale[:, None].float()) + shift[:, None].float()


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers names)."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """``temb = MLP_t(sinusoid(t)) + MLP_p(pooled)`` -> ``[B, D]``."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)
        # Deterministic, not in the checkpoint (non-persistent).
        self.register_buffer("timestep_freqs", timestep_freqs(TIMESTEP_CHANNELS), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the frequency table (after a meta-device build loaded with ``assign=True``)."""
        if not torch.empty(0).is_meta:
            self.timestep_freqs = timestep_freqs(TIMESTEP_CHANNELS)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        dt = self.timestep_embedder.linear_1.weight.dtype
        # Low-precision weights: t is rounded to that dtype before the sinusoid (spec §2.2).
        t = timestep.to(dt).float()
        emb = timestep_sinusoid(t, self.timestep_freqs)
        return self.timestep_embedder(emb.to(dt)).float() + self.text_embedder(pooled.to(dt)).float()


class PatchEmbed(nn.Module):
    """Per-frame ``p x p`` conv (``proj``) plus the cropped sin-cos table (persistent buffer ``pos_embed``)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        d, p, g = cfg.hidden_size, cfg.patch_size, cfg.pos_embed_max_size
        self.patch_size, self.grid, self.base_size, self.dim = p, g, cfg.sample_size // p, d
        self.proj = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", torch.zeros(1, g * g, d), persistent=True)
        if not self.pos_embed.is_meta:
            with torch.no_grad():
                self.pos_embed.copy_(self._table())

    def _table(self) -> torch.Tensor:
        return torch.from_numpy(sincos_2d_table(self.dim, self.grid, self.base_size))

    def reset_buffers(self) -> None:
        """Fill the table if it is still on the meta device (a meta build whose checkpoint lacked it); a
        loaded table is kept, as ``load_state_dict`` keeps the official file's (bf16-rounded) buffer."""
        if self.pos_embed.is_meta and not torch.empty(0).is_meta:
            self.pos_embed = self._table().to(self.proj.weight.dtype)

    def cropped(self, h: int, w: int) -> torch.Tensor:
        """Centre crop ``[1, D, h, w]`` (rows from ``(G-h)//2``, cols from ``(G-w)//2``)."""
        g = self.grid
        if h > g or w > g:
            raise ValueError(f"patch grid {h}x{w} exceeds pos_embed_max_size {g}")
        top, left = (g - h) // 2, (g - w) // 2
        table = self.pos_embed.reshape(1, g, g, self.dim)[:, top : top + h, left : left + w]
        return table.permute(0, 3, 1, 2)

    def forward(self, clip: torch.Tensor, ref_hw: tuple[int, int]) -> torch.Tensor:
        """``[B, C, F, H, W] -> [B, F*h*w, D]`` (frame-major, then row, then column)."""
        b, c, f, hh, ww = clip.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        x = clip.permute(0, 2, 1, 3, 4).reshape(b * f, c, hh, ww).to(self.proj.weight.dtype)
        x = self.proj(x).flatten(2).transpose(1, 2).float()  # [B*F, h*w, D]
        pe = self.cropped(*ref_hw).float()
        if (h, w) != tuple(ref_hw):
            pe = F.interpolate(pe, size=(h, w), mode="bilinear", align_corners=False)
        pe = pe.flatten(2).transpose(1, 2)  # [1, h*w, D]
        return (x + pe).reshape(b, f * h * w, self.dim)


def rope_cos_sin(pos: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos [B, T]`` -> cos/sin ``[B, T, dim/2]`` (angles in float64, like the official code)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    ang = pos.double()[..., None] * inv
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(2k, 2k+1)`` of ``x [B, N, T, K]`` by ``cos/sin [B, T, K/2]``."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None], sin[:, None]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


class JointAttention(nn.Module):
    """SD3 joint attention with QK RMSNorm; ``to_out`` is ``[Linear, Dropout]`` (official ``to_out.0``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, eps: float, context_pre_only: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_add_q, self.norm_add_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)  # [B, N, T, K]

    def forward(self, x, c, cos, sin, mask):
        s = c.shape[1]
        q = torch.cat([self.norm_add_q(self._heads(self.add_q_proj(c))), self.norm_q(self._heads(self.to_q(x)))], 2)
        k = torch.cat([self.norm_add_k(self._heads(self.add_k_proj(c))), self.norm_k(self._heads(self.to_k(x)))], 2)
        v = torch.cat([self._heads(self.add_v_proj(c)), self._heads(self.to_v(x))], 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], self.heads * self.head_dim)
        x_out = self.to_out[1](self.to_out[0](o[:, s:]))
        c_out = None if self.to_add_out is None else self.to_add_out(o[:, :s])
        return x_out, c_out


class GELUProj(nn.Module):
    """diffusers ``GELU(approximate='tanh')``: ``proj`` then tanh-GELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net = [GELUProj, Dropout, Linear]`` (official keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, hidden), nn.Dropout(0.0), nn.Linear(hidden, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


def _linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation runs in float32 whatever the storage dtype (team convention)."""
    return F.linear(x, layer.weight.float(), layer.bias.float())


class AdaLayerNormZero(nn.Module):
    """``linear(SiLU(temb))`` -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, temb):
        return _linear_f32(self.linear, F.silu(temb.float())).chunk(6, dim=-1)


class AdaLayerNormContinuous(nn.Module):
    """``linear(SiLU(temb))`` -> (scale, shift), SCALE FIRST."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, temb):
        return _linear_f32(self.linear, F.silu(temb.float())).chunk(2, dim=-1)


class JointTransformerBlock(nn.Module):
    """One joint block (spec §2.3); ``context_pre_only`` = the model's last block."""

    def __init__(self, cfg: MMDiTConfig, context_pre_only: bool):
        super().__init__()
        d = cfg.hidden_size
        self.context_pre_only = context_pre_only
        self.eps = cfg.norm_eps
        self.norm1 = AdaLayerNormZero(d)
        self.norm1_context = AdaLayerNormContinuous(d) if context_pre_only else AdaLayerNormZero(d)
        self.attn = JointAttention(
            d, cfg.num_heads, cfg.head_dim, eps=cfg.qk_norm_eps, context_pre_only=context_pre_only
        )
        self.ff = FeedForward(d, d * cfg.mlp_ratio)
        self.ff_context = None if context_pre_only else FeedForward(d, d * cfg.mlp_ratio)

    def forward(self, x, c, temb, cos, sin, mask):
        """``x [B, L, D]``, ``c [B, S, D]`` float32 residual streams -> new ``(x, c | None)``."""
        eps, dt = self.eps, self.norm1.linear.weight.dtype
        sh1, sc1, g1, sh2, sc2, g2 = self.norm1(temb)
        x_in = modulate(x, sh1, sc1, eps).to(dt)
        if self.context_pre_only:
            c_sc, c_sh = self.norm1_context(temb)
            c_in = modulate(c, c_sh, c_sc, eps).to(dt)
        else:
            c_sh1, c_sc1, c_g1, c_sh2, c_sc2, c_g2 = self.norm1_context(temb)
            c_in = modulate(c, c_sh1, c_sc1, eps).to(dt)
        x_attn, c_attn = self.attn(x_in, c_in, cos, sin, mask)
        x = x + g1[:, None] * x_attn.float()
        x = x + g2[:, None] * self.ff(modulate(x, sh2, sc2, eps).to(dt)).float()
        if self.context_pre_only:
            return x, None
        c = c + c_g1[:, None] * c_attn.float()
        c = c + c_g2[:, None] * self.ff_context(modulate(c, c_sh2, c_sc2, eps).to(dt)).float()
        return x, c


# ---- the model --------------------------------------------------------------------------------------------


class PyramidMMDiT(nn.Module):
    """Pyramidal MMDiT with the official module names (``cfg.context_in_dim`` set = teacher layout)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        if cfg.num_layers < 1 or cfg.head_dim % 2:
            raise ValueError(f"MMDiT needs >= 1 block and an even head_dim, got {cfg.num_layers} / {cfg.head_dim}")
        self.cfg = cfg
        d = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(d, cfg.pooled_dim)
        self.context_embedder = nn.Linear(cfg.context_in_dim, d) if cfg.context_in_dim else None
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(cfg, context_pre_only=(i == cfg.num_layers - 1)) for i in range(cfg.num_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)

    # -- layout ------------------------------------------------------------------------------------------
    def grids(self, clips: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
        cfg, p = self.cfg, self.cfg.patch_size
        if not clips:
            raise ValueError("clips is empty: pass the history clips (oldest first) and then the current clip")
        out = []
        for i, clip in enumerate(clips):
            if clip.ndim != 5 or clip.shape[1] != cfg.in_channels:
                raise ValueError(f"clip {i} has shape {tuple(clip.shape)}; expected [B, {cfg.in_channels}, F, H, W]")
            if clip.shape[3] % p or clip.shape[4] % p:
                raise ValueError(f"clip {i} spatial size {tuple(clip.shape[3:])} is not a multiple of the patch {p}")
            out.append((clip.shape[2], clip.shape[3] // p, clip.shape[4] // p))
        ref = out[-1][1:]
        for i, (_, h, w) in enumerate(out[:-1]):
            if h > ref[0] or w > ref[1]:
                raise ValueError(f"history clip {i} grid {h}x{w} is larger than the current clip's {ref[0]}x{ref[1]}")
        return out

    @staticmethod
    def _ids_positions(grids, history_valid, batch: int, device):
        """Image token ids and frame positions ``[B, L]`` (``history_valid [B, n_hist]`` or None).

        The layout is static (numpy at trace time) so exported graphs get constants, not data-dependent ops.
        """
        frames = np.asarray([f for f, _, _ in grids], np.int64)
        clip_idx = np.concatenate([np.full(f * h * w, i, np.int64) for i, (f, h, w) in enumerate(grids)])
        frame_in_clip = np.concatenate([np.repeat(np.arange(f, dtype=np.int64), h * w) for f, h, w in grids])
        if history_valid is None:
            pos = (np.concatenate([[0], np.cumsum(frames)[:-1]])[clip_idx] + frame_in_clip)[None]
            pos = torch.from_numpy(pos).to(device).expand(batch, -1)
            return torch.full_like(pos, REAL_ID), pos
        hv = history_valid.to(device=device, dtype=torch.bool).reshape(-1, len(grids) - 1).expand(batch, -1)
        valid = torch.cat([hv, torch.ones(batch, 1, dtype=torch.bool, device=device)], 1)
        counts = valid.long() * torch.from_numpy(frames).to(device)[None]
        offsets = torch.cumsum(counts, 1) - counts  # real frames before each clip
        idx = torch.from_numpy(clip_idx).to(device)
        pos = offsets[:, idx] + torch.from_numpy(frame_in_clip).to(device)[None]
        ids = torch.where(valid[:, idx], REAL_ID, IMAGE_PAD_ID)
        return ids, pos

    @staticmethod
    def attention_mask(text_mask: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B, 1, S+L, S+L]`` (true = may attend): equal ids and ``pos_q >= pos_k``."""
        b, s = text_mask.shape
        text_ids = torch.where(text_mask.bool(), REAL_ID, TEXT_PAD_ID)
        all_ids = torch.cat([text_ids, ids], 1)
        all_pos = torch.cat([torch.zeros(b, s, dtype=pos.dtype, device=pos.device), pos], 1)
        allowed = (all_ids[:, :, None] == all_ids[:, None, :]) & (all_pos[:, :, None] >= all_pos[:, None, :])
        return allowed[:, None]

    # -- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        clips: Sequence[torch.Tensor],
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor | None,
        pooled: torch.Tensor,
        timestep: torch.Tensor,
        history_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        grids = self.grids(clips)
        b = clips[-1].shape[0]
        want = cfg.context_in_dim or cfg.hidden_size
        if text_tokens.ndim != 3 or text_tokens.shape[-1] != want or text_tokens.shape[0] != b:
            raise ValueError(f"text_tokens has shape {tuple(text_tokens.shape)}; expected [{b}, S, {want}]")
        if text_mask is None:
            text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
        if pooled.shape != (b, cfg.pooled_dim):
            raise ValueError(f"pooled has shape {tuple(pooled.shape)}; expected [{b}, {cfg.pooled_dim}]")
        if history_valid is not None and history_valid.shape[-1] != len(clips) - 1:
            raise ValueError(f"history_valid has {history_valid.shape[-1]} entries for {len(clips) - 1} history clips")
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=text_tokens.device).reshape(-1).expand(b)
        dt = self.proj_out.weight.dtype

        ref_hw = grids[-1][1:]
        x = torch.cat([self.pos_embed(clip, ref_hw) for clip in clips], 1)
        c = text_tokens.to(dt)
        c = (self.context_embedder(c) if self.context_embedder is not None else c).float()
        temb = self.time_text_embed(timestep, pooled)
        ids, pos = self._ids_positions(grids, history_valid, b, x.device)
        mask = self.attention_mask(text_mask, ids, pos)
        all_pos = torch.cat([torch.zeros(b, c.shape[1], dtype=pos.dtype, device=pos.device), pos], 1)
        cos, sin = rope_cos_sin(all_pos, cfg.head_dim, cfg.rope_theta)

        for blk in self.transformer_blocks:
            x, c = blk(x, c, temb, cos, sin, mask)

        f, h, w = grids[-1]
        x = x[:, x.shape[1] - f * h * w :]
        scale, shift = self.norm_out(temb)
        y = self.proj_out(modulate(x, shift, scale, cfg.norm_eps).to(dt)).float()
        p, co = cfg.patch_size, cfg.out_channels
        y = y.reshape(b, f, h, w, p, p, co).permute(0, 6, 1, 2, 4, 3, 5)  # b c f h p1 w p2
        return y.reshape(b, co, f, h * p, w * p)


__all__ = ["PyramidMMDiT", "sincos_2d_table", "timestep_freqs", "timestep_sinusoid"]
