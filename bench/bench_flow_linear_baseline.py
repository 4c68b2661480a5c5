"""Has the flow teacher learned more than a per-patch linear denoiser? Per-stage loss against that baseline.

Prints, for a demo workdir (also for one made before the demo's report carried this table), each pyramid
stage's target variance, the loss of the best per-patch map linear in the noisy patch with coefficients
quadratic in the noise level (``neodragon_jax.eval.flow_baseline``: no text, no neighbours), and the
teacher's own loss from ``flow/metrics.jsonl`` (mean over the last 10% of steps)::

    python bench/bench_flow_linear_baseline.py --workdir runs/demo

Measured (README "Demo"), finest stage, teacher against baseline: on 8x8x16 latents (8x VAE) the 64-wide
teacher after 2000 steps 0.315 against 0.258 (worse than the baseline), the 128-wide one after 3000 steps
0.219; on 16x16x16 latents (4x VAE) the 128-wide teacher after 2000 steps 0.216 against 0.283. All of them
drew texture where the objects should be.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--records", type=int, default=400, help="latent records to use (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from neodragon_jax.config import load_config
    from neodragon_jax.eval.flow_baseline import teacher_vs_baseline
    from neodragon_jax.pyramid.scheduler import make_schedule

    wd = Path(args.workdir)
    demo = wd / "demo.json"
    if not demo.is_file():
        raise SystemExit(f"{wd} has no demo.json: run `neodragon demo --workdir {wd}` (at least through its "
                         f"latents phase) first")
    saved = json.loads(demo.read_text())["config"]
    cfg = load_config("tiny", [f"pyramid.{k}={json.dumps(v)}" for k, v in saved["pyramid"].items()])
    p = int(saved["model"]["mmdit"]["patch_size"])
    rows, shape = teacher_vs_baseline(wd / "latents" / "records", wd / "flow" / "metrics.jsonl",
                                      make_schedule(cfg.pyramid), p, limit=args.records, seed=args.seed)
    if not rows:
        raise SystemExit(f"{wd} has no latents/records/*.npz: run `neodragon demo --workdir {wd}` (at least "
                         f"through its latents phase) first")
    print(f"{shape[0]} records {shape[1:]}, patch {p}, {len(rows)} stages")
    print("| stage | latent | var(v*) | per-patch linear baseline | teacher (last 10% of steps) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        t = r["teacher"]
        h, w = r["latent_hw"]
        print(f"| {r['stage']} | {h}x{w} | {r['target_var']:.3f} | {r['linear_baseline']:.3f} | "
              f"{'-' if t is None else f'{t:.3f}'} |")


if __name__ == "__main__":
    main()
