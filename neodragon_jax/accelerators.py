"""Accelerator chips (HBM, peak bf16 FLOP/s, HBM bandwidth) and TPU topologies for ahead-of-time plans.

With libtpu installed (the ``tpu`` extra), JAX compiles for a TPU topology on a CPU-only host:
``jax.experimental.topologies.get_topology_desc("v5e:4x4", "tpu")`` returns compile-only devices whose
programs the TPU compiler sizes (``memory_analysis``) and costs (``cost_analysis``, ``optimal_seconds``)
exactly as on the pod. :func:`topology_devices` wraps that with one-line errors; :func:`fit_verdict` says which
chips a per-chip footprint fits.

Chip figures are the vendors' published per-chip numbers (``source`` of each entry); ``hbm_bytes`` is the
published capacity (GiB where the vendor says GB for HBM, as Google's pages use both for the same parts).
The runtime reserves some of it (a few hundred MiB on TPU), so a plan within ~2% of the capacity is marginal.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "tpu" / "gpu"
    hbm_bytes: int
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes_per_s: float
    source: str
    #: valid topology shapes (TPU), for error messages
    topologies: tuple[str, ...] = ()


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32 * GIB, 275e12, 1228e9, "https://cloud.google.com/tpu/docs/v4",
               ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16")),
    "v5e": Chip("v5e", "tpu", 16 * GIB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e",
                ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "v5p": Chip("v5p", "tpu", 95 * GIB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p",
                ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16")),
    "v6e": Chip("v6e", "tpu", 32 * GIB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e",
                ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "h100": Chip("h100", "gpu", 80 * GIB, 989e12, 3.35e12,
                 "https://www.nvidia.com/en-us/data-center/h100/ (SXM, dense bf16)"),
    "h200": Chip("h200", "gpu", 141 * 10**9, 989e12, 4.8e12,
                 "https://www.nvidia.com/en-us/data-center/h200/ (SXM, dense bf16)"),
}

TPU_CHIPS = tuple(k for k, c in CHIPS.items() if c.platform == "tpu")


class TopologyError(ValueError):
    """A topology or mesh the plan cannot use; the message is one line listing the valid choices."""


def valid_topologies() -> str:
    return "; ".join(f"{n}:{'|'.join(CHIPS[n].topologies)}" for n in TPU_CHIPS)


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """``"v5e:4x4"`` -> (the v5e chip, (4, 4)). Raises :class:`TopologyError` naming the valid choices."""
    m = re.fullmatch(r"\s*([a-zA-Z0-9]+):(\d+(?:x\d+){1,2})\s*", name or "")
    if not m or m.group(1).lower() not in TPU_CHIPS:
        raise TopologyError(f"unknown TPU topology {name!r}; expected GENERATION:SHAPE, one of {valid_topologies()}")
    chip = CHIPS[m.group(1).lower()]
    shape = tuple(int(x) for x in m.group(2).split("x"))
    return chip, shape


def topology_chips(name: str) -> int:
    return math.prod(parse_topology(name)[1])


def libtpu_available() -> bool:
    """Whether the TPU compiler (libtpu) can be loaded: the ``tpu`` extra, or ``TPU_LIBRARY_PATH``."""
    import os

    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


LIBTPU_HINT = ('needs the TPU compiler: pip install -c constraints.txt -e ".[tpu]" (libtpu, about 210 MB; '
               "it compiles on a CPU-only host)")


def topology_devices(name: str) -> tuple[Chip, list]:
    """Compile-only devices of a TPU topology (``v5e:4x4``), with one-line errors for a bad name or no libtpu."""
    chip, _ = parse_topology(name)
    if not libtpu_available():
        raise TopologyError(f"--topology {name} {LIBTPU_HINT}")
    from jax.experimental import topologies

    # Compile-only devices open no chip, but libtpu still takes /tmp/libtpu_lockfile, which any other JAX
    # process on the host holds once it has probed the TPU backend (every JAX process does when libtpu is
    # installed): without this a plan fails while a training run or a test is alive beside it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topo = topologies.get_topology_desc(name.strip().lower(), "tpu")
    except Exception as e:  # libtpu: "Topology layout ... is not divisible ...", "Invalid TPU external name"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"TPU topology {name!r} rejected by libtpu ({first}); valid: {valid_topologies()}") from None
    return chip, list(topo.devices)


def check_mesh_fits_topology(mesh_shape: dict[str, int], topology: str, chips: int) -> None:
    n = math.prod(mesh_shape.values())
    if n != chips:
        mesh = ",".join(f"{k}={v}" for k, v in mesh_shape.items())
        raise TopologyError(
            f"mesh {mesh} has {n} devices but topology {topology} has {chips} chips; pick axes that multiply to "
            f"{chips} (e.g. data=1,fsdp={chips} or data={max(1, chips // 8)},fsdp={min(8, chips)})"
        )


def fit_verdict(total_bytes: int, chips: dict[str, Chip] | None = None) -> dict[str, bool]:
    """``{chip name: fits}``: whether a per-chip footprint of ``total_bytes`` is within each chip's HBM."""
    chips = CHIPS if chips is None else chips
    return {name: total_bytes <= c.hbm_bytes for name, c in chips.items()}


def fits_line(total_bytes: int, compiled_for: str | None = None) -> str:
    """``fits: v5e 16 GiB NO, v4 32 GiB yes, ...`` (the compiled-for chip first, then by capacity)."""
    v = fit_verdict(total_bytes)
    order = sorted(CHIPS, key=lambda n: (n != compiled_for, CHIPS[n].hbm_bytes, n))
    return "fits: " + ", ".join(f"{n} {CHIPS[n].hbm_bytes / GIB:.0f} GiB {'yes' if v[n] else 'NO'}" for n in order)
