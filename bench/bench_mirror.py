"""JAX vs the PyTorch mirror: MMDiT forward and forward+backward wall time, side by side, on this CPU.

Configs:
  tiny   the tiny preset's MMDiT (4 blocks, width 64) on the tiny unit-3 stage-2 input
         (clips 2x2, 4x4, 8x8 latents + the current 8x8 clip, 32 text tokens)
  small  4 blocks at the full width 1536 (24 heads x 64, Neodragon layout) on one unit-3 stage-2 input of the
         320x512 pipeline: clips 10x16, 20x32, 40x64 + current 40x64 (1480 image + 128 text tokens), batch 1

Both frameworks get the same random non-zero weights (JAX -> mirror through the key map), float32, and the
same inputs; forward+backward is d(mean(v^2))/d(params). JAX times exclude compilation (reported apart);
each figure is the median of ``--repeats`` runs after one warm-up (10x as many for tiny). The ratio is
torch time / JAX time.

    python bench/bench_mirror.py [--configs tiny,small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from export.convert import random_weights, to_mirror
from neodragon_jax.config import load_config
from neodragon_jax.config.schema import MMDiTConfig
from neodragon_jax.models.mmdit import abstract_mmdit

# (MMDiT config, latent clips (F, H, W) oldest -> current, text tokens)
SETUPS = {
    "tiny": (load_config("tiny").model.mmdit, [(1, 2, 2), (1, 4, 4), (1, 8, 8), (1, 8, 8)], 32),
    "small": (MMDiTConfig(num_layers=4), [(1, 10, 16), (1, 20, 32), (1, 40, 64), (1, 40, 64)], 128),
}


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of the next ``repeats``) in seconds; ``fn`` must block until done."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench(name: str, repeats: int) -> dict:
    cfg, layout, s = SETUPS[name]
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((1, cfg.in_channels, f, h, w)).astype(np.float32) for f, h, w in layout]
    text = rng.standard_normal((1, s, cfg.context_in_dim or cfg.hidden_size)).astype(np.float32)
    mask = np.ones((1, s), bool)
    mask[:, s // 2 :] = False
    pooled = rng.standard_normal((1, cfg.pooled_dim)).astype(np.float32)
    t = np.asarray([386.0], np.float32)

    model = random_weights(abstract_mmdit(cfg), 0)
    mirror = to_mirror(model)
    n_params = sum(p.numel() for p in mirror.parameters())
    p = cfg.patch_size
    tokens = sum(f * (h // p) * (w // p) for f, h, w in layout)

    # ---- JAX
    j_in = ([jnp.asarray(c) for c in clips], jnp.asarray(text), jnp.asarray(mask), jnp.asarray(pooled), jnp.asarray(t))
    fwd = nnx.jit(lambda m, *a: m(*a))

    @nnx.jit
    def fwd_bwd(m, *a):
        return nnx.grad(lambda mm: jnp.mean(jnp.square(mm(*a))))(m)

    j_fwd = _timed(lambda: jax.block_until_ready(fwd(model, *j_in)), repeats)
    j_bwd = _timed(lambda: jax.block_until_ready(nnx.state(fwd_bwd(model, *j_in))), repeats)

    # ---- PyTorch
    t_in = ([torch.from_numpy(c) for c in clips], torch.from_numpy(text), torch.from_numpy(mask),
            torch.from_numpy(pooled), torch.from_numpy(t))

    def t_forward():
        with torch.no_grad():
            mirror(*t_in)

    def t_forward_backward():
        mirror.zero_grad(set_to_none=True)
        mirror(*t_in).square().mean().backward()

    t_fwd = _timed(t_forward, repeats)
    t_bwd = _timed(t_forward_backward, repeats)
    return {"name": name, "params": n_params, "tokens": tokens + s, "jax_fwd": j_fwd, "jax_fwd_bwd": j_bwd,
            "torch_fwd": t_fwd, "torch_fwd_bwd": t_bwd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,small", help="comma-separated subset of: " + ",".join(SETUPS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median reported)")
    args = ap.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(SETUPS)}")
    print(f"CPU threads: {os.cpu_count()}, torch threads {torch.get_num_threads()}, jax {jax.__version__}, "
          f"torch {torch.__version__}; float32; median of {args.repeats} runs (x10 for tiny) after one warm-up")
    header = (f"{'config':<7}{'params':>13}{'tokens':>8}  {'pass':<9}{'JAX s':>10}{'torch s':>10}"
              f"{'torch/JAX':>11}{'JAX 1st s':>11}")
    print(header)
    print("-" * len(header))
    for name in names:
        # tiny calls take milliseconds: more repeats so other processes on the machine average out
        r = bench(name, args.repeats * (10 if name == "tiny" else 1))
        for label, jk, tk in (("fwd", "jax_fwd", "torch_fwd"), ("fwd+bwd", "jax_fwd_bwd", "torch_fwd_bwd")):
            (j_first, j), (_, tt) = r[jk], r[tk]
            print(f"{name:<7}{r['params']:>13,}{r['tokens']:>8}  {label:<9}{j:>10.4f}{tt:>10.4f}{tt / j:>11.2f}"
                  f"{j_first:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
