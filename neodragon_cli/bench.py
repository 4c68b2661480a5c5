"""`neodragon bench train`: flow-stage step time / tokens/s / MFU on simulated devices, and the full-size
plan memory table (teacher and student at 8, 32 and 256 devices) with 16 GiB / 95 GiB fit columns.

Step figures come from ``bench/bench_train.py`` (one subprocess per device count). On simulated CPU devices
all "devices" share this host's cores: the 8-device figures measure sharding overhead, not speed-up, and
MFU is relative to a matmul microbenchmark on the same CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

# name -> (preset, overrides, global batch). "small": 4 MMDiT blocks at the full width 1536 (24 heads x 64),
# the Neodragon text stack's shapes (128 x 1536 tokens, 2048 pooled), a 128x128x9 video (16x16x2 latent),
# float32 compute (this CPU has no fast bf16).
STEP_CONFIGS = {
    "tiny": ("tiny", [], 8),
    "small": ("neodragon-320p", ["model.mmdit.num_layers=4", "video.height=128", "video.width=128",
                                 "video.num_frames=9", 'precision.dtype="float32"'], 8),
}
# devices -> mesh of the plan table (4 examples per device; FSDP within 32 devices, data parallel across).
PLAN_MESHES = {8: "data=1,fsdp=8", 32: "data=1,fsdp=32", 256: "data=8,fsdp=32"}
PLAN_PRESETS = ("pyramid-flow-sd3-320p", "neodragon-320p")


def add_arguments(p) -> None:
    p.add_argument("what", choices=["train"], help="what to benchmark")
    p.add_argument("--parts", nargs="+", default=["steps", "plan"], choices=["steps", "plan"])
    p.add_argument("--configs", nargs="+", default=list(STEP_CONFIGS), choices=list(STEP_CONFIGS),
                   help="flow-stage step benchmarks to run")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8], help="simulated device counts (steps)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--plan-devices", type=int, nargs="+", default=list(PLAN_MESHES), choices=list(PLAN_MESHES))
    p.add_argument("--plan-presets", nargs="+", default=list(PLAN_PRESETS))
    p.add_argument("--plan-stage", default="flow", choices=["flow", "dmd"])
    p.add_argument("--plan-all-units", action="store_true",
                   help="compile every unit layout (default: only the largest, which bounds memory; a compiled "
                        "switch's temp memory and FLOPs are those of its largest branch)")
    p.add_argument("--plan-depth-probe", default="2,4", metavar="A,B",
                   help="compile the plans at A and B MMDiT blocks and extrapolate to the full depth (default "
                        "2,4; a full-depth CPU compile takes ~25 min per row)")
    p.add_argument("--plan-exact", action="store_true", help="compile every plan row at its full depth")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra overrides for the plan configs (e.g. model.mmdit.remat=full)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")


def _bench_train_module():
    path = ROOT / "bench" / "bench_train.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `neodragon bench` runs from a source checkout")
    spec = importlib.util.spec_from_file_location("bench_train", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def step_benchmarks(names, devices, steps) -> list[dict]:
    bt = _bench_train_module()
    results = []
    for name in names:
        preset, overrides, batch = STEP_CONFIGS[name]
        argv = ["--stage", "flow", "--config", preset, "--batch", str(batch), "--steps", str(steps),
                "--warmup", "2", "--devices", *map(str, devices)]
        for o in overrides:
            argv += ["--set", o]
        rows = bt.run_devices(SimpleNamespace(devices=list(devices)), argv)
        for r in rows:
            r["name"] = name
        results += rows
        print(f"[{name}] done", flush=True)
    return results


def _largest_unit(preset: str, overrides) -> int:
    from neodragon_jax.config import load_config
    from neodragon_jax.models.vae.normalize import latent_frames

    cfg = load_config(preset, overrides)
    return latent_frames(cfg.video.num_frames, cfg.model.vae.causal.temporal_factor) - 1


def plan_table(presets, device_counts, stage_name, all_units: bool, overrides, jsonl: str | None = None,
               probe: tuple[int, int] | None = None) -> list[dict]:
    """Plan every (device count, preset); each row is printed (and appended to ``jsonl``) as soon as it is
    compiled, since a full-size compile takes tens of minutes on a small CPU."""
    from neodragon_cli.train import GIB, activation_estimate, plan_compile_flags, plan_config, resolve_plan_stage
    from train.plan import plan, plan_by_depth

    plan_compile_flags()
    stage = resolve_plan_stage(stage_name)
    rows = []
    for n in device_counts:
        for preset in presets:
            extra = list(overrides)
            if not all_units:
                extra.append(f"train.pyramid_units=[{_largest_unit(preset, overrides)}]")
            mesh = PLAN_MESHES[n]
            cfg, shape = plan_config(preset, extra, mesh, stage, None)
            if probe:
                rep = plan_by_depth(None, cfg, shape, probe=probe, global_batch=cfg.train.global_batch)
            else:
                rep = plan(None, cfg, shape, global_batch=cfg.train.global_batch)
            act = activation_estimate(cfg, shape)
            row = {"config": cfg.name, "stage": stage, "devices": n, "mesh": mesh,
                   **json.loads(rep.to_json()),
                   "activation_bytes_per_device": act, "total_bytes_per_device": rep.total_bytes_per_device,
                   "fits_16GiB": rep.total_bytes_per_device <= 16 * GIB,
                   "fits_95GiB": rep.total_bytes_per_device <= 95 * GIB}
            rows.append(row)
            print(f"[plan {cfg.name} {mesh}]\n{rep.table()}", flush=True)
            if jsonl:
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def _mesh(mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items() if v != 1 or k == "fsdp") if isinstance(mesh, dict) else mesh


def _blocks(row) -> str:
    probe = row.get("depth_probe")
    n = row.get("num_layers")
    return f"{n} (from {probe[0]}, {probe[1]})" if probe else f"{n}"


def format_plan(rows) -> str:
    g = 2**30
    head = (f"| config | devices | mesh | batch | blocks | params GiB | optimizer GiB | batch GiB | activations GiB (est.) | "
            f"temp GiB | total GiB | TFLOP/step/device | fits 16 GiB | fits 95 GiB |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        act = r["activation_bytes_per_device"]
        lines.append(
            f"| {r['config']} | {r['devices']} | {_mesh(r['mesh'])} | {r['global_batch']} | {_blocks(r)} | "
            f"{r['param_bytes_per_device'] / g:.3f} | {r['optimizer_bytes_per_device'] / g:.3f} | "
            f"{r['batch_bytes_per_device'] / g:.3f} | {'-' if act is None else f'{act / g:.2f}'} | "
            f"{r['temp_bytes_per_device'] / g:.2f} | {r['total_bytes_per_device'] / g:.2f} | "
            f"{r['flops_per_device'] / 1e12:.2f} | {'yes' if r['fits_16GiB'] else 'no'} | "
            f"{'yes' if r['fits_95GiB'] else 'no'} |")
    return "\n".join(lines)


def run(args) -> int:
    out = {}
    try:
        if "steps" in args.parts:
            bt = _bench_train_module()
            out["steps"] = step_benchmarks(args.configs, args.devices, args.steps)
            print("\nflow stage train step (simulated CPU devices):")
            print(bt.format_results(out["steps"]))
        if "plan" in args.parts:
            flat = [o for item in args.overrides for o in item.split()]
            jsonl = str(Path(args.json).with_suffix(".plan.jsonl")) if args.json else None
            from neodragon_cli.train import parse_depth_probe

            probe = None if args.plan_exact else parse_depth_probe(args.plan_depth_probe)
            out["plan"] = plan_table(args.plan_presets, args.plan_devices, args.plan_stage, args.plan_all_units, flat,
                                     jsonl, probe)
            print("\nfull-size train-step plan (per device; total = params + optimizer + frozen + batch + temp):")
            print(format_plan(out["plan"]))
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"neodragon bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
