"""Compile time of the flow train step: MMDiT blocks unrolled against ``model.mmdit.scan_blocks``.

Lowers and compiles the demo's flow step (``neodragon_cli.demo.DEMO_OVERRIDES`` on the demo's preset, synthetic
records of its shapes, every pyramid unit layout) for each block count, both ways, side by side in one run::

    python bench/bench_compile.py --blocks 4,8

Measured on the 2-core CPU (2026-11-27, batch 4): 4 blocks 50.0 s unrolled / 42.1 s scanned, 8 blocks
139.2 s / 45.5 s. No persistent compilation cache is used, so every figure is a cold compile.
"""

from __future__ import annotations

import argparse
import time


def compile_seconds(blocks: int, scan: bool, batch: int, extra: list[str]) -> tuple[float, float]:
    import jax

    from neodragon_cli.demo import DEFAULT_CONFIG, DEMO_OVERRIDES
    from neodragon_jax.config import load_config
    from neodragon_jax.sharding import activate, make_mesh
    from train import stages as stages_lib
    from train.state import build_setup
    from train.step import batch_sharding_tree, jit_train_step

    cfg = load_config(DEFAULT_CONFIG, [*DEMO_OVERRIDES, 'train.stage="flow"', f"train.global_batch={batch}",
                               "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", f"model.mmdit.num_layers={blocks}",
                               f"model.mmdit.scan_blocks={str(scan).lower()}", *extra])
    stage = stages_lib.get_stage("flow", cfg)
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    setup = build_setup(stage, cfg, mesh)
    example, batch_sh = batch_sharding_tree(setup)
    abstract_batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), example, batch_sh)
    t0 = time.perf_counter()
    with activate(mesh, setup.rules):
        lowered = jit_train_step(setup).lower(setup.abstract_state, setup.abstract_frozen, abstract_batch)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="4,8", help="comma-separated MMDiT block counts (each > 2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override, repeatable")
    args = ap.parse_args()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    counts = [int(b) for b in args.blocks.split(",")]
    if any(b < 3 for b in counts):
        raise SystemExit("--blocks: scanning needs at least 3 blocks (the last one is never scanned)")
    print(f"flow train step, demo layout, batch {args.batch}, {jax.devices()[0].platform}")
    print(f"{'blocks':>6} | {'unrolled lower':>14} | {'unrolled compile':>16} | {'scanned lower':>13} | "
          f"{'scanned compile':>15} | compile ratio")
    for b in counts:
        lu, cu = compile_seconds(b, False, args.batch, args.overrides)
        ls, cs = compile_seconds(b, True, args.batch, args.overrides)
        print(f"{b:>6} | {lu:>13.1f}s | {cu:>15.1f}s | {ls:>12.1f}s | {cs:>14.1f}s | {cu / cs:.2f}x", flush=True)


if __name__ == "__main__":
    main()
