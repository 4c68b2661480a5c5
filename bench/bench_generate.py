"""Per-video wall time of the tiny pipeline: teacher schedule (20-20-20 then 10-10-10, CFG 7/5) vs 1-1-1.

Both schedules run side by side in one process on the same random-weight pipeline. The first video of each
schedule compiles its (unit, stage) steps; the figures are the median of the following warm runs.

    python bench/bench_generate.py [--config tiny] [--frames 17] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from neodragon_jax.config import load_config
from neodragon_jax.pipelines.text_to_video import GenerationRequest, TextToVideoPipeline

SCHEDULES = {
    "teacher 20-20-20,10-10-10 cfg 7/5": ((20, 20, 20), (10, 10, 10), (7.0, 5.0)),
    "distilled 1-1-1 no cfg": ((1, 1, 1), (1, 1, 1), (0.0, 0.0)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config)
    pipe = TextToVideoPipeline.random(cfg)
    rows = []
    for name, (first, later, scales) in SCHEDULES.items():
        times, nfe, parts = [], 0, None
        for r in range(args.repeats + 1):
            req = GenerationRequest("a red circle moving left on a black background", seed=r,
                                    num_frames=args.frames, first_unit_steps=first, later_unit_steps=later,
                                    cfg_scales=scales)
            t0 = time.perf_counter()
            out = pipe.generate(req)
            dt = time.perf_counter() - t0
            if r == 0:
                compile_time = dt
                continue
            times.append(dt)
            nfe, parts = out.nfe, out.timings
        rows.append((name, nfe, compile_time, statistics.median(times), parts))
    print(f"# generate benchmark: {cfg.name}, {args.frames} frames {cfg.video.height}x{cfg.video.width}")
    print("| schedule | NFE | first video (compiles) s | warm video s | text s | denoise s | decode s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, nfe, c, t, p in rows:
        print(f"| {name} | {nfe} | {c:.2f} | {t:.2f} | {p['text']:.2f} | {p['denoise']:.2f} | {p['decode']:.2f} |")
    print(f"\nwarm speed-up of 1-1-1 over the teacher schedule: {rows[0][3] / rows[1][3]:.1f}x "
          f"(NFE ratio {rows[0][1] / rows[1][1]:.1f}x)")


if __name__ == "__main__":
    main()
