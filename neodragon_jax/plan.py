"""Ahead-of-time sizing of every component: parameter counts and per-call FLOPs without allocating.

Models are built with ``nnx.eval_shape`` (shapes only) and their forward passes are lowered with
``jax.jit(...).lower(...)`` on ``ShapeDtypeStruct`` inputs; FLOPs come from XLA's cost analysis of the
lowered HLO. Nothing here touches real memory, so full-size presets (a 2B MMDiT, a 4.7B T5-XXL) plan on
a laptop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.layers.core import as_dtype


@dataclass
class CallCost:
    label: str
    flops: float
    count: int = 1  # how many times the call happens (e.g. per video)


@dataclass
class ComponentPlan:
    name: str
    params: int
    calls: list[CallCost] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "params": self.params,
            "note": self.note,
            "calls": [dataclasses.asdict(c) for c in self.calls],
        }


def abstract_model(builder: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """The module with ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: builder(nnx.Rngs(0)))


def count_params(module: nnx.Module) -> int:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return int(sum(int(np.prod(x.shape)) for x in leaves))


def lowered_flops(module: nnx.Module, call: Callable[..., Any], *inputs: Any) -> float:
    """FLOPs of ``call(module, *inputs)`` from XLA cost analysis of the lowered function."""
    graphdef, state = nnx.split(module)

    def fn(state, *args):
        return call(nnx.merge(graphdef, state), *args)

    cost = jax.jit(fn).lower(state, *inputs).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def sds(shape: Sequence[int], dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


# ---- text stack -------------------------------------------------------------------------------------


def plan_text(cfg: Config, batch: int = 1) -> list[ComponentPlan]:
    from neodragon_jax.models.text.clip import CLIPTextEncoder
    from neodragon_jax.models.text.context_adapter import ContextAdapter
    from neodragon_jax.models.text.distil_t5 import DistilT5
    from neodragon_jax.models.text.t5 import T5Encoder

    text = cfg.model.text
    kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))
    ids = sds((batch, text.max_length), jnp.int32)
    mask = sds((batch, text.max_length), jnp.int32)
    clip_ids = sds((batch, text.clip_max_length), jnp.int32)
    out = []

    def add(name, builder, call, *inputs, note=""):
        m = abstract_model(builder)
        out.append(ComponentPlan(name, count_params(m), [CallCost("per prompt", lowered_flops(m, call, *inputs))], note))

    if text.kind == "teacher":
        add("T5 encoder", lambda r: T5Encoder(text.t5, rngs=r, **kw), lambda m, i, k: m(i, k), ids, mask,
            note=f"{text.t5.num_layers}L d{text.t5.d_model}, {text.max_length} tokens")
    else:
        add("DistilT5", lambda r: DistilT5(text.distil_t5, rngs=r, **kw), lambda m, i, k: m(i, k), ids, mask,
            note=f"{text.distil_t5.body.num_layers}L d{text.distil_t5.body.d_model} + head")
        add("ContextAdapter", lambda r: ContextAdapter(text.context_adapter, rngs=r, **kw), lambda m, x: m(x),
            sds((batch, text.max_length, text.context_adapter.in_dim), kw["dtype"]))
    add("CLIP-L", lambda r: CLIPTextEncoder(text.clip_l, rngs=r, **kw), lambda m, i: m(i)[1], clip_ids)
    add("CLIP-bigG", lambda r: CLIPTextEncoder(text.clip_g, rngs=r, **kw), lambda m, i: m(i)[1], clip_ids)
    return out


# ---- video stack ------------------------------------------------------------------------------------


def mmdit_call_flops(cfg: Config, batch: int = 1) -> dict[tuple[int, int], float]:
    """FLOPs of one MMDiT call for every (unit, stage) of a ``cfg.video`` clip (batch ``batch``)."""
    from neodragon_jax.models.mmdit import abstract_mmdit
    from neodragon_jax.models.vae.normalize import latent_frames
    from neodragon_jax.pyramid.history import clip_shapes, num_units

    m = cfg.model.mmdit
    dtype = as_dtype(cfg.precision.dtype)
    model = abstract_mmdit(m, dtype=dtype, param_dtype=as_dtype(cfg.precision.param_dtype))
    vae = cfg.model.vae.causal
    t_lat = latent_frames(cfg.video.num_frames, vae.temporal_factor)
    hw = (cfg.video.height // vae.spatial_factor, cfg.video.width // vae.spatial_factor)
    text = cfg.model.text
    tokens = sds((batch, text.max_length, m.context_in_dim or m.hidden_size), dtype)
    mask = sds((batch, text.max_length), jnp.int32)
    pooled = sds((batch, m.pooled_dim), dtype)
    t = sds((batch,), jnp.float32)
    out = {}
    for u in range(num_units(t_lat, cfg.pyramid.frames_per_unit)):
        for s in range(cfg.pyramid.num_stages):
            shapes = clip_shapes(u, s, num_stages=cfg.pyramid.num_stages, latent_hw=hw,
                                 frames_per_unit=cfg.pyramid.frames_per_unit)
            clips = [sds((batch, m.in_channels, f, h, w), dtype) for f, h, w in shapes]
            out[(u, s)] = lowered_flops(
                model, lambda mod, c, *a: mod(list(c), *a), clips, tokens, mask, pooled, t
            )
    return out


def schedule_flops(per_call: dict[tuple[int, int], float], first: Sequence[int], later: Sequence[int],
                   cfg_first: float, cfg_later: float) -> tuple[float, int]:
    """(total DiT FLOPs, NFE) of one video under a schedule; CFG doubles the batch of a call."""
    total, nfe = 0.0, 0
    for (u, s), flops in per_call.items():
        steps, w = (first, cfg_first) if u == 0 else (later, cfg_later)
        mult = 2 if w > 0 else 1
        total += flops * steps[s] * mult
        nfe += steps[s] * mult
    return total, nfe


def plan_video(cfg: Config, batch: int = 1) -> list[ComponentPlan]:
    from neodragon_jax.models.vae.causal_vae import CausalVAEDecoder, CausalVAEEncoder
    from neodragon_jax.models.vae.light_decoder import LightDecoder
    from neodragon_jax.models.vae.normalize import latent_frames
    from neodragon_jax.models.mmdit import abstract_mmdit

    kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))
    m = cfg.model.mmdit
    v = cfg.video
    per_call = mmdit_call_flops(cfg, batch)
    mmdit = abstract_mmdit(m, **kw)
    calls = [CallCost(f"unit {u} stage {s}", f) for (u, s), f in per_call.items()]
    s = cfg.sampling
    teacher_total, teacher_nfe = schedule_flops(per_call, (20,) * cfg.pyramid.num_stages,
                                                (10,) * cfg.pyramid.num_stages, 7.0, 5.0)
    one_total, one_nfe = schedule_flops(per_call, (1,) * cfg.pyramid.num_stages, (1,) * cfg.pyramid.num_stages, 0.0, 0.0)
    calls.append(CallCost(f"video, 20-20-20 then 10-10-10 + CFG ({teacher_nfe} NFE)", teacher_total))
    calls.append(CallCost(f"video, 1-1-1 no CFG ({one_nfe} NFE)", one_total))
    ctx = f" + context embedder {m.context_in_dim}->{m.hidden_size}" if m.context_in_dim else ""
    out = [ComponentPlan("MMDiT", count_params(mmdit), calls,
                         f"{m.num_layers} blocks{ctx}; {v.num_frames} frames {v.height}x{v.width}")]

    c = cfg.model.vae.causal
    t_lat = latent_frames(v.num_frames, c.temporal_factor)
    h, w = v.height // c.spatial_factor, v.width // c.spatial_factor
    dt = kw["dtype"]
    enc = abstract_model(lambda r: CausalVAEEncoder(c, rngs=r, **kw))
    out.append(ComponentPlan("VAE encoder", count_params(enc), [
        CallCost("first frame", lowered_flops(enc, lambda mod, x: mod(x), sds((batch, 3, 1, v.height, v.width), dt))),
        CallCost(f"{v.num_frames} frames", lowered_flops(enc, lambda mod, x: mod(x), sds((batch, 3, v.num_frames, v.height, v.width), dt))),
    ], "without quant_conv"))
    z = sds((batch, c.latent_channels, t_lat, h, w), dt)
    native = abstract_model(lambda r: CausalVAEDecoder(c, rngs=r, **kw))
    out.append(ComponentPlan("native decoder", count_params(native), [
        CallCost(f"decode {v.num_frames} frames", lowered_flops(native, lambda mod, x: mod(x), z))
    ], "without post_quant_conv"))
    light = abstract_model(lambda r: LightDecoder(cfg.model.vae.light_decoder, rngs=r, **kw))
    out.append(ComponentPlan("light decoder", count_params(light), [
        CallCost(f"decode {v.num_frames} frames", lowered_flops(light, lambda mod, x: mod(x), z))
    ], "without post_quant_conv"))
    return out


def plan(cfg: Config, parts: Sequence[str] = ("text", "video")) -> list[ComponentPlan]:
    planners = {"text": plan_text, "video": plan_video}
    unknown = [p for p in parts if p not in planners]
    if unknown:
        raise ValueError(f"unknown plan parts {unknown}; expected some of {sorted(planners)}")
    out: list[ComponentPlan] = []
    for p in parts:
        out.extend(planners[p](cfg))
    return out


# ---- formatting -------------------------------------------------------------------------------------


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_table(cfg: Config, components: list[ComponentPlan]) -> str:
    lines = [
        f"# neodragon plan: {cfg.name} (compute {cfg.precision.dtype}, params {cfg.precision.param_dtype})",
        "",
        "| component | params | call | FLOPs per call | calls | FLOPs total | note |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for c in components:
        first = True
        for call in c.calls or [CallCost("-", 0.0, 0)]:
            lines.append(
                f"| {c.name if first else ''} | {f'{c.params:,}' if first else ''} | {call.label} | "
                f"{human(call.flops, 'FLOP')} | {call.count} | {human(call.flops * call.count, 'FLOP')} | "
                f"{c.note if first else ''} |"
            )
            first = False
    return "\n".join(lines)
