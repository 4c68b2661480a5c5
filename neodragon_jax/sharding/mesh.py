"""Device mesh ``data x fsdp x tensor`` from :class:`~neodragon_jax.config.train_schema.MeshConfig`.

Multi-host: :func:`initialize_distributed` must run before anything asks JAX about devices, so
:func:`make_mesh` calls it first. Multi-slice (``dcn_* > 1``) uses ``create_hybrid_device_mesh`` so that the
axes that cross slices are laid out over DCN and the rest over ICI.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from neodragon_jax.config.train_schema import MESH_AXES, MeshConfig

log = logging.getLogger(__name__)

_DISTRIBUTED_DONE = False


class MeshError(ValueError):
    """The requested mesh does not fit the axes we know or the devices we have."""


#: The process setup ``neodragon launch`` gives each process it starts. They take precedence over
#: ``mesh.distributed``: the same ``train`` command then runs unchanged under the local launcher.
LAUNCH_ENV = {
    "coordinator_address": "NEODRAGON_COORDINATOR_ADDRESS",
    "num_processes": "NEODRAGON_NUM_PROCESSES",
    "process_id": "NEODRAGON_PROCESS_ID",
}
#: A process that stops sending heartbeats is declared dead after this many seconds, and every other
#: process then aborts instead of waiting in a collective for it forever (JAX's default is 100 s).
HEARTBEAT_ENV = "NEODRAGON_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 45


def launch_environment(environ: Mapping[str, str] | None = None) -> dict | None:
    """``{coordinator_address, num_processes, process_id}`` from the ``NEODRAGON_*`` launch variables, or
    None when none is set; :class:`MeshError` when they are incomplete or not numbers."""
    environ = os.environ if environ is None else environ
    raw = {k: environ.get(v) for k, v in LAUNCH_ENV.items()}
    if all(v is None for v in raw.values()):
        return None
    missing = [LAUNCH_ENV[k] for k, v in raw.items() if not v]
    if missing:
        raise MeshError(f"the launch environment sets {', '.join(v for k, v in LAUNCH_ENV.items() if raw[k])} but "
                        f"not {', '.join(missing)}; set all three (`neodragon launch` does) or none")
    try:
        count, rank = int(raw["num_processes"]), int(raw["process_id"])
    except ValueError:
        raise MeshError(f"{LAUNCH_ENV['num_processes']}={raw['num_processes']!r} and "
                        f"{LAUNCH_ENV['process_id']}={raw['process_id']!r} must be integers") from None
    if not 0 <= rank < count:
        raise MeshError(f"{LAUNCH_ENV['process_id']}={rank} must be in [0, {LAUNCH_ENV['num_processes']}={count})")
    return {"coordinator_address": raw["coordinator_address"], "num_processes": count, "process_id": rank}


def _heartbeat_timeout() -> int:
    raw = os.environ.get(HEARTBEAT_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_HEARTBEAT_TIMEOUT_S
    except ValueError:
        raise MeshError(f"{HEARTBEAT_ENV}={raw!r} must be a whole number of seconds") from None
    if value < 1:
        raise MeshError(f"{HEARTBEAT_ENV}={value} must be >= 1 second")
    return value


def initialize_distributed(cfg: MeshConfig) -> None:
    """``jax.distributed.initialize`` once: from the ``neodragon launch`` environment, from config
    (``'on'``) or from the cluster environment (``'auto'``)."""
    global _DISTRIBUTED_DONE
    launch = launch_environment()
    if _DISTRIBUTED_DONE or (launch is None and cfg.distributed == "off"):
        return
    if launch is None and cfg.distributed == "on":
        if not cfg.coordinator_address:
            raise MeshError(
                "mesh.distributed='on' needs mesh.coordinator_address=host:port (plus mesh.num_processes and "
                "mesh.process_id); use mesh.distributed='auto' on TPU/SLURM to read them from the environment"
            )
        launch = {"coordinator_address": cfg.coordinator_address, "num_processes": cfg.num_processes,
                  "process_id": cfg.process_id}
    if (jax.config.jax_platforms or "") == "cpu" and not jax.config.jax_cpu_collectives_implementation:
        # Without a collectives implementation a multi-process CPU program fails at its first cross-process op.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = _heartbeat_timeout()
    jax.distributed.initialize(**(launch or {}), heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout)
    _DISTRIBUTED_DONE = True
    log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())


def parse_mesh_shape(spec: str | Mapping[str, int] | MeshConfig) -> dict[str, int]:
    """``"data=2,fsdp=4"`` / ``{"fsdp": 4}`` / a MeshConfig -> ``{data, fsdp, tensor}`` (unset axes = 1).

    Raises :class:`MeshError` naming an unknown axis.
    """
    if isinstance(spec, MeshConfig):
        return spec.shape()
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.replace(" ", ",").split(","))):
            if "=" not in part:
                raise MeshError(f"mesh shape item {part!r} must look like axis=size, e.g. 'data=2,fsdp=4'")
            k, v = part.split("=", 1)
            k = k.strip().removeprefix("mesh.")
            try:
                items[k] = int(v)
            except ValueError:
                raise MeshError(f"mesh axis {k!r}: size {v!r} is not an integer") from None
        spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axis {', '.join(map(repr, unknown))}; the mesh axes are {list(MESH_AXES)}")
    return {a: int(spec.get(a, 1)) for a in MESH_AXES}


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the one ``-1`` axis and check that the product equals ``num_devices``."""
    shape = parse_mesh_shape(dict(shape))
    bad = {a: s for a, s in shape.items() if s == 0 or s < -1}
    if bad:
        raise MeshError(f"mesh axis sizes must be positive or -1 (take the rest); got {bad}")
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {free}")
    fixed = int(np.prod([s for s in shape.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"mesh {shape}: the fixed axes multiply to {fixed}, which does not divide the {num_devices} "
                f"devices available, so {free[0]!r}=-1 cannot take the rest"
            )
        shape[free[0]] = num_devices // fixed
    total = int(np.prod(list(shape.values())))
    if total != num_devices:
        desc = " x ".join(f"{a}={s}" for a, s in shape.items())
        raise MeshError(
            f"mesh {desc} needs {total} devices but {num_devices} are available; change the sizes "
            f"(e.g. mesh.fsdp=-1 to take the rest) so their product is {num_devices}"
        )
    return shape


def _devices_array(shape: dict[str, int], dcn: dict[str, int], devices: Sequence) -> np.ndarray:
    from jax.experimental import mesh_utils

    sizes = [shape[a] for a in MESH_AXES]
    dcn_sizes = [dcn[a] for a in MESH_AXES]
    if any(d < 1 for d in dcn_sizes):
        raise MeshError(f"mesh.dcn_* must be >= 1, got {dcn}")
    if int(np.prod(dcn_sizes)) > 1:
        for a, s, d in zip(MESH_AXES, sizes, dcn_sizes):
            if s % d:
                raise MeshError(f"mesh axis {a!r}={s} is not divisible by its DCN part mesh.dcn_{a}={d}")
        ici = [s // d for s, d in zip(sizes, dcn_sizes)]
        return mesh_utils.create_hybrid_device_mesh(ici, dcn_sizes, devices=devices)
    try:
        return mesh_utils.create_device_mesh(sizes, devices=devices)
    except (NotImplementedError, AssertionError, ValueError):
        # Physical-topology-aware layout is TPU-only for some shapes; a plain reshape is correct elsewhere.
        return np.asarray(devices).reshape(sizes)


def make_mesh(cfg: MeshConfig | Mapping[str, int] | str, devices: Sequence | None = None) -> Mesh:
    """Build the ``('data', 'fsdp', 'tensor')`` mesh (``Auto`` axes: XLA propagates shardings)."""
    mesh_cfg = cfg if isinstance(cfg, MeshConfig) else None
    if mesh_cfg is not None:
        initialize_distributed(mesh_cfg)
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(parse_mesh_shape(cfg), len(devices))
    dcn = mesh_cfg.dcn_shape() if mesh_cfg is not None else {a: 1 for a in MESH_AXES}
    arr = _devices_array(shape, dcn, devices)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def make_abstract_mesh(shape: Mapping[str, int] | str | MeshConfig, num_devices: int | None = None) -> AbstractMesh:
    """An :class:`AbstractMesh` (no devices) for shape-only planning; ``-1`` needs ``num_devices``."""
    shape = parse_mesh_shape(shape)
    if any(s == -1 for s in shape.values()):
        if num_devices is None:
            raise MeshError(f"mesh {shape} has a -1 axis; give num_devices to resolve it")
        shape = resolve_mesh_shape(shape, num_devices)
    elif num_devices is not None:
        shape = resolve_mesh_shape(shape, num_devices)
    return AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_devices_needed(shape: Mapping[str, int] | str | MeshConfig) -> int:
    shape = parse_mesh_shape(shape)
    if any(s == -1 for s in shape.values()):
        raise MeshError(f"mesh {shape}: give every axis a size (no -1) to know how many devices it needs")
    return int(np.prod(list(shape.values())))
