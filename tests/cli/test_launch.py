"""`neodragon launch` without JAX in the children: rank-prefixed output, a lost rank stops the others within
the grace period and is named, Ctrl-C reaches every process, the environment contract with
``neodragon_jax.sharding.mesh``, and bad input. The real multi-process training runs are in
tests/train/test_multihost.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neodragon_cli.launch import LAUNCH_ENV, Launcher, child_env
from neodragon_cli.main import main
from neodragon_jax.sharding import MeshError
from neodragon_jax.sharding import mesh as mesh_lib

ROOT = Path(__file__).resolve().parents[2]


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_environment_contract_with_the_mesh_module():
    assert LAUNCH_ENV == mesh_lib.LAUNCH_ENV  # the launcher spells them out to start without JAX
    env = child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1", "KEEP": "1"},
                    rank=1, count=3, coordinator="127.0.0.1:1234", devices=4)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=4"]
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo" and env["JAX_PLATFORMS"] == "cpu"
    assert env["KEEP"] == "1"
    assert mesh_lib.launch_environment(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 3,
                                                "process_id": 1}
    assert mesh_lib.launch_environment({}) is None
    with pytest.raises(MeshError, match="NEODRAGON_PROCESS_ID"):
        mesh_lib.launch_environment({LAUNCH_ENV["coordinator_address"]: "h:1", LAUNCH_ENV["num_processes"]: "2"})
    with pytest.raises(MeshError, match=r"NEODRAGON_PROCESS_ID=2 must be in \[0, NEODRAGON_NUM_PROCESSES=2\)"):
        mesh_lib.launch_environment({LAUNCH_ENV["coordinator_address"]: "h:1", LAUNCH_ENV["num_processes"]: "2",
                                     LAUNCH_ENV["process_id"]: "2"})


def test_lost_rank_is_named_and_the_others_are_killed_within_the_grace(capfd):
    # Rank 0 ignores SIGTERM and would sleep a minute (a process stuck in a collective); rank 1 dies.
    argv = _child("""
        import os, signal, sys, time
        rank = int(os.environ["NEODRAGON_PROCESS_ID"])
        print(f"hello from {rank} of {os.environ['NEODRAGON_NUM_PROCESSES']}", flush=True)
        if rank == 1:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    """)
    t0 = time.monotonic()
    launcher = Launcher(argv, n=2, devices=1, grace=1.0)
    launcher.start()
    rc = launcher.wait()
    elapsed = time.monotonic() - t0
    out, err = capfd.readouterr()
    assert rc == 128 + signal.SIGKILL
    assert elapsed < 10, f"the launcher took {elapsed:.1f} s to end the job"
    assert "[rank 0] hello from 0 of 2" in out and "[rank 1] hello from 1 of 2" in out
    assert "lost rank 1" in err and "was killed by SIGKILL" in err and "rank 0 was killed by SIGKILL" in err
    assert "--resume" in err


def test_the_same_error_on_every_rank_is_reported_once(capfd):
    argv = _child("""
        import os, sys, time
        time.sleep(0.2 * int(os.environ["NEODRAGON_PROCESS_ID"]))
        sys.exit(3)
    """)
    launcher = Launcher(argv, n=2, devices=1, grace=5.0)
    launcher.start()
    assert launcher.wait() == 3
    err = capfd.readouterr().err
    assert "every process exited with status 3" in err and "lost rank" not in err


def test_ctrl_c_is_forwarded_to_every_process(tmp_path):
    child = textwrap.dedent("""
        import os, signal, sys, time
        rank = os.environ["NEODRAGON_PROCESS_ID"]
        def on_int(*_):
            print(f"rank {rank} got SIGINT", flush=True)
            sys.exit(130)
        signal.signal(signal.SIGINT, on_int)
        print("ready", flush=True)
        time.sleep(60)
    """)
    driver = textwrap.dedent(f"""
        import sys
        from neodragon_cli.launch import Launcher
        launcher = Launcher([sys.executable, "-c", {child!r}], n=2, devices=1, grace=5.0)
        import signal
        signal.signal(signal.SIGINT, launcher.on_interrupt)
        launcher.start()
        sys.exit(launcher.wait())
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while sum("ready" in line for line in lines) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert sum("ready" in line for line in lines) == 2, "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "[rank 0] rank 0 got SIGINT" in out and "[rank 1] rank 1 got SIGINT" in out
    assert "SIGINT: forwarded to every process" in out and "lost rank" not in out


def test_a_killed_launcher_takes_its_processes_with_it(tmp_path):
    child = 'import os, time; print("pid", os.getpid(), flush=True); time.sleep(60)'
    driver = textwrap.dedent(f"""
        import sys
        from neodragon_cli.launch import Launcher
        launcher = Launcher([sys.executable, "-c", {child!r}], n=2, devices=1, grace=5.0)
        launcher.start()
        sys.exit(launcher.wait())
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    pids = []
    try:
        while len(pids) < 2:
            line = proc.stdout.readline()
            assert line, "the launcher ended before its children started"
            if " pid " in line and line.startswith("[rank"):
                pids.append(int(line.split()[-1]))
    finally:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.05)
    assert not alive, f"ranks {alive} outlived their launcher"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


@pytest.mark.parametrize("argv, message", [
    (["launch", "-n", "2"], "give the command every process runs after '--'"),
    (["launch", "-n", "0", "--", "train", "toy"], "-n must be >= 1, got 0"),
    (["launch", "-n", "2", "--devices-per-process", "0", "--", "train", "toy"],
     "--devices-per-process must be >= 1"),
    (["launch", "-n", "2", "--", "launch", "-n", "2"], "cannot itself be 'launch'"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neodragon launch: ") and message in err and len(err.splitlines()) == 1
