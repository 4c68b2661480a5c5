"""Step metrics: console line, TensorBoard event files (tensorboardX), JSONL, MFU and a profiler window.

MFU = (per-device FLOPs of one step from XLA's ``cost_analysis`` of the *compiled*, SPMD-partitioned step)
/ step time / per-device peak FLOP/s. The peak is measured in the same run with a matmul microbenchmark on
one device (or given as ``train.peak_flops``), so MFU is relative to what this hardware actually reaches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the run stops, keeping the last good checkpoint."""


def measure_peak_flops(device=None, *, dtype=None, n: int | None = None, iters: int = 5) -> float:
    """Per-device matmul FLOP/s: best of ``iters`` timed ``[n, n] @ [n, n]`` products (after a warm-up)."""
    device = device or jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 only
    accel = device.platform in ("gpu", "tpu", "cuda", "rocm")
    dtype = dtype or (jnp.bfloat16 if accel else jnp.float32)
    n = n or (8192 if accel else 512)
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    reps = 8
    # Several chained products per call amortise dispatch overhead.
    f = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda i, x: (x @ b) * (1.0 / n), a))
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(iters):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 * reps / best


def compiled_flops(compiled) -> float:
    """Per-device FLOPs of a compiled (partitioned) computation; 0 if XLA does not report them."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def truncate_jsonl(path: Path, start_step: int) -> int:
    """Drop the records of ``path`` whose ``step`` is ``>= start_step`` (and any torn last line); returns how
    many were dropped. A run resumed from the checkpoint of step N replays the steps logged after N by the run
    that was interrupted: without this, ``metrics.jsonl`` would hold those steps twice."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            keep = int(rec["step"]) < start_step
        except (ValueError, KeyError, TypeError):
            keep = False  # a line torn by a kill
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Console + TensorBoard + ``metrics.jsonl``; only process 0 writes files.

    ``start_step``: the step this run starts from; records of later steps already in ``metrics.jsonl`` (written
    by an interrupted run after its last checkpoint, and about to be replayed) are removed first.
    """

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, enabled: bool | None = None,
                 start_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.output_dir = Path(output_dir)
        self.tb = None
        self.jsonl = None
        if self.enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if start_step is not None:
                dropped = truncate_jsonl(self.output_dir / "metrics.jsonl", start_step)
                if dropped:
                    log.info("metrics.jsonl: dropped %d record(s) from step %d on (replayed by this run)",
                             dropped, start_step)
            self.jsonl = open(self.output_dir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(logdir=str(self.output_dir / "tensorboard"), flush_secs=30)

    def write(self, step: int, metrics: Mapping[str, float], *, console: bool = True) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
        if console:
            print(format_line(step, metrics), flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


_ORDER = ("loss", "grad_norm", "lr", "step_time", "samples_per_s", "tokens_per_s", "mfu")


def format_line(step: int, metrics: Mapping[str, float]) -> str:
    keys = [k for k in _ORDER if k in metrics] + sorted(k for k in metrics if k not in _ORDER)
    parts = [f"step {step}"]
    for k in keys:
        v = float(metrics[k])
        if k == "mfu":
            parts.append(f"mfu {100 * v:.2f}%")
        elif k == "step_time":
            parts.append(f"step_time {v * 1e3:.1f}ms")
        elif k in ("samples_per_s", "tokens_per_s"):
            parts.append(f"{k} {v:,.1f}")
        else:
            parts.append(f"{k} {v:.5g}")
    return " | ".join(parts)


def check_finite(step: int, metrics: Mapping[str, float], last_good: int | None) -> None:
    bad = {k: v for k, v in metrics.items() if (k == "loss" or k.startswith(("loss/", "grad_norm"))) and not math.isfinite(v)}
    if bad:
        where = f"the last good checkpoint is step {last_good}" if last_good is not None else "no checkpoint was saved yet"
        raise NonFiniteError(
            f"non-finite values at step {step}: {bad}. Stopping without saving this state; {where}. "
            f"Lower optim.lr, enable optim.clip_norm, or check the batch at step {step} for NaN/Inf."
        )


class ProfileWindow:
    """``jax.profiler`` trace of steps ``[start, start + num_steps)`` into ``log_dir`` (``start < 0``: off)."""

    def __init__(self, log_dir: str | Path, start: int, num_steps: int):
        self.log_dir, self.start, self.stop = str(log_dir), start, start + max(1, num_steps)
        self.active = False

    def before_step(self, step: int) -> None:
        if self.start >= 0 and step == self.start and not self.active:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after_step(self, step: int, sync: Any = None) -> None:
        if self.active and step + 1 >= self.stop:
            if sync is not None:
                jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d..%d written to %s", self.start, self.stop - 1, self.log_dir)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
