"""`neodragon train`: a flow run that stops, is refused without --resume, then resumes; error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

from neodragon_cli.main import main

ROOT = Path(__file__).resolve().parents[2]
# Small and quick: the tiny preset with one MMDiT block and one unit layout (a compile per layout).
FAST = ["--set", "model.mmdit.num_layers=1", "--set", "train.pyramid_units=[0]", "--set", "train.peak_flops=1e9",
        "--set", "train.tensorboard=false"]


def _neodragon(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # One device and a low LLVM optimisation level: these runs check behaviour, not speed.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "neodragon_cli", *args, "--compile-cache", str(tmp_path / "xla-cache")]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_flow_runs_stops_and_resumes(tmp_path):
    work = tmp_path / "run"
    base = ["train", "flow", "--config", "tiny", "--steps", "3", "--workdir", str(work), "--log-every", "1", *FAST]
    first = _neodragon(base + ["--stop-after", "2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "neodragon train flow: config 'tiny', 3 steps" in first.stdout
    assert "step 0 | loss" in first.stdout and "step 1 | loss" in first.stdout
    assert "done: steps 0..2" in first.stdout
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["train"]["stage"] == "flow" and cfg["train"]["output_dir"] == str(work)
    assert (work / "checkpoints" / "2").is_dir()

    again = _neodragon(base, tmp_path)
    assert again.returncode == 2
    assert "already holds a run (checkpoint at step 2): pass --resume" in again.stderr

    resumed = _neodragon(base + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout and "done: steps 2..3" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    assert (work / "checkpoints" / "3").is_dir()


def test_sigterm_checkpoints_the_step_it_stops_at_and_resume_continues_the_same_losses(tmp_path):
    """A preemption notice (SIGTERM) mid-run: the step in flight finishes, a checkpoint is written there, the
    command exits 143 saying how to continue, and --resume gives the uninterrupted run's losses."""
    import re
    import signal

    import numpy as np

    toy = ["--config", "tiny", "--set", "train.peak_flops=1e9", "--set", "train.tensorboard=false", "--set",
           "data.num_synthetic=4000", "--set", "checkpoint.every_steps=1000", "--log-every", "1"]
    steps = 400  # long enough that the signal lands mid-run on any machine
    ref_dir, work = tmp_path / "ref", tmp_path / "run"
    assert main(["train", "toy", "--steps", str(steps), "--workdir", str(ref_dir), "--compile-cache", "none",
                 *toy]) == 0
    ref = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (ref_dir / "metrics.jsonl").open()}

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "neodragon_cli", "train", "toy", "--steps", str(steps), "--workdir", str(work),
           "--compile-cache", "none", *toy]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if re.match(r"step 5 \|", line):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    m = re.search(r"stopped by SIGTERM after step (\d+) of 400: checkpoint .*; continue with the same command and "
                  r"--resume", out)
    assert m, out[-2000:] + err[-2000:]
    stopped = int(m[1])
    assert 6 <= stopped < steps
    assert "SIGTERM received: stopping after this step with a checkpoint" in err
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [str(stopped)]

    assert main(["train", "toy", "--steps", str(steps), "--workdir", str(work), "--compile-cache", "none",
                 "--resume", *toy]) == 0
    got = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (work / "metrics.jsonl").open()}
    assert sorted(got) == list(range(steps))
    np.testing.assert_allclose([got[s] for s in range(steps)], [ref[s] for s in range(steps)], rtol=1e-6, atol=0)


def test_train_toy_in_process(tmp_path, capsys):
    rc = main(["train", "toy", "--config", "tiny", "--steps", "2", "--workdir", str(tmp_path / "toy"),
               "--compile-cache", "none", "--set", "train.peak_flops=1e9", "--set", "train.tensorboard=false"])
    out = capsys.readouterr().out
    assert rc == 0 and "done: steps 0..2" in out


def test_train_error_messages(tmp_path, capsys):
    assert main(["train", "nosuch", "--workdir", str(tmp_path / "x"), "--compile-cache", "none"]) == 2
    err = capsys.readouterr().err
    assert "neodragon train: unknown training stage 'nosuch'" in err and "'flow'" in err and "'toy'" in err

    assert main(["train", "flow", "--records", str(tmp_path / "missing"), "--compile-cache", "none"]) == 2
    err = capsys.readouterr().err
    assert "--records" in err and "does not exist" in err

    assert main(["train", "flow", "--set", "train.nosuch=1", "--compile-cache", "none"]) == 2
    assert "config error" in capsys.readouterr().err


def test_bad_captions_file_is_one_line_and_banner_names_the_folder(tmp_path, capsys):
    """A malformed captions.jsonl line was a good message inside a traceback, and the banner of a video-folder
    run said `data synthetic` (issue 23 item 5)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "captions.jsonl").write_text('{"video": "a.mp4", "text": "a red circle"}\n{bad json\n')
    rc = main(["train", "vae", "--config", "tiny", "--set", f"data.path={data}", "--steps", "1",
               "--workdir", str(tmp_path / "run"), "--compile-cache", "none", "--set", "train.tensorboard=false"])
    out, err = capsys.readouterr()
    assert rc == 2, err[-2000:]
    assert f"neodragon train: data.path: {data / 'captions.jsonl'}:2: not valid JSON" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"data video folder {data}" in out and "data synthetic" not in out

    (data / "captions.jsonl").unlink()
    assert main(["train", "vae", "--config", "tiny", "--set", f"data.path={data}", "--steps", "1",
                 "--workdir", str(tmp_path / "run2"), "--compile-cache", "none"]) == 2
    assert "no captions.jsonl in" in capsys.readouterr().err


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, capsys):
    """`train --dry-run`: the roles with exact parameter counts, no workdir written; every problem at once."""
    work = tmp_path / "run"
    assert main(["train", "flow", "--config", "tiny", "--workdir", str(work), "--batch", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mmdit  trained" in out and "591,552 params" in out and "dry run: ok" in out
    assert not work.exists()
    code = main(["train", "flow", "--config", "tiny", "--workdir", str(work), "--batch", "6", "--set",
                 "mesh.fsdp=4", "--records", str(tmp_path / "missing"), "--init-from", str(tmp_path / "nope"),
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "does not split over the 4 devices" in err
    assert "missing' does not exist" in err and "nope' does not exist" in err  # records, --init-from
    assert not work.exists()
