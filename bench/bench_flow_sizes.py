"""Where the tiny flow step's compute goes: clips/s and achieved GFLOP/s against this machine's matmul peak,
one axis at a time around the tiny teacher (resolution, frames per clip and per unit, patch size, width,
depth, batch).

Each variant runs in its own subprocess through ``bench/bench_train.py`` (one CPU device, the real ``flow``
stage on synthetic records of the variant's shapes): compile, warm up, then time ``--steps`` steps. The
peak is the best of a 512^3 fp32 matmul timed in the same subprocess; FLOPs are XLA's cost analysis of the
step with the blocks unrolled, averaged over the pyramid-unit layouts a step draws from
(``bench_train.mean_layout_flops``). Run it on an idle machine: the figures are wall-clock.

    python bench/bench_flow_sizes.py                          # every axis, Markdown table
    python bench/bench_flow_sizes.py --axes batch width --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402

#: Axes of the sweep: name -> variants, each (label, extra --set overrides, batch or None for the default).
AXES: dict[str, list[tuple[str, tuple[str, ...], int | None]]] = {
    "resolution": [
        ("32 px, 4x VAE, patch 2", (), None),
        ("48 px, 4x VAE, patch 1", ("video.height=48", "video.width=48", "model.mmdit.patch_size=1",
                                    "model.mmdit.pos_embed_max_size=12", "model.mmdit.sample_size=12"), None),
        ("64 px, 4x VAE, patch 2", ("video.height=64", "video.width=64", "model.mmdit.pos_embed_max_size=8"), None),
    ],
    "frames": [
        ("9 frames, 4 per unit", (), None),
        ("9 frames, 8 per unit", ("pyramid.frames_per_unit=8",), None),
        ("17 frames, 4 per unit", ("video.num_frames=17",), None),
        ("17 frames, 8 per unit", ("video.num_frames=17", "pyramid.frames_per_unit=8"), None),
    ],
    "patch": [
        ("patch 2", (), None),
        ("patch 1", ("model.mmdit.patch_size=1", "model.mmdit.pos_embed_max_size=8", "model.mmdit.sample_size=8"),
         None),
    ],
    "width": [
        ("64 wide (4 heads)", ("model.mmdit.num_heads=4",), None),
        ("128 wide (8 heads)", (), None),
        ("192 wide (12 heads)", ("model.mmdit.num_heads=12",), None),
        ("256 wide (8 heads x 32)", ("model.mmdit.head_dim=32",), None),
    ],
    "depth": [
        ("4 blocks", ("model.mmdit.num_layers=4",), None),
        ("8 blocks", (), None),
        ("12 blocks", ("model.mmdit.num_layers=12",), None),
    ],
    "batch": [
        ("batch 4", (), 4),
        ("batch 16", (), 16),
        ("batch 32", (), 32),
        ("batch 64", (), 64),
    ],
}


def run_variant(config: str, overrides: list[str], batch: int, steps: int) -> dict:
    argv = ["--stage", "flow", "--config", config, "--batch", str(batch), "--steps", str(steps), "--warmup", "3",
            "--devices", "1"] + [x for o in overrides for x in ("--set", o)]
    args = bench_train.build_parser().parse_args(argv)
    return bench_train.run_devices(args, argv)[0]


def table(rows: list[dict]) -> str:
    out = ["| axis | variant | batch | tokens / clip | GFLOP / clip | clips/s | GFLOP/s | % of matmul peak | "
           "compile s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gflop_clip = r["flops_per_device"] / r["batch"] / 1e9
        out.append(f"| {r['axis']} | {r['variant']} | {r['batch']} | {r['tokens_per_example']} | {gflop_clip:.3f} | "
                   f"{r['samples_per_s']:.1f} | {r['flops_per_device'] / r['step_ms'] * 1e3 / 1e9:.1f} | "
                   f"{100 * r['mfu']:.1f} | {r['compile_s']:.0f} |")
    peaks = [r["peak_flops_per_device"] / 1e9 for r in rows]
    out.append("")
    out.append(f"Matmul peak measured beside each variant: {min(peaks):.0f}-{max(peaks):.0f} GFLOP/s (fp32, 512^3).")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="base preset (default tiny: the shipped teacher's shape)")
    p.add_argument("--axes", nargs="+", default=list(AXES), choices=list(AXES))
    p.add_argument("--batch", type=int, default=16, help="batch of every variant but the batch axis")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override applied to every variant")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    for axis in args.axes:
        for label, extra, batch in AXES[axis]:
            print(f"[{axis}] {label} ...", file=sys.stderr, flush=True)
            try:
                r = run_variant(args.config, list(args.overrides) + list(extra), batch or args.batch, args.steps)
            except RuntimeError as e:
                print(f"[{axis}] {label}: failed: {str(e).splitlines()[-1]}", file=sys.stderr)
                continue
            rows.append(dict(r, axis=axis, variant=label))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
