"""Real multi-process training on this machine (`neodragon launch`, jax.distributed, gloo CPU collectives):
2 processes x 4 devices against 1 process x 8 devices, kill -9 of one process and a relaunch, and a
2-process checkpoint restored into 1 process.

One launch pair serves the three tests (a multi-process start costs tens of seconds on 2 cores): the
uninterrupted single-process reference, a 2 x 4 run whose rank 1 is killed at a random step, the relaunch
that resumes it, and a single-process resume from a copy of its checkpoint of step 5. The toy stage keeps
it inside the CI budget; the flow stage runs the same loop, and `NEODRAGON_MULTIHOST_STAGE=flow` runs these
tests on it (about 7 minutes on 2 cores: a 2 x 4 flow step takes seconds over loopback gloo).
"""

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from neodragon_jax.config import load_config
from train.checkpoint import Checkpointer
from train.loop import checkpoint_dir, run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
STAGE = os.environ.get("NEODRAGON_MULTIHOST_STAGE", "toy")
SETTINGS = [
    f"train.steps={STEPS}", "train.global_batch=8", "train.log_every=1", "train.peak_flops=1e9",
    "train.tensorboard=false", "checkpoint.every_steps=5", "checkpoint.keep_latest=3", "mesh.data=2",
    "mesh.fsdp=4", "mesh.tensor=1", 'mesh.rules="fsdp"',
] + (["data.num_synthetic=40", "optim.lr=1e-2"] if STAGE == "toy" else
     ["model.mmdit.num_layers=1", "train.pyramid_units=[0]"])
LAUNCH_TIMEOUT_S = 240 if STAGE == "toy" else 600


def _config(workdir: Path, resume: bool = False):
    return load_config("tiny", SETTINGS + [f'train.stage="{STAGE}"', f'train.output_dir="{workdir}"',
                                           f"checkpoint.resume={str(resume).lower()}"])


def _losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


class Launch:
    """``neodragon launch -n 2 --devices-per-process 4 -- train ...`` with its output read line by line."""

    def __init__(self, workdir: Path, cache: Path, *extra: str):
        cmd = [sys.executable, "-m", "neodragon_cli", "launch", "-n", "2", "--devices-per-process", "4",
               "--grace", "2", "--", "train", STAGE, "--config", "tiny", "--workdir", str(workdir),
               "--compile-cache", str(cache), *extra]
        for s in SETTINGS:
            cmd += ["--set", s]
        env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
        # The lowest LLVM level compiles faster; the launcher keeps it and sets the device count itself.
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.deadline = time.monotonic() + LAUNCH_TIMEOUT_S

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next_line(self) -> str | None:
        """The next output line, None at the end; fails the test (killing the job) at the deadline."""
        try:
            line = self._queue.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            self.kill()
            pytest.fail(f"launch timed out after {LAUNCH_TIMEOUT_S} s:\n" + "".join(self.lines[-40:]))
        if line is not None:
            self.lines.append(line)
        return line

    def wait(self) -> int:
        while self.next_line() is not None:
            pass
        return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    cache = tmp / "xla-cache"
    ref = run(_config(tmp / "ref"), console=False)  # 1 process x 8 devices, uninterrupted

    work = tmp / "two"
    kill_after = random.Random().randint(5, 8)  # the rank-0 console line of this step triggers the kill
    first = Launch(work, cache)
    pids, killed_at = {}, None
    try:
        while (line := first.next_line()) is not None:
            if m := re.match(r"neodragon launch: rank (\d+) is pid (\d+)", line):
                pids[int(m[1])] = int(m[2])
            if re.match(rf"\[rank 0\] step {kill_after} \|", line):
                os.kill(pids[1], signal.SIGKILL)
                killed_at = time.monotonic()
                break
        assert killed_at is not None, f"never reached step {kill_after}:\n{_errors(first.output)}"
        rc = first.wait()
        ended_after = time.monotonic() - killed_at
    finally:
        first.kill()
    logged_before_kill = _losses(work)
    latest = Checkpointer(checkpoint_dir(_config(work)), _config(work).checkpoint, read_only=True).latest_step()

    second = Launch(work, cache, "--resume")
    try:
        rc2 = second.wait()
    finally:
        second.kill()
    assert rc2 == 0, f"the relaunch failed (status {rc2}):\n{_errors(second.output)}"

    # The 2-process checkpoint of step 5 resumed by one process (8 devices): drop the later one from a copy.
    single = tmp / "single"
    shutil.copytree(work, single)
    shutil.rmtree(checkpoint_dir(_config(single)) / str(STEPS))
    restored = run(_config(single, resume=True), console=False)
    print(f"multihost ({STAGE}): rank 1 killed after step {kill_after}, the launcher ended {ended_after:.1f} s later "
          f"(status {rc}); the relaunch resumed from step {latest}")  # the figures, shown with pytest -s
    return dict(ref=ref.losses, first=first, rc=rc, ended_after=ended_after, kill_after=kill_after,
                logged_before_kill=logged_before_kill, latest=latest, second=second,
                resumed=_losses(work), single=restored, single_losses=_losses(single))


def _errors(output: str) -> str:
    """The lines of a failed launch that say why (its tail is mostly the dying processes' stack dumps)."""
    keep = [line for line in output.splitlines()
            if re.search(r"Error|error:|Traceback|lost rank|exited|killed|Barrier|timed out", line)
            and "    @ " not in line]
    return "\n".join(keep[-60:]) + "\n--- last lines ---\n" + output[-3000:]


def _assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5, atol=0)


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    ref = runs["ref"]
    assert sorted(ref) == list(range(STEPS))
    before = runs["logged_before_kill"]  # the first 2 x 4 launch, before anything was killed
    assert sorted(before)[:runs["kill_after"] + 1] == list(range(runs["kill_after"] + 1))
    _assert_close(before, ref, range(runs["kill_after"] + 1))
    assert "8 cpu device(s) in 2 processes, mesh data=2 x fsdp=4" in runs["first"].output
    # Process 0 speaks for the run: rank 1 prints no banner and no step lines.
    assert not re.search(r"\[rank 1\] (step \d|neodragon train|done:)", runs["first"].output + runs["second"].output)


@pytest.mark.slow
def test_kill_of_one_process_ends_the_job_naming_it_and_relaunch_reproduces(runs):
    out = runs["first"].output
    assert runs["rc"] != 0, out[-3000:]
    assert "lost rank 1" in out and "was killed by SIGKILL" in out, out[-3000:]
    assert runs["ended_after"] < 60
    assert runs["latest"] in (None, 5)  # step 5's save may not have committed before the kill
    resumed_from = runs["latest"] or 0
    assert (f"resumed from step {resumed_from}" in runs["second"].output) == (resumed_from > 0)
    got = runs["resumed"]
    assert sorted(got) == list(range(STEPS))
    _assert_close(got, runs["ref"], range(STEPS))


@pytest.mark.slow
def test_two_process_checkpoint_restores_into_one_process(runs):
    single = runs["single"]
    assert single.resumed_from == 5 and single.start_step == 5 and single.end_step == STEPS
    _assert_close(single.losses, runs["ref"], range(5, STEPS))
    assert sorted(runs["single_losses"]) == list(range(STEPS))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step_with_a_checkpoint(runs, tmp_path):
    """A preemption notice that reaches one host: all processes agree on the step, save it together and exit
    143; the launcher says so; a resume continues with the uninterrupted losses."""
    work = tmp_path / "preempted"
    launch = Launch(work, tmp_path / "xla-cache")
    pids, signalled = {}, False
    try:
        while (line := launch.next_line()) is not None:
            if m := re.match(r"neodragon launch: rank (\d+) is pid (\d+)", line):
                pids[int(m[1])] = int(m[2])
            if not signalled and re.match(r"\[rank 0\] step 2 \|", line):
                os.kill(pids[1], signal.SIGTERM)
                signalled = True
        rc = launch.proc.wait(timeout=60)
    finally:
        launch.kill()
    out = launch.output
    assert signalled, _errors(out)
    assert rc == 128 + signal.SIGTERM, _errors(out)
    assert "every process stopped on SIGTERM" in out, _errors(out)
    m = re.search(r"\[rank 0\] stopped by SIGTERM after step (\d+) of 10", out)
    assert m, _errors(out)
    stopped = int(m[1])
    assert 3 <= stopped < STEPS
    ckpt = Checkpointer(checkpoint_dir(_config(work)), _config(work).checkpoint, read_only=True)
    assert ckpt.latest_step() == stopped
    before = _losses(work)
    _assert_close(before, runs["ref"], range(stopped))
    resumed = run(_config(work, resume=True), console=False)
    assert resumed.resumed_from == stopped
    _assert_close(_losses(work), runs["ref"], range(STEPS))
