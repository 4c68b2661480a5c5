"""Benchmark the pyramidal MMDiT: forward and forward+backward wall time and tokens/s (jit, warm-up
excluded, median of a few runs) for

* ``tiny``: ``load_config('tiny').model.mmdit`` at the tiny video size (64x64 -> 8x8 latents), batch 2;
* ``small``: 4 joint blocks at full width 1536 (no context embedder, Neodragon layout), batch 1, one
  frame at stage 2 (320x512 -> 40x64 latents) with the unit-3 history layout
  [10x16, 20x32, 40x64, current 40x64] = 1480 image tokens + 128 text tokens (spec §3.5).

Usage: ``python bench/bench_mmdit.py [--preset tiny|small|all] [--runs N] [--dtype float32|bfloat16]``.
Tokens/s counts the whole joint sequence (image + text tokens) of every sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.config.schema import MMDiTConfig
from neodragon_jax.convert.io import param_count
from neodragon_jax.models.mmdit import init_mmdit


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cfg: MMDiTConfig
    batch: int
    latent_hw: tuple[tuple[int, int], ...]  # per clip, oldest -> current
    text_len: int


def cases() -> dict[str, Case]:
    tiny = load_config("tiny")
    lat = (tiny.video.height // 8, tiny.video.width // 8)
    stage = lambda k: (lat[0] >> k, lat[1] >> k)  # noqa: E731
    return {
        "tiny": Case("tiny", tiny.model.mmdit, 2, (stage(2), stage(1), stage(0), stage(0)), tiny.model.text.max_length),
        "small": Case("small", MMDiTConfig(num_layers=4), 1, ((10, 16), (20, 32), (40, 64), (40, 64)), 128),
    }


def _time(fn, *args, runs: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up, excluded
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(case: Case, runs: int, dtype: str) -> dict:
    cfg = case.cfg
    model = init_mmdit(cfg, seed=0, dtype=dtype, param_dtype="float32")
    rng = np.random.default_rng(0)
    b = case.batch
    clips = [jnp.asarray(rng.standard_normal((b, cfg.in_channels, 1, h, w)), jnp.float32) for h, w in case.latent_hw]
    text_dim = cfg.context_in_dim or cfg.hidden_size
    text = jnp.asarray(rng.standard_normal((b, case.text_len, text_dim)), jnp.float32)
    mask = jnp.ones((b, case.text_len), bool)
    pooled = jnp.asarray(rng.standard_normal((b, cfg.pooled_dim)), jnp.float32)
    t = jnp.full((b,), 386.0, jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params, clips, text, mask, pooled, t):
        return nnx.merge(graphdef, params, rest)(clips, text, mask, pooled, t)

    @jax.jit
    def forward_backward(params, clips, text, mask, pooled, t):
        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest)(clips, text, mask, pooled, t) ** 2)

        return jax.value_and_grad(loss)(params)

    args = (params, clips, text, mask, pooled, t)
    fwd = _time(forward, *args, runs=runs)
    fwd_bwd = _time(forward_backward, *args, runs=runs)
    img_tokens = sum((h // cfg.patch_size) * (w // cfg.patch_size) for h, w in case.latent_hw)
    seq = img_tokens + case.text_len
    return {
        "case": case.name, "params": param_count(model), "batch": b, "image_tokens": img_tokens,
        "seq_tokens": seq, "fwd_s": fwd, "fwd_bwd_s": fwd_bwd,
        "fwd_tok_s": b * seq / fwd, "fwd_bwd_tok_s": b * seq / fwd_bwd,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["tiny", "small", "all"], default="all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = ap.parse_args(argv)
    names = ["tiny", "small"] if a.preset == "all" else [a.preset]
    print(f"backend {jax.default_backend()} x{jax.device_count()}, compute dtype {a.dtype}, median of {a.runs} runs")
    for name in names:
        r = bench(cases()[name], a.runs, a.dtype)
        print(
            f"{r['case']:>5}: {r['params'] / 1e6:8.2f}M params, batch {r['batch']}, {r['image_tokens']} image + "
            f"{r['seq_tokens'] - r['image_tokens']} text tokens | forward {r['fwd_s'] * 1e3:9.1f} ms "
            f"({r['fwd_tok_s']:9.0f} tok/s) | forward+backward {r['fwd_bwd_s'] * 1e3:9.1f} ms "
            f"({r['fwd_bwd_tok_s']:9.0f} tok/s)"
        )


if __name__ == "__main__":
    main()
