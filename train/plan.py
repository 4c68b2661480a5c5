"""Ahead-of-time plan of a train step for a mesh, without the hardware: per-device memory and FLOPs.

``plan(stage, cfg, "data=2,fsdp=32")`` builds the train state abstractly (``nnx.eval_shape``; nothing is
allocated, so a 2B-parameter MMDiT is fine), derives the shardings from the logical axes and
``cfg.mesh.rules``, lowers the jitted step on ``ShapeDtypeStruct`` arguments carrying those shardings and
compiles it. Compilation needs concrete devices: ``jax.sharding.AbstractMesh`` lowers (and gives global
FLOPs) but ``compile()`` then demands a device assignment. So when this process has fewer devices than
the mesh, the plan runs in a subprocess with that many simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and the report comes back as JSON.

Depth probe (``plan_by_depth``): compiling a full-size step on a CPU takes tens of minutes (25 min for the
18-block Neodragon step at fsdp=8) and grows faster than linearly with the number of MMDiT blocks. Blocks
are identical in shape and sharding, so every figure of the report is an affine function of the block count
(parameters, optimizer and frozen bytes exactly; FLOPs exactly up to XLA's fusion choices; temporaries up to
buffer-assignment packing). ``plan_by_depth`` compiles the same step at two small depths and extrapolates
each field to the configured depth; the report says so (``depth_probe``). Validation figures are in the
README ("Planning a run").

Figures: parameter / optimizer / frozen / batch bytes per device are exact (from the shardings); temp
(activations + workspace) and argument/output sizes come from ``compiled.memory_analysis()``, and FLOPs per
device from ``compiled.cost_analysis()`` of the partitioned module; on simulated CPU devices these are the
CPU backend's figures (fusion and layout differ from TPU/GPU, so treat temp bytes as an estimate).

TPU topologies (``plan(..., topology="v5e:4x4")``): with libtpu installed the step is compiled in this process
by the TPU compiler for the topology's compile-only devices (``neodragon_jax.accelerators``), attention traced
for TPU (``auto`` = Pallas splash). Memory figures are then the TPU compiler's own buffer assignment (plus
the executable's code, which lives in HBM), and the cost analysis adds ``optimal_seconds``, the compiler's
estimate of the step time, from which the report derives an MFU against the chip's published peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import jax

from neodragon_jax.config import Config, from_json, load_config, to_json
from neodragon_jax.sharding import make_mesh, mesh_devices_needed, parse_mesh_shape, sharding_report
from train import stages as stages_lib
from train.metrics import compiled_flops


@dataclasses.dataclass
class PlanReport:
    stage: str
    mesh: dict[str, int]
    rules: str
    platform: str
    global_batch: int
    micro_batches: int
    num_params: dict[str, int]
    num_frozen_params: dict[str, int]
    param_bytes_per_device: int
    optimizer_bytes_per_device: int  # optimizer moments + EMA
    frozen_bytes_per_device: int
    batch_bytes_per_device: int
    temp_bytes_per_device: int  # activations + XLA workspace (compiled.memory_analysis)
    argument_bytes_per_device: int
    output_bytes_per_device: int
    alias_bytes_per_device: int
    flops_per_device: float
    flops_per_step: float  # all devices
    compile_seconds: float
    #: (a, b) when every figure was extrapolated from compiles at a and b MMDiT blocks, else None.
    depth_probe: tuple[int, int] | None = None
    num_layers: int | None = None
    #: a pruned student's block count when the stage has one (then ``num_layers`` is the teacher's)
    student_layers: int | None = None
    #: TPU plans: the topology (``v5e:4x4``) and chip (``v5e``) compiled for; None on simulated CPU devices.
    topology: str | None = None
    chip: str | None = None
    #: the attention implementation and remat policy the MMDiT was traced with (None: no MMDiT)
    attention: str | None = None
    remat: str | None = None
    #: the executable's code (in HBM on TPU; 0 when not counted)
    generated_code_bytes_per_device: int = 0
    bytes_accessed_per_device: float = 0.0
    #: the TPU compiler's estimate of the step time (``cost_analysis()["optimal_seconds"]``), None elsewhere
    est_step_seconds: float | None = None

    @property
    def total_bytes_per_device(self) -> int:
        """Resident state + frozen + batch + temporaries (donated outputs alias their inputs) + code (TPU)."""
        return (
            self.param_bytes_per_device + self.optimizer_bytes_per_device + self.frozen_bytes_per_device
            + self.batch_bytes_per_device + self.temp_bytes_per_device + self.generated_code_bytes_per_device
        )

    @property
    def peak_flops_per_device(self) -> float | None:
        from neodragon_jax.accelerators import CHIPS

        return CHIPS[self.chip].peak_bf16_flops if self.chip in CHIPS else None

    @property
    def est_mfu(self) -> float | None:
        """Compiled FLOPs per device / (estimated step time x the chip's peak bf16 FLOP/s); None without both."""
        peak = self.peak_flops_per_device
        if not peak or not self.est_step_seconds:
            return None
        return self.flops_per_device / (self.est_step_seconds * peak)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PlanReport":
        d = json.loads(text)
        if d.get("depth_probe") is not None:
            d["depth_probe"] = tuple(d["depth_probe"])
        return cls(**d)

    def table(self) -> str:
        def gib(b: int) -> str:
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if b >= scale:
                    return f"{b / scale:9.3f} {unit}"
            return f"{b:9d} B"

        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        target = f"TPU {self.chip} topology {self.topology} (TPU compiler)" if self.topology else self.platform
        lines = [
            f"plan: stage {self.stage!r}, mesh {mesh}, rules {self.rules!r}, compiled for {target}",
        ]
        if self.attention or self.remat:
            lines.append(f"  MMDiT attention {self.attention}, remat {self.remat}")
        if self.depth_probe:
            a, b = self.depth_probe
            if self.student_layers:
                lines.append(f"  {self.num_layers}-block teacher, {self.student_layers}-block student, extrapolated "
                             f"from compiles at {a}/{a}, {b}/{b} and {b}/{b - 1} teacher/student blocks")
            else:
                lines.append(f"  {self.num_layers} MMDiT blocks, extrapolated from compiles at {a} and {b} blocks")
        lines += [
            f"  global batch {self.global_batch} in {self.micro_batches} micro-batch(es)",
            f"  trained params: {', '.join(f'{k} {v:,}' for k, v in self.num_params.items())}",
        ]
        if self.num_frozen_params:
            lines.append(f"  frozen params:  {', '.join(f'{k} {v:,}' for k, v in self.num_frozen_params.items())}")
        lines += [
            f"  per device: params      {gib(self.param_bytes_per_device)}",
            f"              optimizer   {gib(self.optimizer_bytes_per_device)}",
            f"              frozen      {gib(self.frozen_bytes_per_device)}",
            f"              batch       {gib(self.batch_bytes_per_device)}",
            f"              temporaries {gib(self.temp_bytes_per_device)}",
        ]
        if self.generated_code_bytes_per_device:
            lines.append(f"              code        {gib(self.generated_code_bytes_per_device)}")
        lines += [
            f"              total       {gib(self.total_bytes_per_device)}",
            f"  FLOPs per step: {self.flops_per_device:.4g} per device, {self.flops_per_step:.4g} total",
        ]
        if self.est_step_seconds:
            mfu = self.est_mfu
            lines.append(f"  estimated step time (TPU compiler): {self.est_step_seconds * 1e3:.1f} ms"
                         + (f", MFU {100 * mfu:.1f}% of {self.peak_flops_per_device / 1e12:.0f} TFLOP/s bf16 peak"
                            if mfu is not None else ""))
        lines.append(f"  compile time {self.compile_seconds:.1f}s")
        return "\n".join(lines)


def _device_bytes(tree: Any) -> int:
    leaves = jax.tree.leaves(tree)
    return sharding_report(tree).device_bytes if leaves else 0


#: Custom calls XLA:TPU inserts that its cost model scores as -1 s each (seen with libtpu 0.0.42.1: ``ZeroCrop``
#: around unevenly sharded slices, ``ConcatBitcast`` for concatenations); they are layout glue.
UNCOSTED_CUSTOM_CALLS = ("ZeroCrop", "ConcatBitcast")


def _tpu_step_seconds(compiled, cost: dict) -> float | None:
    """``optimal_seconds`` of the TPU cost model, or None. Each op the model cannot cost counts -1 s; the
    custom calls of :data:`UNCOSTED_CUSTOM_CALLS` are added back, anything still negative is unknown."""
    opt = cost.get("optimal_seconds")
    if opt is None:
        return None
    opt = float(opt)
    if opt < 0:
        try:
            text = compiled.as_text()
        except Exception:
            return None
        opt += sum(text.count(f'custom_call_target="{name}"') for name in UNCOSTED_CUSTOM_CALLS)
    return opt if opt > 0 else None


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def plan_in_process(stage, cfg: Config, mesh_shape: Mapping[str, int] | str | None = None, *,
                    global_batch: int | None = None, devices=None, topology: str | None = None,
                    chip: str | None = None) -> PlanReport:
    """Plan on this process's devices (needs at least as many as the mesh has), or on ``devices`` (the
    compile-only devices of a TPU ``topology``, see :func:`plan`)."""
    from neodragon_jax.layers.attention import attention_platform, resolve_attention
    from neodragon_jax.layers.core import as_dtype
    from neodragon_jax.models.mmdit import PyramidMMDiT
    from train.state import build_setup
    from train.step import batch_sharding_tree, compile_step

    pool = list(jax.devices() if devices is None else devices)
    platform = pool[0].platform
    shape = parse_mesh_shape(mesh_shape if mesh_shape is not None else cfg.mesh)
    if any(v == -1 for v in shape.values()):
        n = len(pool)
    else:
        n = mesh_devices_needed(shape)
    if n > len(pool):
        raise RuntimeError(f"mesh {shape} needs {n} devices, this process has {len(pool)}; use plan()")
    mesh = make_mesh(shape, devices=pool[:n])
    gb = global_batch or cfg.train.global_batch
    with attention_platform(platform):
        setup = build_setup(stage, cfg, mesh)
        example, batch_sh = batch_sharding_tree(setup, gb)
        abstract_batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), example,
                                      batch_sh)
        t = time.perf_counter()
        lowered, compiled = compile_step(setup, gb)
        seconds = time.perf_counter() - t
    mem = compiled.memory_analysis()
    flops_dev = compiled_flops(compiled)
    cost = _cost(compiled)
    a = setup.abstract_state
    m = cfg.model.mmdit
    uses_mmdit = any(getattr(spec.graphdef.nodes[0], "type", None) is PyramidMMDiT
                     for spec in list(setup.trainable.values()) + list(setup.frozen.values()))
    tpu = platform == "tpu"
    return PlanReport(
        stage=stage.name,
        mesh=dict(mesh.shape),
        rules=setup.rules.name,
        platform=platform,
        global_batch=gb,
        micro_batches=cfg.train.micro_batches,
        num_params={n: s.num_params for n, s in setup.trainable.items()},
        num_frozen_params={n: s.num_params for n, s in setup.frozen.items()},
        param_bytes_per_device=_device_bytes(a["params"]),
        optimizer_bytes_per_device=_device_bytes(a["opt_state"]) + _device_bytes(a["ema"]),
        frozen_bytes_per_device=_device_bytes(setup.abstract_frozen),
        batch_bytes_per_device=_device_bytes(abstract_batch),
        temp_bytes_per_device=int(getattr(mem, "temp_size_in_bytes", 0) or 0),
        argument_bytes_per_device=int(getattr(mem, "argument_size_in_bytes", 0) or 0),
        output_bytes_per_device=int(getattr(mem, "output_size_in_bytes", 0) or 0),
        alias_bytes_per_device=int(getattr(mem, "alias_size_in_bytes", 0) or 0),
        flops_per_device=flops_dev,
        flops_per_step=flops_dev * mesh.size,
        compile_seconds=seconds,
        num_layers=cfg.model.mmdit.num_layers,
        topology=topology,
        chip=chip,
        attention=resolve_attention(m.attention, platform=platform, dtype=as_dtype(cfg.precision.dtype))
        if uses_mmdit else None,
        remat=m.remat if uses_mmdit else None,
        generated_code_bytes_per_device=int(getattr(mem, "generated_code_size_in_bytes", 0) or 0) if tpu else 0,
        bytes_accessed_per_device=float(cost.get("bytes accessed", 0.0) or 0.0),
        est_step_seconds=_tpu_step_seconds(compiled, cost) if tpu else None,
    )


def plan(stage, cfg: Config, mesh_shape: Mapping[str, int] | str | None = None, *,
         global_batch: int | None = None, timeout: float | None = None, topology: str | None = None) -> PlanReport:
    """Per-device memory and FLOPs of ``stage``'s train step on ``mesh_shape`` (default ``cfg.mesh``).

    Runs in this process when it has enough devices, else in a subprocess on simulated CPU devices; the
    subprocess rebuilds the stage from ``cfg.train.stage`` (pass ``stage=None`` or a registered stage).
    ``topology`` (``"v5e:4x4"``): compile with the TPU compiler for that topology instead (in this process;
    needs libtpu; the mesh must have as many devices as the topology has chips).
    """
    shape = parse_mesh_shape(mesh_shape if mesh_shape is not None else cfg.mesh)
    needed = mesh_devices_needed(shape)
    if stage is None:
        stage = stages_lib.get_stage(cfg.train.stage, cfg)
    if topology is not None:
        from neodragon_jax.accelerators import check_mesh_fits_topology, topology_devices

        chip, devices = topology_devices(topology)
        check_mesh_fits_topology(shape, topology, len(devices))
        return plan_in_process(stage, cfg, shape, global_batch=global_batch, devices=devices, topology=topology,
                               chip=chip.name)
    if needed <= jax.device_count():
        return plan_in_process(stage, cfg, shape, global_batch=global_batch)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage=cfg.train.stage or stage.name))
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "plan.json"
        cfg_path.write_text(to_json(cfg))
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={needed}"])
        env["JAX_PLATFORMS"] = "cpu"
        mesh_arg = ",".join(f"{k}={v}" for k, v in shape.items())
        cmd = [sys.executable, "-m", "train.plan", "--config-json", str(cfg_path), "--mesh", mesh_arg,
               "--json-out", str(out_path)]
        if global_batch:
            cmd += ["--global-batch", str(global_batch)]
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"plan subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return PlanReport.from_json(out_path.read_text())


def pruned_student(cfg: Config) -> tuple[str, tuple[int, ...]] | None:
    """``(setting name, kept teacher blocks)`` when the planned stage trains a pruned student beside a deeper
    teacher config (its settings class names the field in ``STUDENT_BLOCKS``) and that field is set."""
    name = cfg.train.stage
    if not name:
        return None
    settings = stages_lib.stage_settings(cfg, name)
    field = getattr(type(settings), "STUDENT_BLOCKS", None)
    kept = tuple(getattr(settings, field, ()) or ()) if field else ()
    return (field, kept) if kept else None


def spread_blocks(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """``student_layers`` teacher positions spread evenly over ``teacher_layers``, the last always kept."""
    import numpy as np

    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student of {student_layers} blocks cannot be cut from {teacher_layers}")
    if student_layers == 1:
        return (teacher_layers - 1,)
    return tuple(int(k) for k in np.linspace(0, teacher_layers - 1, student_layers).round())


def with_mmdit_depth(cfg: Config, num_layers: int, student_layers: int | None = None) -> Config:
    """``cfg`` with ``num_layers`` MMDiT blocks (a pruned block list is cut to its first ``num_layers``) and,
    for a stage with a pruned student (:func:`pruned_student`), a student of ``student_layers`` blocks
    spread over them. Blocks are identical in shape, so which ones are kept does not change a plan."""
    m = cfg.model.mmdit
    kept = tuple(m.teacher_block_indices)[:num_layers]
    m = dataclasses.replace(m, num_layers=num_layers, teacher_block_indices=kept)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mmdit=m))
    pruned = pruned_student(cfg)
    if pruned and student_layers is not None:
        field, _ = pruned
        name = cfg.train.stage
        settings = dataclasses.replace(stages_lib.stage_settings(cfg, name),
                                       **{field: spread_blocks(num_layers, student_layers)})
        cfg = dataclasses.replace(cfg, stages=cfg.stages.with_settings(name, settings))
    return cfg


def combine_reports(reports: list[PlanReport], points: list[tuple[int, ...]], target: tuple[int, ...],
                    num_layers: int, depth_probe: tuple[int, int], student_layers: int | None = None) -> PlanReport:
    """The report at ``target`` block counts from reports compiled at ``points``: every figure is taken affine
    in the block counts (one count: the MMDiT's depth; two: a teacher's and a pruned student's), so the
    target figure is the affine combination of the compiled ones whose weights reproduce ``target``."""
    import numpy as np

    basis = np.array([[1.0, *p] for p in points]).T  # rows: 1, counts...
    if basis.shape[0] != basis.shape[1] or abs(np.linalg.det(basis)) < 1e-9:
        raise ValueError(f"depth probe points {points} do not determine an affine function of {len(target)} "
                         f"block count(s)")
    weights = np.linalg.solve(basis, np.array([1.0, *target]))

    def lin(values):
        v = float(sum(w * x for w, x in zip(weights, values)))
        return int(round(v)) if isinstance(values[0], int) else v

    out = {}
    for f in dataclasses.fields(PlanReport):
        values = [getattr(r, f.name) for r in reports]
        if f.name in ("num_params", "num_frozen_params"):
            out[f.name] = {k: lin([v[k] for v in values]) for k in values[0]}
        elif f.name == "compile_seconds":
            out[f.name] = float(sum(values))
        elif f.name == "generated_code_bytes_per_device":
            # Code is not always affine in depth: the TPU compiler may outline repeated blocks, so a deeper probe
            # can compile to less code and the line would run negative. Never below the largest compiled size.
            out[f.name] = max(lin(values), max(values))
        elif f.name.endswith("_per_device") or f.name == "flops_per_step":
            out[f.name] = lin(values)
        elif f.name == "est_step_seconds":
            out[f.name] = None if any(v is None for v in values) else lin(values)
        else:
            out[f.name] = values[-1]
    out.update(depth_probe=depth_probe, num_layers=num_layers, student_layers=student_layers)
    return PlanReport(**out)


def extrapolate_depth(lo: PlanReport, hi: PlanReport, num_layers: int) -> PlanReport:
    """The report at ``num_layers`` blocks from reports at two depths: each figure affine in the depth."""
    a, b = lo.num_layers, hi.num_layers
    if a is None or b is None or a == b:
        raise ValueError(f"extrapolating needs reports at two different depths, got {a} and {b}")
    return combine_reports([lo, hi], [(a,), (b,)], (num_layers,), num_layers, (a, b))


def plan_by_depth(stage, cfg: Config, mesh_shape: Mapping[str, int] | str | None = None, *,
                  probe: tuple[int, int] = (2, 4), global_batch: int | None = None,
                  timeout: float | None = None, topology: str | None = None) -> PlanReport:
    """:func:`plan` at ``cfg``'s MMDiT depth, extrapolated from compiles at the two depths of ``probe``
    (each must be smaller than the configured depth, and at least 2 so the teacher's special last block is
    in both). Falls back to the exact compile when the configured depth is not larger than the probe.

    A stage that trains a pruned student beside the full-depth teacher config (``recover-distill``: a
    24-block teacher and an 18-block student) has two block counts; it is compiled at three points,
    (a, a), (b, b) and (b, b - 1) teacher/student blocks, and each figure is extrapolated affine in both."""
    a, b = sorted(probe)
    depth = cfg.model.mmdit.num_layers
    if a < 2 or a == b:
        raise ValueError(f"depth probe needs two different depths >= 2, got {probe}")
    kw = dict(global_batch=global_batch, timeout=timeout, topology=topology)
    if depth <= b:
        return plan(stage, cfg, mesh_shape, **kw)
    pruned = pruned_student(cfg)
    if pruned:
        student = len(pruned[1])
        points = [(a, a), (b, b), (b, b - 1)]
        reports = [plan(stage, with_mmdit_depth(cfg, t, s), mesh_shape, **kw) for t, s in points]
        return combine_reports(reports, points, (depth, student), depth, (a, b), student_layers=student)
    lo = plan(stage, with_mmdit_depth(cfg, a), mesh_shape, **kw)
    hi = plan(stage, with_mmdit_depth(cfg, b), mesh_shape, **kw)
    return extrapolate_depth(lo, hi, depth)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plan", description="AOT-compile a train step for a mesh")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--config-json", default=None, help="resolved config JSON (overrides --preset/--set)")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4,tensor=1 (default: the config's mesh)")
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.config_json:
        cfg = from_json(Path(args.config_json).read_text())
    else:
        cfg = load_config(args.preset, [o for item in args.overrides for o in item.split()])
    report = plan(None, cfg, args.mesh, global_batch=args.global_batch)
    if args.json_out:
        Path(args.json_out).write_text(report.to_json())
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
