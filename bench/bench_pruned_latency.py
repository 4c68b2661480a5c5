"""Per-step DiT latency of a teacher and its pruned students, side by side in one process (spec §6.2: 1.15 s ->
0.74 s per step at full size on the phone).

One model call as the sampler makes it at its largest shape: the last latent unit at the finest pyramid stage
with its history, both CFG rows. Each model is jitted once; the timed calls alternate between the models so
machine load drifts hit them alike; the median of ``--repeats`` rounds is reported with the ratio to the teacher.

    python bench/bench_pruned_latency.py --student runs/prune/student [--student runs/prune/s2] [--model tiny-teacher]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def largest_call_inputs(pipe, batch: int = 2):
    """``(clips, tokens, mask, pooled, t)`` of the sampler's largest model call (last unit, finest stage)."""
    from neodragon_jax.pyramid.history import build_history, num_units
    from neodragon_jax.pyramid.pyramids import latent_pyramid

    cfg = pipe.cfg
    t_lat, h, w = pipe.latent_shape(cfg.video.num_frames)
    c = cfg.model.mmdit.in_channels
    S, fpu = cfg.pyramid.num_stages, cfg.pyramid.frames_per_unit
    U = num_units(t_lat, fpu)
    z = jax.random.normal(jax.random.key(0), (batch, c, t_lat, h, w), jnp.float32)
    unit = U - 1
    hist = build_history(latent_pyramid(z, S), unit, S - 1, frames_per_unit=fpu) if unit > 0 else []
    cur = z[:, :, -min(fpu, t_lat):]
    text = pipe.encode_text(["a red circle moving left on a black background"] * batch)
    return list(hist) + [cur], text.tokens, text.mask, text.pooled, jnp.full((batch,), 500.0, jnp.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-teacher", help="the teacher release")
    p.add_argument("--student", action="append", default=[], help="a pruned folder or recovery run (repeatable)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    from flax import nnx

    from neodragon_cli.prune import _params, load_teacher, student_from_path

    teacher = load_teacher(argparse.Namespace(model=args.model, checkpoint=None, config=None, overrides=[]))
    models = [("teacher", teacher.mmdit)]
    for path in args.student:
        pipe, _ = student_from_path(teacher, path)
        models.append((path, pipe.mmdit))
    inputs = largest_call_inputs(teacher)
    fns = []
    for _, m in models:
        graphdef, state = nnx.split(m)
        f = jax.jit(lambda st, *a, g=graphdef: nnx.merge(g, st)(*a))
        jax.block_until_ready(f(state, *inputs))  # compile
        fns.append((f, state))
    times = [[] for _ in models]
    for _ in range(args.repeats):
        for i, (f, state) in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(f(state, *inputs))
            times[i].append(time.perf_counter() - t0)
    base = float(np.median(times[0]))
    rows = []
    for (name, m), t in zip(models, times):
        ms = float(np.median(t)) * 1e3
        rows.append({"model": name, "blocks": len(m.transformer_blocks), "params": _params(m), "ms_per_step": ms,
                     "ratio_to_teacher": ms / (base * 1e3)})
        print(f"{name:<40} {len(m.transformer_blocks):>3} blocks {_params(m):>11,} params {ms:8.2f} ms/step "
              f"({ms / (base * 1e3):.2f}x the teacher)")
    print(f"(largest sampler call: {len(inputs[0])} clips, batch {inputs[1].shape[0]}, median of {args.repeats}, "
          f"{jax.devices()[0].platform})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
