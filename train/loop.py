"""The one training loop for every stage: data -> step -> metrics / checkpoint / profile.

``python -m train.loop --preset tiny --set train.stage=toy --set train.steps=100`` (the ``neodragon train``
verb calls :func:`run`). A run resumes from the latest complete checkpoint in its checkpoint folder when
``checkpoint.resume`` is true, on whatever mesh the current config asks for.

Host/device overlap: metrics of step ``s`` are read back after step ``s + 1`` has been dispatched, so the
host never idles the device; before a checkpoint every outstanding step is checked for non-finite values,
so a checkpoint never holds a state produced by a NaN step.

Preemption: SIGTERM (what a cluster sends before it takes the machines back) or SIGINT (Ctrl-C) asks the run to
stop. The loop finishes the step in flight, writes a checkpoint and returns with ``RunResult.stopped_by`` set,
so ``--resume`` continues exactly; a second signal of the same kind ends the process at once. In a multi-process
run every process must stop at the same step (a save is collective): the processes agree every
``train.log_every`` steps, and one signalled process is enough.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax

from neodragon_jax.config import Config, load_config, to_json
from neodragon_jax.sharding import activate, make_mesh
from train import stages as stages_lib
from train.checkpoint import Checkpointer
from train.data import DataIterator, make_source, to_global
from train.metrics import MetricsWriter, ProfileWindow, check_finite, compiled_flops, measure_peak_flops
from train.state import build_setup
from train.step import batch_sharding_tree, jit_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    start_step: int
    end_step: int
    resumed_from: int | None
    losses: dict[int, float]
    last_metrics: dict[str, float]
    flops_per_device: float
    peak_flops: float
    state: Any = None
    # True when ``train.time_limit_s`` ended the run before ``end_step`` was planned (``end_step`` is then
    # the step it reached and saved).
    time_limited: bool = False
    # "SIGTERM" / "SIGINT" when a signal ended the run early (after the checkpoint of ``end_step``).
    stopped_by: str | None = None


class StopSignals:
    """Turns the first SIGTERM / SIGINT into a stop request the loop acts on at a step boundary (the handlers
    are installed only in the main thread and restored by ``restore``); a second one of the same kind is not caught."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"{name} received: stopping after this step with a checkpoint (again to stop at once)",
                  file=sys.stderr, flush=True)
        prev = self._previous.get(signum)
        signal.signal(signum, prev if prev is not None else signal.SIG_DFL)

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()


def with_stage_settings(cfg: Config, stage) -> Config:
    """``cfg`` with the stage's settings in force stored under ``stages.<name>``, so ``config.json`` and every
    checkpoint record them (a stage's own arguments may differ from ``cfg.stages``)."""
    settings = getattr(stage, "settings", None)
    if settings is None or isinstance(settings, type) or not dataclasses.is_dataclass(settings):
        return cfg
    return dataclasses.replace(cfg, stages=cfg.stages.with_settings(stage.name, settings))


#: How long a process waits at :func:`align_processes` for the others (a slow compile, a cold cache).
ALIGN_TIMEOUT_S = 3600
_aligned = 0


def align_processes(name: str) -> None:
    """Wait until every process gets here, over the coordination service rather than a device collective.

    Needed before the first collectives of a program: a CPU (gloo) communicator is set up on first use and
    gives up after 30 s, and processes can drift further apart than that before the first step (on a resume
    process 0 reads the compiled step from the persistent cache while the others compile it). A dead
    process still ends the wait: the coordination service's heartbeat timeout aborts the others.
    """
    global _aligned
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    _aligned += 1
    ocp.multihost.get_barrier_sync_fn()(key=f"neodragon_{name}_{_aligned}", timeout_ms=ALIGN_TIMEOUT_S * 1000)


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.directory or Path(cfg.train.output_dir) / "checkpoints")


def run(
    cfg: Config,
    *,
    stage=None,
    mesh=None,
    stop_after: int | None = None,
    debug_kill_at_step: int | None = None,
    console: bool = True,
    keep_state: bool = False,
) -> RunResult:
    """Train ``cfg.train.stage`` to ``cfg.train.steps`` (or ``stop_after`` more steps, or until
    ``cfg.train.time_limit_s`` has passed since this call began); returns a summary."""
    t_call = time.monotonic()
    if cfg.train.time_limit_s < 0:
        raise ValueError(f"train.time_limit_s must be >= 0 (0 = no limit), got {cfg.train.time_limit_s}")
    stage = stage or stages_lib.get_stage(cfg.train.stage, cfg)
    cfg = with_stage_settings(cfg, stage)
    mesh = mesh or make_mesh(cfg.mesh)
    gb = cfg.train.global_batch
    out_dir = Path(cfg.train.output_dir)
    is_main = jax.process_index() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(to_json(cfg))

    align_processes("start")
    setup = build_setup(stage, cfg, mesh)
    example, batch_sh = batch_sharding_tree(setup)
    ckpt = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint)
    data = DataIterator(make_source(stage, cfg), list(example), gb, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    profiler = ProfileWindow(out_dir / "profile", cfg.train.profile_start, cfg.train.profile_steps)
    config_json = to_json(cfg)

    resumed_from = ckpt.latest_step() if cfg.checkpoint.resume else None
    if resumed_from is not None:
        state, _saved_cfg, data_state = ckpt.restore(resumed_from, setup.abstract_state)
        data.set_state(data_state)
        log.info("resumed from step %d (%s)", resumed_from, checkpoint_dir(cfg))
        if console and is_main:
            print(f"resumed from step {resumed_from}", flush=True)
    else:
        state = setup.init_state()
    frozen = setup.init_frozen()
    start = int(jax.device_get(state["step"]))
    writer = MetricsWriter(out_dir, tensorboard=cfg.train.tensorboard, start_step=start)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)

    abstract_batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), example, batch_sh)
    with activate(mesh, setup.rules):
        compiled = jit_train_step(setup).lower(setup.abstract_state, setup.abstract_frozen, abstract_batch).compile()
    align_processes("compiled")
    flops = compiled_flops(compiled)
    peak = cfg.train.peak_flops or measure_peak_flops()
    tokens = stages_lib.tokens_per_example(stage, cfg)

    losses: dict[int, float] = {}
    last: dict[str, float] = {}
    last_good_ckpt = resumed_from
    pending: list[tuple[int, Any]] = []
    t_prev = time.perf_counter()

    def drain(keep: int) -> None:
        nonlocal t_prev, last
        while len(pending) > keep:
            s, m = pending.pop(0)
            host = {k: float(v) for k, v in jax.device_get(m).items()}
            now = time.perf_counter()
            dt = now - t_prev
            t_prev = now
            check_finite(s, host, last_good_ckpt)
            host["step_time"] = dt
            host["samples_per_s"] = gb / dt
            if tokens:
                host["tokens_per_s"] = gb * tokens / dt
            if flops and peak:
                host["mfu"] = flops / dt / peak
            losses[s] = host["loss"]
            last = host
            writer.write(s, host, console=console and (s % cfg.train.log_every == 0 or s == end - 1))

    time_limited = False
    stopped_by = None

    def should_stop(done: int) -> tuple[bool, str | None]:
        """(out of time, the signal that asks to stop), the same in every process."""
        over = bool(cfg.train.time_limit_s) and time.monotonic() - t_call >= cfg.train.time_limit_s
        signalled = signals.received
        if jax.process_count() > 1:
            # Every process must stop at the same step (a save is collective): process 0's clock decides the
            # time limit, any process's signal stops all; asked every log_every steps so the exchange does not
            # serialise each step.
            if done % cfg.train.log_every:
                return False, None
            import numpy as np
            from jax.experimental import multihost_utils

            code = {None: 0, "SIGTERM": 1, "SIGINT": 2}
            mine = np.asarray([int(over), code.get(signalled, 1)], np.int32)
            every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
            over = bool(every[0, 0])
            signalled = {v: k for k, v in code.items()}[int(every[:, 1].max())] if every[:, 1].any() else None
        return over, signalled

    signals = StopSignals().install()
    try:
        for s in range(start, end):
            profiler.before_step(s)
            batch = to_global(next(data), batch_sh, gb)
            state, metrics = compiled(state, frozen, batch)
            pending.append((s, metrics))
            drain(keep=1)
            profiler.after_step(s, sync=metrics)
            done = s + 1
            over, signalled = should_stop(done) if done < end else (False, None)
            if signalled:
                stopped_by = signalled
                log.warning("%s: saving step %d of %d and stopping", signalled, done, end)
                if console and is_main:
                    print(f"{signalled}: checkpointing step {done} of {end} and stopping (continue with --resume)",
                          flush=True)
                end = done
            elif over:
                time_limited = True
                log.warning("train.time_limit_s=%g reached at step %d of %d: saving and stopping",
                            cfg.train.time_limit_s, done, end)
                if console and is_main:
                    print(f"time limit of {cfg.train.time_limit_s:g} s reached at step {done} of {end}: "
                          "checkpointing and stopping", flush=True)
                end = done
            if ckpt.should_save(done) or done == end:
                drain(keep=0)
                if ckpt.save(done, state, config_json, data.get_state(), force=done == end):
                    last_good_ckpt = done
                t_prev = time.perf_counter()  # the save's host time is not step time
            if debug_kill_at_step is not None and done == debug_kill_at_step:
                # Test hook: die like a preempted job, possibly with an async save in flight.
                os.kill(os.getpid(), signal.SIGKILL)
            if time_limited or stopped_by:
                break
        drain(keep=0)
    finally:
        signals.restore()
        profiler.close()
        ckpt.close()
        writer.close()
        data.close()
    return RunResult(out_dir, start, end, resumed_from, losses, last, flops, peak, state if keep_state else None,
                     time_limited=time_limited, stopped_by=stopped_by)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="config preset name or .toml path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set mesh.fsdp=4)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (checkpointing)")
    p.add_argument("--debug-kill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = [o for item in args.overrides for o in item.split()]
    cfg = load_config(args.preset, overrides)
    result = run(cfg, stop_after=args.stop_after, debug_kill_at_step=args.debug_kill_at_step)
    print(f"done: steps {result.start_step}..{result.end_step}, final loss {result.last_metrics.get('loss')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
