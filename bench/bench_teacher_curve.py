"""Learning curve of a flow teacher: held-out accuracy (beside chance) against training clips seen.

For every kept checkpoint of a flow run (``checkpoint.keep_every`` keeps them), the teacher (EMA weights
when the run kept one) generates the held-out prompts (``neodragon_jax.eval.heldout``) with the config's
sampling schedule, and the strict scorer judges them. Writes ``curve.json``, ``curve.md`` and ``curve.png``
(colour and motion accuracy, and their chance levels, against clips seen) to ``--out``; a rerun skips the
steps already in ``curve.json``, so it can follow a run that is still training.

    python bench/bench_teacher_curve.py --flow runs/demo/flow --vae runs/demo/vae \\
        --text runs/demo/text/params.npz --prompts 48 --out runs/demo/curve
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ATTRS = ("colour", "motion", "shape", "background", "count")


def kept_steps(flow: Path) -> list[int]:
    ck = flow / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit() and (p / "state").is_dir()) if ck.is_dir() else []


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    x = [r["clips_seen"] / 1e3 for r in rows]
    for attr, colour in (("colour", "tab:red"), ("motion", "tab:blue"), ("shape", "tab:green")):
        ax.plot(x, [r["accuracy"].get(attr, float("nan")) for r in rows], "o-", color=colour, label=attr)
        ax.plot(x, [r["chance"].get(attr, float("nan")) for r in rows], ":", color=colour, alpha=0.6,
                label=f"{attr} chance")
    ax.set_xlabel("training clips seen (thousands)")
    ax.set_ylabel(f"held-out accuracy ({rows[0]['videos']} prompts)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    out = ["| step | clips seen | " + " | ".join(f"{a} (chance)" for a in ATTRS) + " | all correct |",
           "|---:|---:|" + "---:|" * len(ATTRS) + "---:|"]
    for r in rows:
        cells = [f"{r['accuracy'][a]:.3f} ({r['chance'][a]:.3f})" if a in r["accuracy"] else "-" for a in ATTRS]
        out.append(f"| {r['step']} | {r['clips_seen']:,} | " + " | ".join(cells) + f" | {r['all_correct']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flow", required=True)
    p.add_argument("--vae", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--steps", default="", help="comma-separated steps (default: every kept checkpoint)")
    p.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. sampling.first_unit_steps=[10,10,10]")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from neodragon_cli.release import build_pipeline
    from neodragon_jax.eval.heldout import evaluate_heldout, heldout_prompts

    flow, out = Path(args.flow), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "curve.json"
    rows = json.loads(done_path.read_text()) if done_path.is_file() else []
    have = {r["step"] for r in rows}
    steps = [int(s) for s in args.steps.split(",") if s] or kept_steps(flow)
    prompts = heldout_prompts(args.prompts)
    for step in steps:
        if step in have:
            continue
        t0 = time.perf_counter()
        pipe, cfg, step = build_pipeline(flow, Path(args.vae), Path(args.text), step=step, ema=not args.raw,
                                         overrides=args.overrides)
        res = evaluate_heldout(pipe, prompts)
        row = {"step": step, "clips_seen": step * cfg.train.global_batch, **res.as_dict(),
               "eval_seconds": time.perf_counter() - t0}
        rows = sorted([r for r in rows if r["step"] != step] + [row], key=lambda r: r["step"])
        done_path.write_text(json.dumps(rows, indent=1) + "\n")
        acc, ch = res.report.accuracy, res.chance
        print(f"step {step} ({row['clips_seen']:,} clips): " + ", ".join(
            f"{a} {acc[a]:.3f} (chance {ch[a]:.3f})" for a in ATTRS if a in acc), flush=True)
    if not rows:
        print(f"no checkpoint to evaluate under {flow / 'checkpoints'}", file=sys.stderr)
        return 1
    (out / "curve.md").write_text(f"Held-out accuracy of {flow} ({rows[-1]['schedule']}):\n\n" + table(rows) + "\n")
    plot(rows, out / "curve.png", f"{flow} - {rows[-1]['schedule']}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
