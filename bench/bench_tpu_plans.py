"""The README's TPU plan table: every stage at 320x512 on v5e and v5p topologies, from the TPU compiler.

Each row is one `neodragon plan --topology ... --json` (in this process; needs the tpu extra). Results are
kept in ``--out`` (JSON, one record per row) and a rerun only compiles the rows that are missing, so the
table can be built over several sessions (a full-size row compiles for 5-20 minutes on 2 CPU cores).

    python bench/bench_tpu_plans.py                      # every row, then the Markdown table
    python bench/bench_tpu_plans.py --rows neo-flow-v5e16 --out /tmp/plans.json
    python bench/bench_tpu_plans.py --table-only          # the table of the rows already in --out
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

PROBE = "2,3"
NEO, PF = "neodragon-320p", "pyramid-flow-sd3-320p"
# name: (preset, --stage, --topology, extra --set overrides, --depth-probe or None)
ROWS: dict[str, tuple[str, str, str, tuple[str, ...], str | None]] = {
    "neo-flow-v5e8": (NEO, "flow", "v5e:2x4", (), PROBE),
    "neo-flow-v5e16": (NEO, "flow", "v5e:4x4", (), PROBE),
    "neo-flow-v5e256": (NEO, "flow", "v5e:16x16", (), PROBE),
    "neo-flow-v5p8": (NEO, "flow", "v5p:2x2x2", (), PROBE),
    "pf-flow-v5e16": (PF, "flow", "v5e:4x4", (), PROBE),
    "pf-flow-v5p8": (PF, "flow", "v5p:2x2x2", (), PROBE),
    "pf-flow-v5p256": (PF, "flow", "v5p:8x8x4", (), PROBE),
    "neo-dmd-v5p8": (NEO, "dmd", "v5p:2x2x2", (), PROBE),
    "neo-dmd-v5p64": (NEO, "dmd", "v5p:4x4x4", (), PROBE),
    "neo-dmd-v5p256": (NEO, "dmd", "v5p:8x8x4", (), PROBE),
    "neo-dmd-v5e16": (NEO, "dmd", "v5e:4x4", ("model.mmdit.remat=full",), PROBE),
    "vae-v5e16-crops": (NEO, "vae", "v5e:4x4", ("stages.vae.clip_frames=17", "stages.vae.crop=256"), None),
    "vae-v5p8": (NEO, "vae", "v5p:2x2x2", (), None),
}

HEADER = ("| config | stage | topology | mesh | ex/chip | remat | state GiB | temp GiB | total GiB | TFLOP/chip | "
          "est. step s | est. MFU | fits the chip |\n|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")


def command(name: str) -> list[str]:
    preset, stage, topo, sets, probe = ROWS[name]
    argv = ["plan", "--topology", topo, "--config", preset, "--stage", stage]
    for s in sets:
        argv += ["--set", s]
    if probe:
        argv += ["--depth-probe", probe]
    return argv


def run_row(name: str) -> dict:
    from neodragon_cli.main import main

    buf = io.StringIO()
    t = time.time()
    with contextlib.redirect_stdout(buf):
        rc = main(command(name) + ["--json"])
    if rc != 0:
        raise RuntimeError(f"row {name}: `neodragon {' '.join(command(name))}` exited {rc}")
    rows = json.loads(buf.getvalue())
    return {"name": name, "command": "neodragon " + " ".join(command(name)), "wall_s": time.time() - t, **rows[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--out", default="runs/tpu_plans.json")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"unknown rows {unknown}; expected some of {list(ROWS)}", file=sys.stderr)
        return 2
    if not args.table_only:
        for name in names:
            if name in done:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {name}: neodragon {' '.join(command(name))}", file=sys.stderr, flush=True)
            done[name] = run_row(name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(done, indent=1))
            print(f"  done in {done[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    from neodragon_cli.plan_tpu import table_row

    print(HEADER)
    for name in names:
        if name in done:
            print(table_row(done[name]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
