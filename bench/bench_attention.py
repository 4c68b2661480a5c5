"""CPU: the chunked attention path against the dense reference, forward + backward, as the tokens grow.

Per sequence length: the temporaries XLA:CPU assigns to the compiled ``grad`` of ``sum(attention * ct)``
(``memory_analysis().temp_size_in_bytes``) and the best CPU time (all threads of this process; robust on a
shared machine) and wall time of that step over interleaved runs, for ``dense`` (the
``[B, 1, T, T]`` bias on materialised scores) and ``chunked`` (online softmax over key chunks). The mask is the
pyramid mask: 128 text tokens (half padding) and frames of 640 image tokens, temporal-causal.

    python bench/bench_attention.py                       # B=1, 24 heads of 64, float32, T up to ~4k
    python bench/bench_attention.py --heads 8 --tokens 768,1408,2688,5248 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from neodragon_jax.layers.attention import JointMask, attend, joint_attention_bias


def case(tokens: int, b: int, heads: int, head_dim: int, text: int = 128, frame: int = 640, dtype=jnp.float32):
    n_img = tokens - text
    frames = [frame] * (n_img // frame) + ([n_img % frame] if n_img % frame else [])
    pos = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(frames)])[None]
    ids = np.ones_like(pos)
    tm = jnp.asarray(np.arange(text)[None] < np.full((b, 1), text // 2))
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((b, tokens, heads, head_dim)), dtype) for _ in range(4))
    return tm, ids, pos, q, k, v, ct


def compiled_step(impl: str, tokens: int, args):
    """The compiled ``grad`` of ``sum(attention * ct)`` and its arguments (mask and ``ct`` are arguments too:
    captured as constants, XLA would spend minutes folding them)."""
    tm, ids, pos, q, k, v, ct = case(tokens, args.batch, args.heads, args.head_dim,
                                     dtype=jnp.bfloat16 if args.bf16 else jnp.float32)

    def loss(q, k, v, ct, tm):
        mask = joint_attention_bias(tm, ids, pos) if impl == "dense" else JointMask.build(tm, ids, pos, impl=impl)
        return jnp.sum(attend(q, k, v, mask).astype(jnp.float32) * ct.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, ct, tm).compile()
    return compiled, (q, k, v, ct, tm)


def measure(tokens: int, args) -> dict:
    """Temporaries and the best of ``repeats`` interleaved runs (dense, chunked, dense, ...): on a shared
    machine the minimum is the least disturbed figure."""
    steps = {impl: compiled_step(impl, tokens, args) for impl in ("dense", "chunked")}
    out = {impl: {"temp": int(c.memory_analysis().temp_size_in_bytes), "times": [], "cpu": []}
           for impl, (c, _) in steps.items()}
    for impl, (c, a) in steps.items():
        jax.block_until_ready(c(*a))
    for _ in range(args.repeats):
        for impl, (c, a) in steps.items():
            t, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(c(*a))
            out[impl]["times"].append(time.perf_counter() - t)
            out[impl]["cpu"].append(time.process_time() - cpu)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="768,1408,2688,4608", help="sequence lengths (text 128 + image)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args(argv)
    print(f"# attention fwd+bwd on {jax.devices()[0].platform}: batch {args.batch}, {args.heads} heads of "
          f"{args.head_dim}, {'bf16' if args.bf16 else 'float32'}, best of {args.repeats} interleaved runs")
    print("| tokens | dense temp MiB | chunked temp MiB | chunked temp KiB / token | dense CPU ms | chunked CPU ms | "
          "chunked / dense (CPU) | dense wall ms | chunked wall ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for t in (int(x) for x in args.tokens.split(",")):
        r = measure(t, args)
        dm, cm = r["dense"]["temp"], r["chunked"]["temp"]
        dt, ct = min(r["dense"]["times"]), min(r["chunked"]["times"])
        dc, cc = min(r["dense"]["cpu"]), min(r["chunked"]["cpu"])
        print(f"| {t} | {dm / 2**20:.1f} | {cm / 2**20:.1f} | {cm / 2**10 / t:.1f} | {dc * 1e3:.0f} | {cc * 1e3:.0f} | "
              f"{cc / dc:.2f} | {dt * 1e3:.0f} | {ct * 1e3:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
