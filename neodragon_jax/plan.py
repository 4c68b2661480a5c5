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


def plan(cfg: Config, parts: Sequence[str] = ("text",)) -> list[ComponentPlan]:
    planners = {"text": plan_text}
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
