"""Train-step benchmark of a stage (``toy`` by default, or ``flow`` on a preset): step time, tokens/s and MFU
on 1 and 8 simulated devices.

Each device count runs in its own subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be
set before JAX starts). MFU = per-device FLOPs of the compiled step (XLA cost analysis) / step time /
per-device peak measured in the same subprocess with a matmul microbenchmark. On simulated CPU devices all
"devices" share the host's cores, so the 8-device figures measure sharding overhead, not speed-up.

    python bench/bench_train.py                 # 1 and 8 devices, default toy size
    python bench/bench_train.py --devices 1 8 --hidden 1024 --steps 20
    python bench/bench_train.py --stage flow --config tiny --batch 8      # the flow stage on a preset
    python bench/bench_train.py --stage flow --config neodragon-320p --set model.mmdit.num_layers=4 ...

For ``flow``, tokens per example are the stage's ``tokens_per_example`` (image tokens of history + current
clip, averaged over stage columns and unit layouts, plus the text tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> dict:
    import jax
    import numpy as np

    from neodragon_jax.config import load_config
    from neodragon_jax.sharding import activate, make_mesh
    from train.data import DataIterator, SyntheticSource, to_global
    from train.metrics import compiled_flops, measure_peak_flops
    from train.stages import ToyStage
    from train.state import build_setup
    from train.step import batch_sharding_tree, jit_train_step

    from train.stages import get_stage, tokens_per_example

    n = jax.device_count()
    rules = args.rules if n > 1 else "dp"
    overrides = [o for item in args.overrides for o in item.split()]
    cfg = load_config(args.config, overrides + [
        f'mesh.rules="{rules}"', f"train.global_batch={args.batch}", "data.num_synthetic=256",
        f"train.micro_batches={args.micro_batches}", f"train.stage={args.stage}"])
    if args.stage == "toy":
        stage = ToyStage(cfg, dim=args.dim, hidden=args.hidden, depth=args.depth, seq=args.seq)
    else:
        stage = get_stage(args.stage, cfg)
    tokens = tokens_per_example(stage, cfg)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1} if rules != "dp" else {"data": -1})
    setup = build_setup(stage, cfg, mesh)
    state, frozen = setup.init_state(), setup.init_frozen()
    example, batch_sh = batch_sharding_tree(setup)
    data = DataIterator(SyntheticSource(stage, cfg), list(example), args.batch, prefetch=0)
    batches = [to_global(next(data), batch_sh, args.batch) for _ in range(4)]
    abstract_batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), example, batch_sh)
    with activate(mesh, setup.rules):
        t = time.perf_counter()
        compiled = jit_train_step(setup).lower(setup.abstract_state, setup.abstract_frozen, abstract_batch).compile()
        compile_s = time.perf_counter() - t
    for i in range(args.warmup):
        state, m = compiled(state, frozen, batches[i % 4])
    jax.block_until_ready(m)
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, frozen, batches[i % 4])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    # Mean, not median: a flow step draws one of several layouts (different token counts) per step.
    step_s = float(np.mean(times))
    flops = compiled_flops(compiled)
    if args.stage == "flow":
        flops = mean_layout_flops(args, cfg, mesh, abstract_batch)
    peak = measure_peak_flops()
    return {
        "stage": args.stage, "config": cfg.name, "devices": n, "rules": rules,
        "params": sum(s.num_params for s in setup.trainable.values()), "batch": args.batch,
        "tokens_per_example": tokens,
        "step_ms": 1e3 * step_s, "tokens_per_s": args.batch * tokens / step_s, "samples_per_s": args.batch / step_s,
        "flops_per_device": flops, "peak_flops_per_device": peak, "mfu": flops / step_s / peak, "compile_s": compile_s,
        "loss": float(m["loss"]),
    }


def mean_layout_flops(args, cfg, mesh, abstract_batch) -> float:
    """Per-device FLOPs of one flow step, averaged over the pyramid-unit layouts it draws from, with the
    MMDiT blocks unrolled. Why not the compiled step's own figure: XLA's cost analysis counts a
    ``lax.scan`` body once (a scanned step reports about one block) and a ``lax.switch`` at its largest
    branch (the step holds one branch per layout and runs one, drawn uniformly). Lowered only, no compile."""
    import dataclasses

    import jax

    from neodragon_jax.pyramid.history import num_units
    from neodragon_jax.sharding import activate
    from train.flow_matching import flow_geometry
    from train.stages import get_stage
    from train.state import build_setup
    from train.step import jit_train_step

    mm = dataclasses.replace(cfg.model.mmdit, scan_blocks=False)
    units = cfg.train.pyramid_units or tuple(range(num_units(flow_geometry(cfg).frames, cfg.pyramid.frames_per_unit)))
    total = 0.0
    for u in units:
        ucfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mmdit=mm),
                                   train=dataclasses.replace(cfg.train, pyramid_units=(u,)))
        setup = build_setup(get_stage(args.stage, ucfg), ucfg, mesh)
        with activate(mesh, setup.rules):
            lowered = jit_train_step(setup).lower(setup.abstract_state, setup.abstract_frozen, abstract_batch)
        cost = lowered.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        total += float((cost or {}).get("flops", 0.0))
    return total / len(units) / jax.device_count()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    p.add_argument("--stage", default="toy", help="toy (sizes below) or a registered stage such as flow")
    p.add_argument("--config", default="tiny", help="preset for --stage flow (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rules", default="fsdp", choices=["dp", "fsdp", "fsdp_tp"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    try:
        results = run_devices(args, argv if argv is not None else sys.argv[1:])
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def run_devices(args, argv) -> list[dict]:
    """One worker subprocess per device count in ``args.devices`` (``argv`` is forwarded to it)."""
    results = []
    for n in args.devices:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"] + [a for a in argv if a != "--worker"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"{n} devices: failed\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    return results


def format_results(results: list[dict]) -> str:
    lines = [f"{'stage':>6} {'config':>16} {'devices':>7} {'rules':>7} {'params':>13} {'batch':>5} {'step ms':>9} "
             f"{'tokens/s':>11} {'samples/s':>10} {'GFLOP/dev':>10} {'peak GF/s':>10} {'MFU':>7} {'compile s':>9}"]
    for r in results:
        lines.append(
            f"{r.get('stage', 'toy'):>6} {r.get('name', r.get('config', 'tiny')):>16} {r['devices']:>7} {r['rules']:>7} "
            f"{r['params']:>13,} {r['batch']:>5} {r['step_ms']:>9.2f} {r['tokens_per_s']:>11,.0f} "
            f"{r['samples_per_s']:>10,.1f} {r['flops_per_device'] / 1e9:>10.3f} "
            f"{r['peak_flops_per_device'] / 1e9:>10.1f} {100 * r['mfu']:>6.2f}% {r['compile_s']:>9.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
