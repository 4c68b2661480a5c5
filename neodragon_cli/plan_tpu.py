"""`neodragon plan --topology v5e:4x4`: every stage's train step compiled by the TPU compiler for a topology.

Runs on a CPU-only host with libtpu installed (the ``tpu`` extra). Per stage: per-chip memory from the TPU
compiler's buffer assignment (state, batch, temporaries, code), FLOPs per chip, the compiler's estimated
step time and the MFU it implies against the chip's published bf16 peak, and which chips the footprint fits.
"""

from __future__ import annotations

import json
import os
import sys

#: Stages in pipeline order as `--stage` names; each is planned when its stage is registered ("as they
#: land").
TOPOLOGY_STAGES = ("flow", "vae", "text-distill", "decoder", "recover-distill", "dmd")
#: Stages without an MMDiT: the depth probe does not apply to them.
NO_MMDIT = frozenset({"vae", "text-distill", "decoder"})
#: Examples per chip when `--batch` is not given.
DEFAULT_PER_CHIP = 2
GIB = 2**30


class PlanUsageError(Exception):
    """One line on stderr, exit status 2."""


def _registered(name: str) -> str | None:
    """The registered stage a `--stage` name plans, or None while it has not landed."""
    from neodragon_cli.train import resolve_plan_stage
    from train import stages as stages_lib

    if name == "dmd":
        return resolve_plan_stage("dmd")
    import importlib

    for cand in (name, name.replace("-", "_")):
        if cand in stages_lib.available_stages():
            return cand
        try:
            importlib.import_module(f"train.{cand}")
        except ModuleNotFoundError as e:
            if e.name != f"train.{cand}":
                raise
            continue
        if cand in stages_lib.available_stages():
            return cand
    return None


def stages_to_plan(arg: str | None) -> list[tuple[str, str | None]]:
    """``[(--stage name, registered stage or None)]`` for ``--stage`` (default / ``all``: every stage)."""
    names = TOPOLOGY_STAGES if arg in (None, "all") else tuple(s.strip() for s in arg.split(","))
    unknown = [n for n in names if n not in TOPOLOGY_STAGES]
    if unknown:
        raise PlanUsageError(f"unknown --stage {','.join(unknown)}; expected all or some of {','.join(TOPOLOGY_STAGES)}")
    return [(n, _registered(n)) for n in names]


def default_mesh(chips: int) -> str:
    """``fsdp`` over 8 chips (the MMDiT's 24 heads split 8 ways when a stage column is smaller than the chip
    count, see the ``fsdp_sp`` rules), ``data`` over the rest; fewer chips: all ``fsdp``."""
    fsdp = 8 if chips % 8 == 0 else chips
    return f"data={chips // fsdp},fsdp={fsdp}"


def plan_overrides(overrides: list[str], stage: str, preset: str, tensor: int = 1) -> tuple[list[str], list[str]]:
    """The user's ``--set`` plus the topology plan's defaults: rules ``fsdp_sp`` (``fsdp`` where the batch
    covers the mesh; token-split below it; ``fsdp_tp`` when the mesh has a ``tensor`` axis) unless
    ``mesh.rules`` is set, and, for a pyramid stage, only its
    largest layout (a compiled switch reserves its largest branch) unless ``train.pyramid_units`` is set.
    Returns (overrides, notes)."""
    from neodragon_jax.config import load_config, parse_override

    flat = [o for item in overrides for o in item.split()]
    keys = {parse_override(o)[0] for o in flat}
    out, notes = list(flat), []
    if "mesh.rules" not in keys:
        out.append("mesh.rules=" + ("fsdp_tp" if tensor > 1 else "fsdp_sp"))
    if "train.pyramid_units" not in keys and stage not in NO_MMDIT:
        from neodragon_jax.pyramid.history import num_units
        from train.flow_matching import flow_geometry

        cfg = load_config(preset, flat)
        last = num_units(flow_geometry(cfg).frames, cfg.pyramid.frames_per_unit) - 1
        out.append(f"train.pyramid_units=[{last}]")
        notes.append(f"largest pyramid layout only (train.pyramid_units=[{last}]: a compiled switch reserves its "
                     f"largest branch; --set train.pyramid_units=[] compiles every layout)")
    return out, notes


def run(args) -> int:
    # Compile-only TPU devices need no TPU backend: keep JAX on the CPU so a CPU-only host with libtpu
    # installed does not try (and log a failure) to open a TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from neodragon_cli.train import CLIError, _err, activation_estimate, parse_depth_probe, plan_compile_flags, plan_config
    from neodragon_jax.accelerators import TopologyError, fits_line, parse_topology, topology_chips
    from neodragon_jax.config import ConfigError
    from neodragon_jax.sharding import MeshError, mesh_devices_needed, parse_mesh_shape

    out, failed = [], 0
    try:
        chip, _ = parse_topology(args.topology)
        chips = topology_chips(args.topology)
        mesh = args.mesh or default_mesh(chips)
        try:
            shape = parse_mesh_shape(mesh)
            n = mesh_devices_needed(shape)
        except MeshError as e:
            raise PlanUsageError(f"bad --mesh {mesh!r}: {e}") from None
        if n != chips:
            raise TopologyError(
                f"--mesh {mesh} has {n} devices but topology {args.topology} has {chips} chips; pick axes that "
                f"multiply to {chips} (e.g. data=1,fsdp={chips})")
        probe = parse_depth_probe(getattr(args, "depth_probe", None))
        todo = stages_to_plan(args.stage)
        from neodragon_jax.accelerators import libtpu_available, LIBTPU_HINT

        if not libtpu_available():
            raise TopologyError(f"--topology {LIBTPU_HINT}")
        plan_compile_flags()
        from train.plan import plan, plan_by_depth

        presets = args.config or ["pyramid-flow-sd3-320p", "neodragon-320p"]
        batch = args.batch if args.batch is not None else DEFAULT_PER_CHIP * chips
        for preset in presets:
            for cli_name, stage in todo:
                if stage is None:
                    if not args.json:
                        print(f"## {preset}: stage {cli_name!r} has not landed yet (no registered stage); skipped\n")
                    continue
                overrides, notes = plan_overrides(args.overrides, cli_name, preset, shape["tensor"])
                cfg, shape = plan_config(preset, overrides, mesh, stage, batch)
                try:
                    if probe and cli_name not in NO_MMDIT:
                        report = plan_by_depth(None, cfg, shape, probe=probe, global_batch=cfg.train.global_batch,
                                               topology=args.topology)
                    else:
                        report = plan(None, cfg, shape, global_batch=cfg.train.global_batch, topology=args.topology)
                except (RuntimeError, NotImplementedError) as e:
                    failed += 1
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    print(f"neodragon plan: {preset} stage {cli_name!r} did not compile for {args.topology}: {first}",
                          file=sys.stderr)
                    continue
                act = activation_estimate(cfg, shape) if report.attention else None
                total = report.total_bytes_per_device
                row = {"config": cfg.name, "stage": cli_name, "command_overrides": overrides,
                       **json.loads(report.to_json()),
                       "total_bytes_per_device": total, "est_mfu": report.est_mfu,
                       "fits": {k: v for k, v in _fits(total).items()}, "examples_per_chip": batch / chips}
                if args.json:
                    out.append(row)
                    continue
                print(f"## {cfg.name}: train step of stage {cli_name!r}" + (f" ({stage})" if stage != cli_name else ""))
                print(report.table())
                print(f"  examples per chip: {batch / chips:g}")
                for note in notes:
                    print(f"  {note}")
                if act is not None:
                    print(f"  activations saved for backward (estimate, traced, largest layout, per chip): "
                          f"{act / GIB:.3f} GiB")
                print("  " + fits_line(total, compiled_for=chip.name))
                print()
    except PlanUsageError as e:
        return _err("plan", str(e))
    except (TopologyError, CLIError) as e:
        return _err("plan", str(e))
    except MeshError as e:
        return _err("plan", f"bad --mesh: {e}")
    except (ConfigError, ValueError) as e:
        return _err("plan", str(e))
    if args.json:
        print(json.dumps(out, indent=2))
    return 1 if failed else 0


def _fits(total: int) -> dict[str, bool]:
    from neodragon_jax.accelerators import fit_verdict

    return fit_verdict(total)


def table_row(row: dict) -> str:
    """One Markdown row of the README's TPU plan table from a `--json` record."""
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in row["mesh"].items() if v > 1 or k == "fsdp")
    est = row.get("est_step_seconds")
    mfu = row.get("est_mfu")
    return (f"| {row['config']} | {row['stage']} | {row['topology']} | {mesh} | {row['examples_per_chip']:g} | "
            f"{row.get('remat')} | {gib(row['param_bytes_per_device'] + row['optimizer_bytes_per_device'] + row['frozen_bytes_per_device'])} | "
            f"{gib(row['temp_bytes_per_device'])} | {gib(row['total_bytes_per_device'])} | "
            f"{row['flops_per_device'] / 1e12:.2f} | {'' if est is None else f'{est:.2f}'} | "
            f"{'' if mfu is None else f'{100 * mfu:.0f}%'} | {'yes' if row['fits'].get(row['chip']) else 'NO'} |")


