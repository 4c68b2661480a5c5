"""`neodragon launch -n N [--devices-per-process D] -- train STAGE ...`: N JAX processes on this machine.

A local stand-in for a pod's launcher, so the multi-process paths (``jax.distributed``, a mesh that spans
processes, per-process data, collective checkpoints) run for real on one CPU host. Each child is
``python -m neodragon_cli <command>`` with the process setup in its environment (the ``NEODRAGON_*``
variables :func:`neodragon_jax.sharding.mesh.launch_environment` reads, ``D`` forced CPU devices, gloo CPU
collectives). Its output lines are prefixed with ``[rank i]``.

Failure handling is the launcher's job because a JAX process cannot be relied on to notice a dead peer
quickly: a survivor blocked in a collective waits for the coordination service's heartbeat timeout. So when
one child exits with an error or is killed, the launcher terminates the others (SIGTERM, then SIGKILL after
``--grace`` seconds), names the lost rank and exits non-zero. Ctrl-C is forwarded to every child once; a
second Ctrl-C (or ``--grace`` seconds without them exiting) kills them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

POLL_S = 0.05
# The variables `neodragon_jax.sharding.mesh.launch_environment` reads (spelled out here, not imported, so the
# launcher starts without importing JAX; a test checks that the two agree).
LAUNCH_ENV = {
    "coordinator_address": "NEODRAGON_COORDINATOR_ADDRESS",
    "num_processes": "NEODRAGON_NUM_PROCESSES",
    "process_id": "NEODRAGON_PROCESS_ID",
}


def add_arguments(p) -> None:
    import argparse

    p.add_argument("-n", "--num-processes", type=int, required=True, help="how many processes to start")
    p.add_argument("--devices-per-process", type=int, default=1,
                   help="simulated CPU devices per process (XLA --xla_force_host_platform_device_count; default 1)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds the other processes get to exit after one fails or after Ctrl-C, before "
                        "they are killed (default 10)")
    p.add_argument("--port", type=int, default=0,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the neodragon command every process runs, after '--' (e.g. -- train flow --config tiny)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, rank: int, count: int, coordinator: str, devices: int) -> dict:
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    # A CPU rehearsal: with libtpu or CUDA installed JAX would otherwise claim the accelerator in every process.
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["PYTHONUNBUFFERED"] = "1"
    env[LAUNCH_ENV["coordinator_address"]] = coordinator
    env[LAUNCH_ENV["num_processes"]] = str(count)
    env[LAUNCH_ENV["process_id"]] = str(rank)
    return env


def _pump(stream, out, prefix: bytes, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            out.flush()
    stream.close()


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _death_signal_setter():
    """A function for the child, between fork and exec: SIGKILL it when the launcher dies, so a killed
    launcher (a CI timeout) leaves no ranks behind (they run in their own sessions, out of reach of a signal
    to the launcher's group). Resolved in the parent: the child only makes the one call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # children run in their own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


class Launcher:
    """Runs ``argv`` as ranks ``0..n-1`` (``argv`` is the whole child command line, normally
    ``python -m neodragon_cli ...``)."""

    def __init__(self, argv: list[str], n: int, devices: int, grace: float, port: int = 0):
        self.argv, self.n, self.devices, self.grace = argv, n, devices, grace
        self.coordinator = f"127.0.0.1:{port or free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.interrupts = 0
        self.kill_deadline: float | None = None

    def start(self) -> None:
        preexec = _death_signal_setter()
        for rank in range(self.n):  # every child before any pump thread: preexec_fn runs between fork and exec
            env = child_env(os.environ, rank, self.n, self.coordinator, self.devices)
            self.procs.append(subprocess.Popen(self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               start_new_session=True, preexec_fn=preexec))
        lock = threading.Lock()
        for rank, proc in enumerate(self.procs):
            prefix = f"[rank {rank}] ".encode()
            for stream, out in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
                t = threading.Thread(target=_pump, args=(stream, out, prefix, lock), daemon=True)
                t.start()
                self.threads.append(t)
            print(f"neodragon launch: rank {rank} is pid {proc.pid}", flush=True)

    def on_interrupt(self, signum, _frame) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            print(f"neodragon launch: {signal.Signals(signum).name}: forwarded to every process "
                  f"(again to kill them now)", file=sys.stderr, flush=True)
            for p in self.procs:
                if p.poll() is None:
                    _signal_group(p, signum)
            self.kill_deadline = time.monotonic() + self.grace
        else:
            self.kill_deadline = time.monotonic()

    def stop_others(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        self.kill_deadline = min(self.kill_deadline or float("inf"), time.monotonic() + self.grace)

    def wait(self) -> int:
        """Wait for every child; returns the launcher's exit status (0 only if all of them exited 0)."""
        lost: tuple[int, int] | None = None  # (rank, returncode) of the first process that failed
        while True:
            codes = [p.poll() for p in self.procs]
            if lost is None and not self.interrupts:  # after Ctrl-C every exit status is expected
                failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    # Of several found in one poll, one killed by a signal is the cause, the others its echo.
                    lost = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
                    if any(c is None for c in codes):
                        print(f"neodragon launch: rank {lost[0]} {describe_exit(lost[1])}; stopping the other "
                              f"process(es) within {self.grace:g} s", file=sys.stderr, flush=True)
                        if lost[1] < 0:
                            self.stop_others()
                        else:
                            # An error exit (bad config, non-finite loss) usually ends every rank at the same
                            # step: let them finish on their own, and kill only those still alive after grace.
                            self.kill_deadline = time.monotonic() + self.grace
            if all(c is not None for c in codes):
                break
            if self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
                for p in self.procs:
                    if p.poll() is None:
                        _signal_group(p, signal.SIGKILL)
                self.kill_deadline = float("inf")
            time.sleep(POLL_S)
        for t in self.threads:
            t.join(timeout=2.0)  # a grandchild may hold the pipe open; its output is not worth a hang
        codes = [p.returncode for p in self.procs]
        if self.interrupts and lost is None:
            return 130
        if lost is None:
            return 0
        rank, rc = lost
        stopped = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "SIGINT"}
        if rc in stopped and all(c == rc for c in codes):
            # `neodragon train` exits so after checkpointing the step every process agreed to stop at
            print(f"neodragon launch: every process stopped on {stopped[rc]} (a signal to one of them stops all, "
                  f"after a checkpoint); relaunch the same command with --resume to continue", file=sys.stderr,
                  flush=True)
            return rc
        if rc > 0 and all(c == rc for c in codes):
            print(f"neodragon launch: every process exited with status {rc} (their errors are above)",
                  file=sys.stderr, flush=True)
            return rc
        others = ", ".join(f"rank {r} {describe_exit(c)}" for r, c in enumerate(codes) if r != rank)
        print(f"neodragon launch: lost rank {rank} (pid {self.procs[rank].pid}), which {describe_exit(rc)}"
              + (f"; {others}" if others else "")
              + ". Relaunch the same command with --resume to continue from the last committed checkpoint",
              file=sys.stderr, flush=True)
        return rc if rc > 0 else 128 + (-rc)


def run(args) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        return _err("give the command every process runs after '--', e.g. "
                    "neodragon launch -n 2 -- train flow --config tiny")
    if command[0] == "launch":
        return _err("the command after '--' cannot itself be 'launch'")
    if args.num_processes < 1:
        return _err(f"-n must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        return _err(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    if args.grace < 0:
        return _err(f"--grace must be >= 0 seconds, got {args.grace}")
    if not 0 <= args.port < 65536:
        return _err(f"--port must be a TCP port (1-65535, or 0 for a free one), got {args.port}")
    launcher = Launcher([sys.executable, "-m", "neodragon_cli", *command], args.num_processes,
                        args.devices_per_process, args.grace, args.port)
    print(f"neodragon launch: {args.num_processes} process(es) x {args.devices_per_process} CPU device(s), "
          f"coordinator {launcher.coordinator}: neodragon {' '.join(command)}", flush=True)
    previous = {s: signal.signal(s, launcher.on_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        return launcher.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _err(msg: str) -> int:
    print(f"neodragon launch: {msg}", file=sys.stderr)
    return 2
