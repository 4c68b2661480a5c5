"""`neodragon train STAGE` (run a training stage) and `neodragon plan --mesh` (AOT plan of its train step).

Everything heavy is imported inside the functions, so `neodragon --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_COMPILE_CACHE = "~/.cache/neodragon/jax-compile"
FULL_SIZE_PRESETS = ("pyramid-flow-sd3-320p", "neodragon-320p")
# `--stage` names of `neodragon plan --mesh` -> registered stage names.
PLAN_STAGES = {"flow": "flow", "dmd": "dmd", "toy": "toy", "text-distill": "text-distill", "decoder": "decoder",
               "recover-flow": "recover-flow", "recover-distill": "recover-distill"}


class CLIError(Exception):
    """A user error: printed as one line (no traceback), exit status 2."""


def _err(verb: str, msg: str) -> int:
    print(f"neodragon {verb}: {msg}", file=sys.stderr)
    return 2


def enable_compile_cache(path: str | None) -> str | None:
    """Persistent XLA compilation cache (a second run of the same step, e.g. a resume, skips compiling)."""
    if path is None:
        path = os.environ.get("NEODRAGON_COMPILE_CACHE", DEFAULT_COMPILE_CACHE)
    if not path or path.lower() == "none":
        return None
    import jax

    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return str(folder)


# ---------------------------------------------------------------------------------------------- train
def add_train_arguments(p) -> None:
    from train import registry  # no JAX: the table of stages only

    p.add_argument("stage", help="training stage, one of: " + registry.describe(trainable_only=True)
                   + ". Its settings are --set stages.STAGE.FIELD=VALUE")
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a .toml path (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set optim.lr=1e-4)")
    p.add_argument("--steps", type=int, default=None, help="train until this many steps in total (train.steps)")
    p.add_argument("--workdir", default=None,
                   help="run folder: checkpoints/, config.json, metrics.jsonl, tensorboard/ (default runs/STAGE-CONFIG)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --workdir (without it, a workdir that already "
                        "holds checkpoints is refused)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this invocation; resume later")
    p.add_argument("--batch", type=int, default=None, help="global batch (train.global_batch)")
    p.add_argument("--records", default=None,
                   help="pre-extracted .npz records (train.flow_matching.extract_records); default: synthetic data")
    p.add_argument("--init-from", default=None,
                   help="official-layout weights (safetensors file or folder) to start from (train.init_checkpoint)")
    p.add_argument("--log-every", type=int, default=None, help="console/TensorBoard interval (train.log_every)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the command without training: config, stage settings, every role's parameter count "
                        "(abstract, nothing allocated) and weight source, the data path and the mesh; reads no "
                        "weights, exit 2 listing what would fail (for a pod command prepared on a laptop)")
    p.add_argument("--compile-cache", default=None,
                   help=f"persistent XLA compilation cache folder, 'none' to disable (default: "
                        f"$NEODRAGON_COMPILE_CACHE or {DEFAULT_COMPILE_CACHE})")


def _train_config(args, *, check_paths: bool = True):
    from neodragon_jax.config import load_config

    cfg = load_config(args.config, [o for item in args.overrides for o in item.split()])
    train = {"stage": args.stage}
    if args.steps is not None:
        if args.steps < 1:
            raise CLIError(f"--steps must be >= 1, got {args.steps}")
        train["steps"] = args.steps
    if args.batch is not None:
        if args.batch < 1:
            raise CLIError(f"--batch must be >= 1, got {args.batch}")
        train["global_batch"] = args.batch
    if args.log_every is not None:
        train["log_every"] = max(1, args.log_every)
    if args.init_from is not None:
        if check_paths and not Path(args.init_from).exists():
            raise CLIError(f"--init-from {args.init_from!r} does not exist")
        train["init_checkpoint"] = str(Path(args.init_from).absolute())
    workdir = Path(args.workdir or Path("runs") / f"{args.stage}-{cfg.name}").absolute()
    train["output_dir"] = str(workdir)
    data = {}
    if args.records is not None:
        if check_paths and not Path(args.records).exists():
            raise CLIError(f"--records {args.records!r} does not exist")
        data = {"source": "records", "path": str(Path(args.records).absolute())}
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **train),
        data=dataclasses.replace(cfg.data, **data),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=bool(args.resume)),
    )


def run_train(args) -> int:
    from neodragon_jax.config import ConfigError
    from neodragon_jax.convert.keymap import CheckpointMismatchError
    from neodragon_jax.data.video_folder import DatasetError, DatasetNotFoundError
    from neodragon_jax.sharding import MeshError

    try:
        cfg = _train_config(args, check_paths=not args.dry_run)
        if args.dry_run:
            return dry_run(cfg)
        cache = enable_compile_cache(args.compile_cache)
        if args.stop_after is not None and args.stop_after < 1:
            raise CLIError(f"--stop-after must be >= 1, got {args.stop_after}")
        return _train(cfg, args.resume, cache, args.stop_after)
    except CLIError as e:
        return _err("train", str(e))
    except (DatasetError, DatasetNotFoundError) as e:  # e.g. captions.jsonl line 7 is not JSON
        return _err("train", f"data.path: {e}")
    except (ConfigError, MeshError) as e:
        return _err("train", f"config error: {e}")
    except CheckpointMismatchError as e:
        return _err("train", f"the checkpoint does not fit this config: {e}")
    except ValueError as e:
        from train.roles import RoleError
        from train.weights import WeightSourceError

        if isinstance(e, (RoleError, WeightSourceError)):  # a role or init source that does not exist
            return _err("train", str(e))
        raise


def _source_problem(src, what: str) -> str | None:
    """Why a weight source could not be read (None if its file or folder is there); reads no weights."""
    from train.weights import release_folder

    if src.kind in ("random", "prune"):
        return None
    if src.kind == "release":
        try:
            release_folder(src.path)
        except (ValueError, FileNotFoundError) as e:
            return f"{what}: {e}"
        return None
    if not Path(src.path).exists():
        return f"{what}: {src.kind} source {src.path!r} does not exist"
    return None


def dry_run(cfg) -> int:
    """``train --dry-run``: everything ``train`` would check before its first step, without reading a weight,
    allocating a parameter or needing the mesh's devices. Prints the run and its roles; exit 2 with every
    problem found (not just the first), so a pod command can be checked on a laptop."""
    from neodragon_jax.sharding import mesh_devices_needed, parse_mesh_shape
    from train import roles as roles_lib
    from train import stages as stages_lib
    from train.state import abstract_models

    problems = []
    built = cfg
    if cfg.data.source != "synthetic" and cfg.data.path and not Path(cfg.data.path).exists():
        problems.append(f"data.path {cfg.data.path!r} does not exist")
        # the rest is still checked, on the stage's stand-in data
        built = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="synthetic"))
    try:
        stage = stages_lib.get_stage(cfg.train.stage, built)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CLIError("; ".join(problems + [str(e)])) from None
    if getattr(stage, "plan_only", False):
        raise CLIError(f"stage {cfg.train.stage!r} is a planning stand-in; use it with `neodragon plan --mesh ...`")
    plan = roles_lib.plan_roles(stage, built)
    specs = abstract_models(plan, list(plan.roles))
    preflight = getattr(stage, "preflight", None)  # a stage's own checks (e.g. a target cache that must exist)
    if callable(preflight):
        problems += list(preflight(built))
    shape = parse_mesh_shape(cfg.mesh)
    # An axis of -1 takes the devices the run finds (a pod's, not this machine's): no count to check.
    needed = None if -1 in shape.values() else mesh_devices_needed(shape)
    batch_devices = None if needed is None else needed // shape["tensor"] if cfg.mesh.rules == "fsdp_tp" else needed
    gb, micro = cfg.train.global_batch, max(cfg.train.micro_batches, 1)
    if gb % micro:
        problems.append(f"train.global_batch={gb} is not divisible by train.micro_batches={micro}")
    elif batch_devices and (gb // micro) % batch_devices:
        problems.append(f"a micro-batch of {gb // micro} examples does not split over the {batch_devices} devices "
                        f"that shard the batch (mesh {shape}, rules {cfg.mesh.rules})")
    data = data_description(stage, cfg)
    if cfg.train.init_checkpoint and not Path(cfg.train.init_checkpoint).exists():
        problems.append(f"train.init_checkpoint {cfg.train.init_checkpoint!r} does not exist")
    mesh = " x ".join(f"{k}={'all' if v == -1 else v}" for k, v in shape.items())
    print(f"neodragon train {cfg.train.stage} --dry-run: config {cfg.name!r}, {cfg.train.steps} steps, global batch "
          f"{gb}" + (f" in {micro} micro-batches" if micro > 1 else "") + f", mesh {mesh} ({cfg.mesh.rules}, "
          f"{needed or 'all the'} devices), data {data}, workdir {cfg.train.output_dir}")
    width = max(len(n) for n in plan.roles)
    for name, role in plan.roles.items():
        src = plan.inits[name]
        problem = _source_problem(src, f"role {name!r}")
        if problem:
            problems.append(problem)
        status = "" if src.kind in ("random", "prune") else " (missing)" if problem else " (found)"
        times = plan.applications(name)
        print(f"  {name:<{width}}  {'trained' if role.trained else 'frozen ':<7}  {specs[name].num_params:>15,} "
              f"params  init {src}{status}" + (f"  updated {times}x per step" if role.trained else ""))
    print("  nothing was read or allocated; per-device memory: neodragon plan --mesh ... --stage "
          f"{cfg.train.stage}")
    if problems:
        for p in problems:
            print(f"neodragon train: {p}", file=sys.stderr)
        return 2
    print("dry run: ok")
    return 0


def data_description(stage, cfg) -> str:
    """What a run trains on, as the banner says it: the stage's own words where it reads data itself (the
    vae stage reads a video folder while data.source stays 'synthetic'), else records or synthetic."""
    describe = getattr(stage, "data_description", None)
    if callable(describe):
        return describe(cfg)
    if cfg.data.source == "records":
        return f"records {cfg.data.path}"
    return cfg.data.source


def _train(cfg, resume: bool, cache: str | None, stop_after: int | None = None) -> int:
    import jax

    from train import stages as stages_lib
    from train.checkpoint import Checkpointer
    from train.loop import checkpoint_dir, run
    from neodragon_jax.sharding import initialize_distributed
    from train.metrics import NonFiniteError

    initialize_distributed(cfg.mesh)  # multi-host: before anything asks JAX about devices
    main = jax.process_index() == 0
    if not main:  # one copy of the console output: process 0 speaks for the run, the others only on errors
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)
    say = print if main else (lambda *a, **k: None)
    try:
        stage = stages_lib.get_stage(cfg.train.stage, cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if getattr(stage, "plan_only", False):
        raise CLIError(f"stage {cfg.train.stage!r} is a planning stand-in; use it with `neodragon plan --mesh ...`")

    ckpt_dir = checkpoint_dir(cfg)
    latest = None
    if ckpt_dir.is_dir():
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns that a read-only manager does not save
        try:
            latest = Checkpointer(ckpt_dir, cfg.checkpoint, read_only=True).latest_step()
        finally:
            absl.setLevel(level)
    if latest is not None and not resume:
        raise CLIError(
            f"{cfg.train.output_dir} already holds a run (checkpoint at step {latest}): pass --resume to continue "
            f"it, or choose another --workdir"
        )
    mesh = " x ".join(f"{k}={v}" for k, v in cfg.mesh.shape().items())
    say(f"neodragon train {cfg.train.stage}: config {cfg.name!r}, {cfg.train.steps} steps, global batch "
          f"{cfg.train.global_batch}, {jax.device_count()} {jax.devices()[0].platform} device(s)"
          + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "") + f", mesh {mesh} "
          f"({cfg.mesh.rules}), data {data_description(stage, cfg)}", flush=True)
    say(f"  workdir {cfg.train.output_dir} (config.json, metrics.jsonl, checkpoints/)"
          + (f"; compile cache {cache}" if cache else ""), flush=True)
    if resume and latest is None:
        say("  --resume: no checkpoint yet, starting from step 0", flush=True)
    if latest is not None and latest >= cfg.train.steps:
        say(f"  already at step {latest} >= --steps {cfg.train.steps}: nothing to do", flush=True)
        return 0
    try:
        result = run(cfg, stage=stage, stop_after=stop_after)
    except NonFiniteError as e:
        say(f"neodragon train: {e}", file=sys.stderr)  # every process stops at the same step
        return 3
    loss = result.last_metrics.get("loss")
    if result.stopped_by:
        import signal

        say(f"stopped by {result.stopped_by} after step {result.end_step} of {cfg.train.steps}: checkpoint "
            f"{ckpt_dir / str(result.end_step)}; continue with the same command and --resume", flush=True)
        return 128 + int(getattr(signal, result.stopped_by))
    say(f"done: steps {result.start_step}..{result.end_step}"
          + (f", final loss {loss:.5g}" if loss is not None else "")
          + f"; checkpoint {ckpt_dir / str(result.end_step)}", flush=True)
    return 0


# ------------------------------------------------------------------------------------ plan --mesh
def resolve_plan_stage(name: str) -> str:
    """A ``--stage`` name -> the registered stage it plans."""
    if name not in PLAN_STAGES:
        raise CLIError(f"unknown --stage {name!r}; expected one of {sorted(PLAN_STAGES)}")
    return PLAN_STAGES[name]


def default_rules(shape: dict[str, int]) -> str:
    if shape["tensor"] > 1:
        return "fsdp_tp"
    return "fsdp" if shape["fsdp"] > 1 else "dp"


def plan_config(preset: str, overrides, mesh: str, stage: str, batch: int | None):
    """The config a ``plan --mesh`` compiles: preset + overrides + mesh + rules + stage + global batch.

    Rules default from the mesh (``tensor > 1``: fsdp_tp, ``fsdp > 1``: fsdp, else dp) unless
    ``--set mesh.rules=...`` is given. The default global batch is 4 examples per batch-sharding device
    (the stage ratios 1:2:1 need 4 per device for every stage column to be spread evenly).
    """
    from neodragon_jax.config import load_config, parse_override
    from neodragon_jax.sharding import mesh_devices_needed, parse_mesh_shape

    flat = [o for item in overrides for o in item.split()]
    if stage == "decoder" and not any(parse_override(o)[0] == "stages.decoder.vae" for o in flat):
        flat.append('stages.decoder.vae="random"')  # a plan reads no weights (the default is a tiny release)
    cfg = load_config(preset, flat)
    shape = parse_mesh_shape(mesh)
    n = mesh_devices_needed(shape)
    rules_set = any(parse_override(o)[0] == "mesh.rules" for o in flat)
    # The decoder stage's models are small (a frozen 110M encoder, a 10M decoder): pure data parallelism.
    # Under `fsdp` on a data x fsdp mesh XLA gathers the batch into the VAE's convs (no activation
    # constraints inside the VAE): 733 GiB of temporaries per device at 320x512x49 against 20 GiB.
    rules = cfg.mesh.rules if rules_set else "dp" if stage == "decoder" else default_rules(shape)
    batch_devices = n // shape["tensor"] if rules == "fsdp_tp" else n
    gb = batch if batch is not None else 4 * batch_devices
    if gb < 1:
        raise CLIError(f"--batch must be >= 1, got {gb}")
    return dataclasses.replace(
        cfg,
        mesh=dataclasses.replace(cfg.mesh, rules=rules, **shape),
        train=dataclasses.replace(cfg.train, stage=stage, global_batch=gb),
    ), shape


GIB = 2**30


def activation_estimate(cfg, shape: dict[str, int]) -> int | None:
    """Per-device bytes of the activations the backward keeps (the stage's ``activation_bytes``: largest
    layout, one micro-batch) divided over the devices that share the batch; None if the stage cannot say."""
    from train import stages as stages_lib

    stage = stages_lib.get_stage(cfg.train.stage, cfg)
    fn = getattr(stage, "activation_bytes", None)
    if fn is None:
        return None
    micro = cfg.train.global_batch // max(1, cfg.train.micro_batches)
    per_layout = fn(cfg, micro)
    n = shape["data"] * shape["fsdp"] * shape["tensor"]
    return int(max(per_layout.values()) / n)


def parse_depth_probe(text: str | None) -> tuple[int, int] | None:
    """``"2,4"`` -> (2, 4); None/empty -> None (compile the configured depth). The depths themselves are
    checked by :func:`train.plan.plan_by_depth`."""
    if not text:
        return None
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--depth-probe expects two block counts like 2,4, got {text!r}") from None
    return (a, b)


def fits(report, capacity_gib: float) -> bool:
    return report.total_bytes_per_device <= capacity_gib * GIB


def plan_compile_flags() -> None:
    """Plans need XLA's buffer assignment and cost analysis, which come before LLVM code generation: the
    lowest LLVM optimisation level gives the same figures in about half the compile time (measured on the
    tiny step: identical temp bytes and FLOPs, 22 s instead of 39 s). The plan subprocess inherits it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()


def plan_mesh(args) -> int:
    """``neodragon plan --mesh ...``: per-device memory and FLOPs of the full train step, no hardware."""
    from neodragon_jax.config import ConfigError
    from neodragon_jax.sharding import MeshError
    from train.plan import plan, plan_by_depth

    presets = args.config or list(FULL_SIZE_PRESETS)
    plan_compile_flags()
    out = []
    try:
        probe = parse_depth_probe(getattr(args, "depth_probe", None))
        stage = resolve_plan_stage(args.stage or "flow")
        for preset in presets:
            cfg, shape = plan_config(preset, args.overrides, args.mesh, stage, args.batch)
            if probe:
                report = plan_by_depth(None, cfg, shape, probe=probe, global_batch=cfg.train.global_batch)
            else:
                report = plan(None, cfg, shape, global_batch=cfg.train.global_batch)
            act = activation_estimate(cfg, shape)
            if args.json:
                out.append({"config": cfg.name, **json.loads(report.to_json()),
                            "total_bytes_per_device": report.total_bytes_per_device,
                            "activation_bytes_per_device": act})
                continue
            print(f"## {cfg.name}: train step of stage {stage!r}")
            print(report.table())
            if act is not None:
                print(f"  activations saved for backward (estimate, largest layout, per device): {act / GIB:.3f} GiB "
                      f"(part of temporaries)")
            print("  fits: " + ", ".join(f"{c} GiB {'yes' if fits(report, c) else 'NO'}" for c in (16, 95)))
            print()
    except CLIError as e:
        return _err("plan", str(e))
    except MeshError as e:
        return _err("plan", f"bad --mesh {args.mesh!r}: {e}")
    except (ConfigError, ValueError) as e:
        return _err("plan", str(e))
    except RuntimeError as e:
        return _err("plan", f"{e}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0
