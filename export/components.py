"""Per-component static-shape PyTorch graphs + example inputs: what the TFLite, ONNX and AI Hub exporters convert.

One :class:`Component` per on-device graph (spec §1.1, §3.5, §8.2), built around the PyTorch mirror
(:mod:`export.mirror`) of a JAX model:

==========================  =====================================================================================
``clip_l`` / ``clip_g``     ``ids [B, S_clip] int32 -> text_embeds [B, P]`` (pooled CLIP projection)
``distil_t5``               ``ids [B, S] int32, mask [B, S] f32 -> [B, S, P_dt5]`` (Neodragon stack)
``context_adapter``         ``[B, S, P_dt5] -> text tokens [B, S, D]`` (separate artifact, Neodragon stack)
``t5``                      ``ids, mask -> [B, S, D_t5]`` (teacher stack only)
``mmdit_stage{s}``          one graph per pyramid stage sized for the LAST unit: ``clip_0 .. clip_{n-1}``
                            (one history frame each, oldest first, at the resolution the last unit sees it),
                            ``current [B, C, 1, h_s, w_s]``, ``history_valid [B, n] f32`` (1 = real slot, 0 =
                            padding: earlier units zero-fill and mask the oldest slots; absent for a
                            one-frame video), ``text_tokens``,
                            ``text_mask [B, S] f32``, ``pooled [B, P]``, ``timestep [B] f32`` (global, 0..1000)
                            -> ``velocity [B, C, 1, h_s, w_s]``. With ``mmdit_split = k`` each stage is ``k``
                            graphs over block ranges (``..._part{i}of{k}``) passing ``x [B, L, D]``,
                            ``c [B, S, D]``, ``temb [B, D]`` along, each re-deriving mask and RoPE from
                            ``text_mask`` / ``history_valid`` (cheap) so no ``[B, 1, T, T]`` tensor crosses graphs.
``vae_encoder``             first frame ``[B, 3, 1, H, W]`` in [-1, 1] -> ``mean, logvar [B, L, 1, h, w]``
``light_decoder``           whole clip: raw latents ``[B, L, T, h, w]`` -> ``[B, 3, 8T - 7, 8h, 8w]``
                            (``post_quant_conv`` + TAEHV decoder, not clipped, not de-normalised)
``light_decoder_step``      streaming: ``z_t [B, L, 1, h, w]`` + one carried memory per MemBlock
                            (``mem_i [B, C_i, h_i, w_i]``, zeros at t = 0) -> ``frames [B, 3, 2^k, 8h, 8w]``
                            + the new memories; at t = 0 drop the first ``2^k - 1`` frames (as the clip graph)
``vae_decoder``             native decoder, whole clip (teacher stack only)
==========================  =====================================================================================

The graphs avoid int64 / float64 / bool tensors at their boundary and inside the MMDiT masking (masks are
float inputs, token ids and positions float32 arithmetic, gathers and the cumulative sum are constant
matmuls) so the same graph suits LiteRT, ONNX Runtime and Qualcomm's QNN. Attention uses an additive mask
of :data:`MASK_VALUE` (exactly zero weight after the float32 softmax, and representable in float16).

``Component.expected()`` is the mirror's output on ``Component.inputs``: every exporter compares its
artifact to it. Weights: :func:`load_jax_models` (an official-layout folder, or random NON-ZERO weights so
the checks are meaningful: the from-scratch init zeroes the MMDiT output layers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.mirror.mmdit import modulate
from neodragon_jax.config.schema import Config

MASK_VALUE = -1.0e4  # additive attention mask: exp(-1e4) == 0 in float32, and it fits float16
TEXT_PAD_ID, REAL_ID, IMAGE_PAD_ID = 0.0, 1.0, 2.0


class ExportError(ValueError):
    """A configuration the exporters cannot turn into static graphs (message says what to change)."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Static shapes of the exported graphs.

    ``batch``: 1 on device (hybrid mode has no CFG). ``mmdit_split``: graphs per MMDiT stage (block ranges of
    ``ceil(num_layers / mmdit_split)``), to respect per-graph size limits (e.g. QNN context binaries).
    ``num_frames``: video frames (default ``cfg.video.num_frames``), which fixes the last unit and the clip
    length of the whole-clip decoder. ``seed``: example inputs.
    """

    batch: int = 1
    mmdit_split: int = 1
    num_frames: int | None = None
    seed: int = 0
    components: tuple[str, ...] | None = None  # names or group names to build; None = all


@dataclasses.dataclass
class Component:
    """One static-shape graph: a torch module taking positional tensors, example inputs and metadata."""

    name: str
    group: str  # report row: split MMDiT parts share their stage's group
    module: nn.Module
    inputs: dict[str, np.ndarray]  # ordered as the module's positional arguments
    output_names: tuple[str, ...]
    image_outputs: tuple[str, ...] = ()  # decoded frames in [-1, 1]: PSNR is reported for them
    jax_fn: Callable[..., Any] | None = None  # same inputs -> outputs, for the JAX latency column
    description: str = ""

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def torch_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self.inputs.values())

    def run_torch(self) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            out = self.module(*self.torch_inputs())
        out = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(o.detach().cpu().numpy() for o in out)

    @functools.cached_property
    def _expected(self) -> tuple[np.ndarray, ...]:
        out = self.run_torch()
        if len(out) != len(self.output_names):
            raise RuntimeError(f"{self.name}: module returned {len(out)} outputs, expected {self.output_names}")
        return out

    def expected(self) -> dict[str, np.ndarray]:
        """The mirror's outputs on :attr:`inputs` (computed once)."""
        return dict(zip(self.output_names, self._expected))

    def input_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{name: (shape, dtype)}`` (AI Hub ``input_specs`` form)."""
        return {k: (tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in self.inputs.items()}


# ---- graphs ---------------------------------------------------------------------------------------------------


class TextTokensGraph(nn.Module):
    """T5-family encoder: ``(ids int32, mask f32) -> [B, S, D]`` (``distil_t5`` wrapper or a bare T5 encoder)."""

    def __init__(self, mirror: nn.Module, bare_t5: bool):
        super().__init__()
        self.mirror, self.bare_t5 = mirror, bare_t5

    def forward(self, ids, mask):
        if self.bare_t5:
            return self.mirror(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.mirror(ids, mask)


class CLIPPooledGraph(nn.Module):
    """``ids [B, S] int32 -> text_embeds [B, P]`` (projected pooled CLIP output, what the MMDiT consumes)."""

    def __init__(self, mirror: nn.Module):
        super().__init__()
        self.mirror = mirror

    def forward(self, ids):
        return self.mirror(input_ids=ids).text_embeds


class ContextAdapterGraph(nn.Module):
    def __init__(self, mirror: nn.Module):
        super().__init__()
        self.mirror = mirror

    def forward(self, x):
        return self.mirror(x)


class MMDiTGraph(nn.Module):
    """Blocks ``[start, stop)`` of the mirror MMDiT for one static per-frame clip layout (see module docstring).

    ``grids``: ``(h, w)`` patch grid of every clip (history slots oldest first, then the current clip), each
    one frame. Positions and ids follow ``export.mirror.mmdit.PyramidMMDiT._ids_positions`` with
    ``history_valid``: padding slots get id 2, real frames the positions they have without padding.
    """

    def __init__(self, mirror: nn.Module, grids: Sequence[tuple[int, int]], start: int, stop: int,
                 current_frames: int = 1):
        super().__init__()
        cfg = mirror.cfg
        n = cfg.num_layers
        if not 0 <= start < stop <= n:
            raise ExportError(f"MMDiT block range [{start}, {stop}) is outside [0, {n})")
        self.cfg, self.grids = cfg, [tuple(g) for g in grids]
        self.current_frames = int(current_frames)
        self.first, self.last = start == 0, stop == n
        self.n_clips = len(grids)
        self.blocks = nn.ModuleList(list(mirror.transformer_blocks)[start:stop])
        if self.first:
            self.proj = mirror.pos_embed.proj
            self.time_text_embed = mirror.time_text_embed
            self.context_embedder = mirror.context_embedder
            # The layout is static, so the cropped (and, for smaller history grids, resized) sin-cos table is
            # a [1, L, D] constant: the graph never carries the whole G*G table (226 MB at full size).
            with torch.no_grad():
                self.register_buffer("pos_table", self._pos_table(mirror.pos_embed), persistent=False)
        if self.last:
            self.norm_out, self.proj_out = mirror.norm_out, mirror.proj_out
        # Every history slot is one frame; the current clip has ``current_frames`` (a unit's frames).
        frames = [1] * (self.n_clips - 1) + [self.current_frames]
        tokens = [h * w * f for (h, w), f in zip(self.grids, frames)]
        clip_of_token = np.repeat(np.arange(self.n_clips), tokens)
        onehot = np.zeros((self.n_clips, len(clip_of_token)), np.float32)
        onehot[clip_of_token, np.arange(len(clip_of_token))] = 1.0
        frame_in_clip = np.concatenate([np.repeat(np.arange(f), h * w) for (h, w), f in zip(self.grids, frames)])
        # A token's position is the number of real frames before its clip plus its frame within the clip:
        # ``(valid * frames) @ strict_upper`` is that exclusive cumulative sum, ``@ onehot`` gathers it per token.
        strict_upper = np.triu(np.ones((self.n_clips, self.n_clips), np.float32), k=1)
        self.register_buffer("token_of_clip", torch.from_numpy(onehot), persistent=False)
        self.register_buffer("clips_before", torch.from_numpy(strict_upper), persistent=False)
        self.register_buffer("clip_frames", torch.tensor(frames, dtype=torch.float32), persistent=False)
        self.register_buffer("frame_in_clip", torch.from_numpy(frame_in_clip.astype(np.float32)), persistent=False)
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
        self.register_buffer("rope_inv_freq", torch.from_numpy(inv.astype(np.float32)), persistent=False)

    def _pos_table(self, patch_embed) -> torch.Tensor:
        ref = self.grids[-1]
        crop = patch_embed.cropped(*ref).float()  # [1, D, h, w]
        tables = []
        for h, w in self.grids:
            pe = crop if (h, w) == tuple(ref) else F.interpolate(crop, size=(h, w), mode="bilinear",
                                                                 align_corners=False)
            tables.append(pe.flatten(2).transpose(1, 2))
        tables[-1] = tables[-1].repeat(1, self.current_frames, 1)  # frame-major, as the patch tokens
        return torch.cat(tables, 1).contiguous()

    def patchify(self, clip: torch.Tensor) -> torch.Tensor:
        """``[B, C, 1, H, W] -> [B, h*w, D]`` (the mirror's per-frame patch conv, without the table)."""
        b, c, f, hh, ww = clip.shape
        x = clip.permute(0, 2, 1, 3, 4).reshape(b * f, c, hh, ww).to(self.proj.weight.dtype)
        x = self.proj(x).flatten(2).transpose(1, 2).float()
        return x.reshape(b, -1, x.shape[-1])

    def mask_and_rope(self, text_mask, history_valid):
        b, s = text_mask.shape
        ones = torch.ones(b, 1, dtype=text_mask.dtype)
        valid = ones if history_valid is None else torch.cat([history_valid, ones], 1)  # [B, n_clips]
        pos = ((valid * self.clip_frames) @ self.clips_before) @ self.token_of_clip + self.frame_in_clip  # [B, L]
        ids = torch.where((valid @ self.token_of_clip) > 0.5, REAL_ID, IMAGE_PAD_ID)
        text_ids = torch.where(text_mask > 0.5, REAL_ID, TEXT_PAD_ID)
        all_ids = torch.cat([text_ids, ids], 1)
        all_pos = torch.cat([torch.zeros(b, s, dtype=pos.dtype), pos], 1)
        allowed = (all_ids[:, :, None] == all_ids[:, None, :]) & (all_pos[:, :, None] >= all_pos[:, None, :])
        bias = torch.where(allowed, 0.0, MASK_VALUE)[:, None]  # [B, 1, T, T]
        ang = all_pos[..., None] * self.rope_inv_freq
        return bias, torch.cos(ang), torch.sin(ang)

    def forward(self, *args):
        if self.first:
            clips = args[: self.n_clips]
            rest = args[self.n_clips :]
            history_valid, rest = (rest[0], rest[1:]) if self.n_clips > 1 else (None, rest)
            text_tokens, text_mask, pooled, timestep = rest
            x = torch.cat([self.patchify(clip) for clip in clips], 1) + self.pos_table
            dt = self.blocks[0].norm1.linear.weight.dtype
            c = text_tokens.to(dt)
            c = (self.context_embedder(c) if self.context_embedder is not None else c).float()
            temb = self.time_text_embed(timestep, pooled)
        else:
            x, c, temb, text_mask = args[:4]
            history_valid = args[4] if self.n_clips > 1 else None
        mask, cos, sin = self.mask_and_rope(text_mask, history_valid)
        for blk in self.blocks:
            x, c = blk(x, c, temb, cos, sin, mask)
        if not self.last:
            return x, c, temb
        h, w = self.grids[-1]
        f = self.current_frames
        b, cfg = x.shape[0], self.cfg
        x = x[:, x.shape[1] - f * h * w :]
        scale, shift = self.norm_out(temb)
        dt = self.proj_out.weight.dtype
        y = self.proj_out(modulate(x, shift, scale, cfg.norm_eps).to(dt)).float()
        p, co = cfg.patch_size, cfg.out_channels
        y = y.reshape(b, f, h, w, p, p, co).permute(0, 6, 1, 2, 4, 3, 5)
        return y.reshape(b, co, f, h * p, w * p)


class VAEEncoderGraph(nn.Module):
    """First frame ``[B, 3, 1, H, W] -> (mean, logvar) [B, L, 1, h, w]`` (encoder + quant_conv, logvar clamped)."""

    def __init__(self, vae_mirror: nn.Module):
        super().__init__()
        self.encoder, self.quant_conv = vae_mirror.encoder, vae_mirror.quant_conv
        c = vae_mirror.cfg.causal
        self.lo, self.hi = c.logvar_min, c.logvar_max

    def forward(self, video):
        mean, logvar = self.quant_conv(self.encoder(video)).chunk(2, dim=1)
        return mean, logvar.clamp(self.lo, self.hi)


class DecoderGraph(nn.Module):
    """Whole clip: ``post_quant_conv`` + decoder (light or native)."""

    def __init__(self, vae_mirror: nn.Module):
        super().__init__()
        self.post_quant_conv, self.decoder = vae_mirror.post_quant_conv, vae_mirror.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class LightDecoderStepGraph(nn.Module):
    """One latent frame of TAEHV streaming with every MemBlock's memory as explicit input / output.

    A MemBlock's memory is its input's last frame of the previous step (at that block's frame rate), which
    is exactly what the parallel mode's one-frame shift gives, so streaming equals the whole-clip graph.
    """

    def __init__(self, vae_mirror: nn.Module):
        super().__init__()
        from export.mirror.light_decoder import MemBlock

        self.post_quant_conv, self.decoder = vae_mirror.post_quant_conv, vae_mirror.decoder
        self.is_mem = [isinstance(b, MemBlock) for b in self.decoder.blocks]

    def memory_shapes(self, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
        """``[B, C_i, h_i, w_i]`` of every MemBlock memory for a ``h x w`` latent."""
        shapes = []
        with torch.no_grad():
            x = torch.zeros(batch, self.decoder.cfg.latent_channels, h, w)
            for blk, mem in zip(self.decoder.blocks, self.is_mem):
                if mem:
                    shapes.append((batch, *x.shape[1:]))
                    x = blk(x, torch.zeros_like(x))
                else:
                    x = blk(x)
        return shapes

    def forward(self, z_t, *memories):
        b = z_t.shape[0]
        x = self.post_quant_conv(z_t)[:, :, 0]  # [B, L, h, w]
        new, i = [], 0
        for blk, mem in zip(self.decoder.blocks, self.is_mem):
            if mem:
                nt, c, h, w = x.shape
                seq = x.reshape(b, nt // b, c, h, w)
                past = torch.cat([memories[i][:, None], seq[:, :-1]], 1).reshape(nt, c, h, w)
                new.append(seq[:, -1])
                x = blk(x, past)
                i += 1
            else:
                x = blk(x)
        nt, c, h, w = x.shape
        frames = x.reshape(b, nt // b, c, h, w).permute(0, 2, 1, 3, 4)
        return (frames, *new)


# ---- weights ---------------------------------------------------------------------------------------------------


def neodragon_variant(cfg: Config) -> Config:
    """``cfg`` with the Neodragon deployment stack (DistilT5 + ContextAdapter, no context embedder, light
    decoder): the tiny preset is teacher-family, this is its on-device counterpart."""
    m = cfg.model
    text = dataclasses.replace(m.text, kind="neodragon")
    mmdit = dataclasses.replace(m.mmdit, context_in_dim=None)
    if text.context_adapter.out_dim != mmdit.hidden_size:
        raise ExportError(
            f"context_adapter.out_dim ({text.context_adapter.out_dim}) must equal the MMDiT width "
            f"({mmdit.hidden_size}) for the Neodragon stack"
        )
    vae = dataclasses.replace(m.vae, decoder="light")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, text=text, mmdit=mmdit, vae=vae))


def load_jax_models(cfg: Config, checkpoint: str | None = None, *, seed: int = 0) -> tuple[Config, dict]:
    """``(cfg, {"text", "mmdit", "vae"})`` JAX modules: an official-layout folder (``cfg`` from its
    ``config.json`` files), or random non-zero weights (``export.convert.random_weights``)."""
    from flax import nnx

    if checkpoint:
        from export.convert import official_folder_to_jax

        pipe = official_folder_to_jax(checkpoint, cfg)
        return pipe.cfg, {"text": pipe.text, "mmdit": pipe.mmdit, "vae": pipe.vae}
    from export.convert import random_weights
    from neodragon_jax.models.mmdit import abstract_mmdit
    from neodragon_jax.models.text.conditioner import TextConditioner
    from neodragon_jax.models.vae import CausalVideoVAE

    text = random_weights(nnx.eval_shape(lambda: TextConditioner(cfg.model.text, rngs=nnx.Rngs(0))), seed)
    mmdit = random_weights(abstract_mmdit(cfg.model.mmdit), seed + 1)
    vae = random_weights(nnx.eval_shape(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0))), seed + 2)
    return cfg, {"text": text, "mmdit": mmdit, "vae": vae}


# ---- layout ----------------------------------------------------------------------------------------------------


def latent_geometry(cfg: Config, num_frames: int | None = None) -> tuple[int, int, int]:
    """``(T, h, w)`` of the full latent video."""
    from neodragon_jax.models.vae import latent_frames

    c = cfg.model.vae.causal
    f = num_frames or cfg.video.num_frames
    s = c.spatial_factor
    if cfg.video.height % s or cfg.video.width % s:
        raise ExportError(f"video {cfg.video.height}x{cfg.video.width} is not a multiple of the VAE factor {s}")
    try:
        t = latent_frames(f, c.temporal_factor)
    except ValueError as err:
        raise ExportError(f"--frames / video.num_frames: {err}") from None
    return t, cfg.video.height // s, cfg.video.width // s


def stage_grids(cfg: Config, stage: int, num_frames: int | None = None) -> list[tuple[int, int]]:
    """Patch grid ``(h, w)`` of every slot of the LAST unit at ``stage``: one slot per history FRAME (oldest
    first), then the current clip (``cfg.pyramid.frames_per_unit`` frames, see :func:`current_frames`). A
    history unit at distance ``d`` is at stage ``max(stage - d + 1, 0)`` (spec §3.5), so an earlier unit's
    history fills the newest slots of this layout at the same resolutions (:func:`history_slots`)."""
    from neodragon_jax.pyramid.history import history_layout, num_units

    t, h, w = latent_geometry(cfg, num_frames)
    n_stages, p, fpu = cfg.pyramid.num_stages, cfg.model.mmdit.patch_size, cfg.pyramid.frames_per_unit
    try:
        last = num_units(t, fpu) - 1
    except ValueError as err:
        raise ExportError(f"{t} latent frames do not split into units of {fpu}: {err}") from None

    def grid(st: int) -> tuple[int, int]:
        d = 2 ** (n_stages - 1 - st)
        if h % (d * p) or w % (d * p):
            raise ExportError(f"latent {h}x{w} at stage {st} (/{d}) is not a multiple of the patch {p}")
        return h // d // p, w // d // p

    slots = [grid(c.stage) for c in history_layout(last, stage, frames_per_unit=fpu) for _ in range(c.num_frames)]
    return slots + [grid(stage)]


def current_frames(cfg: Config, first_unit: bool = False) -> int:
    """Latent frames of the clip a stage graph denoises: unit 0 has one, every later unit ``frames_per_unit``."""
    return 1 if first_unit else cfg.pyramid.frames_per_unit


def first_unit_graphs(cfg: Config) -> bool:
    """With several frames per unit, unit 0 (one frame, no history) needs its own graph per stage; with one,
    the stage graph serves it with every history slot marked unused."""
    return cfg.pyramid.frames_per_unit > 1


def block_ranges(num_layers: int, parts: int) -> list[tuple[int, int]]:
    if not 1 <= parts <= num_layers:
        raise ExportError(f"mmdit_split must be between 1 and the number of blocks ({num_layers}), got {parts}")
    size = -(-num_layers // parts)
    return [(i, min(i + size, num_layers)) for i in range(0, num_layers, size)]


def stage_timesteps(cfg: Config) -> tuple[float, ...]:
    from neodragon_jax.pyramid.scheduler import make_schedule

    return make_schedule(cfg.pyramid).t_max


# ---- JAX callables (latency column) ----------------------------------------------------------------------------


def _jax_fn(module, fn: Callable) -> Callable:
    """``fn(module, *numpy inputs)`` jitted with the weights as arguments; returns numpy outputs."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    jitted = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))

    def call(*inputs):
        out = jitted(state, *inputs)
        return jax.tree.map(np.asarray, jax.block_until_ready(out))

    return call


# ---- building ---------------------------------------------------------------------------------------------------


def _text_ids(cfg: Config, batch: int, rng) -> dict[str, np.ndarray]:
    """Token ids / mask from the config's tokenizers (random ids if it has none)."""
    t = cfg.model.text
    prompts = ["a red fox running through fresh snow at sunrise"] * batch
    try:
        from neodragon_jax.models.text.tokenizers import TextTokenizers

        tok = TextTokenizers.for_config(t)(prompts)
        return {k: np.asarray(getattr(tok, k)) for k in ("t5_ids", "t5_mask", "clip_l_ids", "clip_g_ids")}
    except (ValueError, FileNotFoundError, OSError):
        n = t.max_length
        vocab = t.distil_t5.body.vocab_size if t.kind == "neodragon" else t.t5.vocab_size
        mask = np.zeros((batch, n), np.int64)
        mask[:, : max(1, n * 5 // 8)] = 1
        out = {"t5_ids": rng.integers(1, vocab - 1, (batch, n)) * mask, "t5_mask": mask}
        for name in ("clip_l", "clip_g"):
            c = getattr(t, name)
            ids = rng.integers(1, c.vocab_size - 2, (batch, t.clip_max_length))
            ids[:, t.clip_max_length // 2] = c.vocab_size - 1  # an EOS-like largest id
            out[f"{name}_ids"] = ids
        return out


def _want(opts: ExportOptions, name: str, group: str) -> bool:
    return opts.components is None or name in opts.components or group in opts.components


def build_components(cfg: Config, models: dict, opts: ExportOptions = ExportOptions()) -> list[Component]:
    """Every static graph of ``cfg``'s stack (see the module docstring) with example inputs."""
    from export.convert import to_mirror

    rng = np.random.default_rng(opts.seed)
    b = opts.batch
    text_cfg, mcfg = cfg.model.text, cfg.model.mmdit
    out: list[Component] = []
    ids = _text_ids(cfg, b, rng)
    t5_ids = ids["t5_ids"].astype(np.int32)
    t5_mask = ids["t5_mask"].astype(np.float32)
    text, mmdit, vae = models["text"], models["mmdit"], models["vae"]

    for name in ("clip_l", "clip_g"):
        if _want(opts, name, name):
            out.append(Component(
                name, name, CLIPPooledGraph(to_mirror(getattr(text, name))),
                {"ids": ids[f"{name}_ids"].astype(np.int32)}, ("text_embeds",),
                jax_fn=_jax_fn(getattr(text, name), lambda m, i: m(i)[1]),
                description="pooled projected CLIP text embedding",
            ))
    if text_cfg.kind == "neodragon":
        if _want(opts, "distil_t5", "distil_t5"):
            out.append(Component(
                "distil_t5", "distil_t5", TextTokensGraph(to_mirror(text.distil_t5), bare_t5=False),
                {"ids": t5_ids, "mask": t5_mask}, ("features",),
                jax_fn=_jax_fn(text.distil_t5, lambda m, i, k: m(i, k)), description="DistilT5 + projection",
            ))
        if _want(opts, "context_adapter", "context_adapter"):
            feats = rng.standard_normal((b, text_cfg.max_length, text_cfg.context_adapter.in_dim)).astype(np.float32)
            out.append(Component(
                "context_adapter", "context_adapter", ContextAdapterGraph(to_mirror(text.context_adapter)),
                {"features": feats}, ("text_tokens",),
                jax_fn=_jax_fn(text.context_adapter, lambda m, x: m(x)), description="ContextAdapter (SkipMLP)",
            ))
    elif _want(opts, "t5", "t5"):
        out.append(Component(
            "t5", "t5", TextTokensGraph(to_mirror(text.t5), bare_t5=True), {"ids": t5_ids, "mask": t5_mask},
            ("features",), jax_fn=_jax_fn(text.t5, lambda m, i, k: m(i, k)), description="T5 encoder (teacher)",
        ))

    t_lat, h_lat, w_lat = latent_geometry(cfg, opts.num_frames)
    names = component_names(cfg, opts)
    stages = [s for s in range(cfg.pyramid.num_stages)
              if any(_want(opts, n, f"mmdit_stage{s}") for n in names
                     if n == f"mmdit_stage{s}" or n.startswith(f"mmdit_stage{s}_"))]
    if stages:
        mirror = to_mirror(mmdit)
        ranges = block_ranges(mcfg.num_layers, opts.mmdit_split)
        t_max = stage_timesteps(cfg)
        layouts = []
        for s in stages:
            layouts.append((s, f"mmdit_stage{s}", stage_grids(cfg, s, opts.num_frames), current_frames(cfg)))
            if first_unit_graphs(cfg):  # unit 0: one frame, no history
                layouts.append((s, f"mmdit_stage{s}_first", stage_grids(cfg, s, opts.num_frames)[-1:],
                                current_frames(cfg, first_unit=True)))
        for s, base, grids, frames in layouts:
            n_hist = len(grids) - 1
            p = mcfg.patch_size
            clips = {f"clip_{i}": rng.standard_normal((b, mcfg.in_channels, 1, gh * p, gw * p)).astype(np.float32)
                     for i, (gh, gw) in enumerate(grids[:-1])}
            clips["current"] = rng.standard_normal(
                (b, mcfg.in_channels, frames, grids[-1][0] * p, grids[-1][1] * p)).astype(np.float32)
            valid = np.ones((b, n_hist), np.float32)
            if n_hist >= 2:  # exercise the padding: the oldest slot is an unused (zero) slot
                valid[:, 0] = 0.0
                clips["clip_0"][:] = 0.0
            full_inputs = dict(clips)
            if n_hist:  # a one-frame video has no history: no (zero-size) history_valid input
                full_inputs["history_valid"] = valid
            full_inputs["text_tokens"] = rng.standard_normal(
                (b, text_cfg.max_length, mcfg.context_in_dim or mcfg.hidden_size)).astype(np.float32)
            full_inputs["text_mask"] = t5_mask
            full_inputs["pooled"] = rng.standard_normal((b, mcfg.pooled_dim)).astype(np.float32)
            full_inputs["timestep"] = np.full((b,), t_max[s], np.float32)
            group = f"mmdit_stage{s}"
            if n_hist:
                jax_fn = _jax_fn(mmdit, lambda m, *a, n=n_hist: m.forward_static(
                    list(a[: n + 1]), a[n + 1] > 0.5, a[n + 2], a[n + 3] > 0.5, a[n + 4], a[n + 5]))
            else:
                jax_fn = _jax_fn(mmdit, lambda m, cur, txt, msk, pooled, t: m([cur], txt, msk > 0.5, pooled, t))
            desc = (f"MMDiT stage {s}, {'unit 0' if base.endswith('_first') else 'last-unit'} layout {grids} "
                    f"(patch grids), {n_hist} history slots, {frames} current frame(s)")
            if len(ranges) == 1:
                if _want(opts, base, group):
                    out.append(Component(base, group, MMDiTGraph(mirror, grids, 0, mcfg.num_layers, frames),
                                         full_inputs, ("velocity",), jax_fn=jax_fn, description=desc))
                continue
            carry = None
            for i, (a, z) in enumerate(ranges):
                g = MMDiTGraph(mirror, grids, a, z, frames)
                if i == 0:
                    inputs = full_inputs
                else:
                    x, c, temb = carry
                    inputs = {"x": x, "c": c, "temb": temb, "text_mask": t5_mask}
                    if n_hist:
                        inputs["history_valid"] = valid
                names = ("velocity",) if g.last else ("x", "c", "temb")
                comp = Component(f"{base}_part{i + 1}of{len(ranges)}", group, g, inputs, names,
                                 description=f"{desc}; blocks [{a}, {z})")
                if not g.last:
                    carry = comp.run_torch()  # the next part's example inputs: the real intermediates
                if _want(opts, comp.name, group):
                    out.append(comp)

    if _want(opts, "vae_encoder", "vae_encoder"):
        vm = to_mirror(vae)
        video = rng.uniform(-1, 1, (b, cfg.model.vae.causal.in_channels, 1, cfg.video.height, cfg.video.width))
        out.append(Component(
            "vae_encoder", "vae_encoder", VAEEncoderGraph(vm), {"video": video.astype(np.float32)},
            ("mean", "logvar"), jax_fn=_jax_fn(vae, lambda m, v: (lambda g: (g.mean, g.logvar))(m.encode(v))),
            description="causal VAE encoder, first frame",
        ))
    lat_c = cfg.model.vae.causal.latent_channels
    z = rng.standard_normal((b, lat_c, t_lat, h_lat, w_lat)).astype(np.float32)
    if cfg.model.vae.decoder == "light":
        want_clip, want_step = _want(opts, "light_decoder", "light_decoder"), _want(
            opts, "light_decoder_step", "light_decoder_step")
        if want_clip or want_step:
            vm = to_mirror(vae)
        if want_clip:
            out.append(Component(
                "light_decoder", "light_decoder", DecoderGraph(vm), {"latents": z}, ("video",),
                image_outputs=("video",), jax_fn=_jax_fn(vae, lambda m, x: m.decode(x)),
                description=f"light decoder, whole clip of {t_lat} latent frames",
            ))
        if want_step:
            step = LightDecoderStepGraph(vm)
            mems = [np.zeros(s, np.float32) for s in step.memory_shapes(b, h_lat, w_lat)]
            with torch.no_grad():  # carry real memories up to the last latent frame
                for t in range(t_lat - 1):
                    res = step(torch.from_numpy(z[:, :, t : t + 1]), *map(torch.from_numpy, mems))
                    mems = [m.numpy() for m in res[1:]]
            inputs = {"latent": np.ascontiguousarray(z[:, :, -1:])}
            inputs.update({f"mem_{i}": m for i, m in enumerate(mems)})
            out.append(Component(
                "light_decoder_step", "light_decoder_step", step, inputs,
                ("frames",) + tuple(f"new_mem_{i}" for i in range(len(mems))), image_outputs=("frames",),
                description=f"light decoder streaming step, {len(mems)} carried MemBlock memories",
            ))
    elif _want(opts, "vae_decoder", "vae_decoder"):
        out.append(Component(
            "vae_decoder", "vae_decoder", DecoderGraph(to_mirror(vae)), {"latents": z}, ("video",),
            image_outputs=("video",), jax_fn=_jax_fn(vae, lambda m, x: m.decode(x)),
            description="native causal VAE decoder, whole clip",
        ))
    for c in out:
        c.module.eval()
    return out


def component_names(cfg: Config, opts: ExportOptions = ExportOptions()) -> list[str]:
    """Names :func:`build_components` produces for ``cfg`` (no weights needed)."""
    names = ["clip_l", "clip_g"]
    names += ["distil_t5", "context_adapter"] if cfg.model.text.kind == "neodragon" else ["t5"]
    k = len(block_ranges(cfg.model.mmdit.num_layers, opts.mmdit_split))
    for s in range(cfg.pyramid.num_stages):
        for base in [f"mmdit_stage{s}"] + ([f"mmdit_stage{s}_first"] if first_unit_graphs(cfg) else []):
            names += [base] if k == 1 else [f"{base}_part{i + 1}of{k}" for i in range(k)]
    names.append("vae_encoder")
    names += ["light_decoder", "light_decoder_step"] if cfg.model.vae.decoder == "light" else ["vae_decoder"]
    return names


__all__ = [
    "CLIPPooledGraph", "Component", "ContextAdapterGraph", "DecoderGraph", "ExportError", "ExportOptions",
    "LightDecoderStepGraph", "MASK_VALUE", "MMDiTGraph", "TextTokensGraph", "VAEEncoderGraph", "block_ranges",
    "build_components", "component_names", "latent_geometry", "load_jax_models", "neodragon_variant",
    "current_frames", "first_unit_graphs", "stage_grids", "stage_timesteps",
]
