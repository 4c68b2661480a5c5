"""`neodragon generate` end to end on the tiny preset with random weights, and its error messages."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from neodragon_cli.main import main
from neodragon_jax.data.video_io import read_video
from neodragon_jax.pipelines.text_to_video import (
    GeneratedVideo,
    ScheduleError,
    TextToVideoPipeline,
    latent_shape,
    parse_cfg_scales,
    parse_schedule,
)

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_parsing():
    assert parse_schedule("20-20-20,10-10-10", 3) == ((20, 20, 20), (10, 10, 10))
    assert parse_schedule("1-1-1", 3) == ((1, 1, 1), (1, 1, 1))
    for bad in ("1-1", "a-b-c", "0-1-1", "1-1-1,2-2", "", "1--1-1", "1-1-1,2-2-2,3-3-3"):
        with pytest.raises(ScheduleError):
            parse_schedule(bad, 3)
    assert parse_cfg_scales("7,5", (0.0, 0.0)) == (7.0, 5.0)
    assert parse_cfg_scales(None, (7.0, 5.0)) == (7.0, 5.0)
    with pytest.raises(ScheduleError):
        parse_cfg_scales("-1", (0.0, 0.0))


@pytest.mark.slow
def test_generate_writes_playable_video_gif_sheet_and_sidecar(tmp_path, capsys):
    out = tmp_path / "out" / "clip.mp4"
    rc = main(["generate", "a red circle moving left on a black background", "--config", "tiny", "--random-weights",
               "--schedule", "1-1-1", "--frames", "9", "--seed", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "RANDOM weights" in err
    frames, fps = read_video(out)
    assert frames.shape == (9, 64, 64, 3)
    assert fps == pytest.approx(8)
    gif, _ = read_video(out.with_suffix(".gif"))
    assert gif.shape[0] == 9
    assert (tmp_path / "out" / "clip_frames.png").stat().st_size > 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["random_weights"] is True
    assert meta["nfe"] == meta["schedule"]["nfe_expected"] == 6  # 2 latent frames x 3 stages, no CFG
    assert meta["schedule"]["cfg"] == [0.0, 0.0]
    assert set(meta["timings_s"]) >= {"load", "text", "denoise", "decode"}
    assert meta["config"]["model"]["mmdit"]["num_layers"] == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--schedule", "1-1"], "gives 2 stages"),
        (["--schedule", "x"], "dash-separated"),
        (["--frames", "10"], "1 + 8"),
        (["--cfg", "abc"], "CFG"),
    ],
)
def test_generate_bad_input_is_refused_clearly(tmp_path, capsys, args, message):
    rc = main(["generate", "p", "--config", "tiny", "--random-weights", "--out", str(tmp_path / "v.mp4"), "--no-progress", *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["generate", "p", "--config", "tiny", "--random-weights", "--out", str(blocker / "v.mp4")])
    assert rc == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    # issue 23 item 4: exit status 2 like every other usage error (it was SystemExit(1) with the message)
    assert main(["generate", "p", "--out", str(tmp_path / "v.avi")]) == 2
    assert "--out must end in .mp4" in capsys.readouterr().err


# ---- issue 23: every check before the model, Ctrl-C, unwritable outputs --------------------------------------


class StubPipeline:
    """Stands in for the model: black frames at once (the CLI's own logic is what these tests exercise)."""

    def __init__(self, cfg):
        self.cfg, self.source, self.random_weights = cfg, "stub", True

    def latent_shape(self, num_frames):
        return latent_shape(self.cfg, num_frames)

    def generate(self, req, progress=None):
        frames = np.zeros((req.num_frames, self.cfg.video.height, self.cfg.video.width, 3), np.uint8)
        return GeneratedVideo(prompt=req.prompt, full_prompt=req.prompt, seed=req.seed, frames=frames,
                              latents=np.zeros(1), nfe=0, timings={"denoise": 0.0}, schedule={},
                              random_weights=True)


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build a model fails the test: the command must refuse before that."""

    def built(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(TextToVideoPipeline, "random", classmethod(built))
    monkeypatch.setattr(TextToVideoPipeline, "from_official", classmethod(built))


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(TextToVideoPipeline, "random", classmethod(lambda cls, cfg, seed=0: StubPipeline(cfg)))


@pytest.mark.parametrize("frames,message", [("0", "--frames must be a positive 1 + 8k"),
                                            ("-8", "--frames must be a positive 1 + 8k"),
                                            ("10", "1 + 8k video frames")])
def test_frames_are_refused_before_any_model_work(tmp_path, capsys, no_model, frames, message):
    """--frames 0 used to write the default length; 10 was refused only after the model was built."""
    rc = main(["generate", "p", "--config", "tiny", "--random-weights", "--out", str(tmp_path / "v.mp4"), "--frames", frames])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()


def test_long_video_warns_with_its_cost(tmp_path, capsys, stub):
    rc = main(["generate", "p", "--config", "tiny", "--random-weights", "--out", str(tmp_path / "v.mp4"), "--frames", "25",
               "--schedule", "1-1-1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "--frames 25 is above the 17 frames config 'tiny' is made for" in err
    assert "4 latent frames in 4 units x 3 stages = 12 model calls and 12 step compilations" in err
    assert read_video(tmp_path / "v.mp4")[0].shape[0] == 25
    capsys.readouterr()
    assert main(["generate", "p", "--config", "tiny", "--random-weights", "--out", str(tmp_path / "w.mp4"), "--frames", "9",
                 "--no-progress"]) == 0
    assert "above the" not in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_in_proc_is_refused_before_any_work(capsys, no_model):
    """/proc passed os.access (root), the video was generated and then lost in a traceback."""
    rc = main(["generate", "p", "--config", "tiny", "--random-weights", "--out", "/proc/x.mp4"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write files in the output folder '/proc'" in err


def test_video_that_cannot_be_written_is_rescued(tmp_path, capsys, stub, monkeypatch):
    """A write failure after generation (disk full, folder gone) saves the video elsewhere and says where."""
    import neodragon_jax.data.video_io as vio

    real = vio.write_gif

    def full_disk(frames, path, fps=24):
        if Path(path).parent == tmp_path / "out":
            raise OSError(28, "No space left on device")
        return real(frames, path, fps=fps)

    monkeypatch.setattr(vio, "write_gif", full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    rc = main(["generate", "p", "--config", "tiny", "--random-weights", "--out", str(tmp_path / "out" / "v.mp4"), "--frames", "9",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    rescued = list((tmp_path / "tmp").glob("neodragon-rescued-*/v.mp4"))
    assert len(rescued) == 1 and read_video(rescued[0])[0].shape[0] == 9
    assert str(rescued[0].parent) in err
    assert json.loads(rescued[0].with_suffix(".json").read_text())["frames"] == 9


def test_missing_prompt_is_a_usage_error(tmp_path, capsys, no_model):
    assert main(["generate", "--config", "tiny", "--random-weights", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "give a PROMPT or --prompts-file" in capsys.readouterr().err
    assert main(["generate", "--prompts-file", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "v.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err


CTRL_C_SCRIPT = r"""
import signal, sys, time
from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

class Busy:
    def __init__(self, cfg):
        self.cfg, self.source, self.random_weights = cfg, "busy", True
    def latent_shape(self, n):
        return (3, 16, 16)
    def generate(self, req, progress=None):
        # Like an XLA compile: this thread does not service signals for a long time.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        print("BUSY", file=sys.stderr, flush=True)
        time.sleep(60)

TextToVideoPipeline.random = classmethod(lambda cls, cfg, seed=0: Busy(cfg))
from neodragon_cli.main import main
sys.exit(main(["generate", "p", "--config", "tiny", "--random-weights", "--out", sys.argv[1], "--no-progress"]))
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signals")
def test_ctrl_c_stops_at_once_during_model_work(tmp_path):
    """Ctrl-C used to wait for the compile in progress (25 s with --frames 100001)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path / "v.mp4")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "BUSY" not in seen:
            line = proc.stderr.readline()
            assert line, f"exited early: {seen}"
            seen += line
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
        took = time.monotonic() - t0
        err = seen + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130 and took < 5, (rc, took, err[-2000:])
    assert "interrupted (Ctrl-C); 0 of 1 video(s) written" in err and "Traceback" not in err


# ---- shipped releases: --model, and what goes with what ---------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "no-such-release"], "no release named 'no-such-release'; shipped releases:"),
        (["--model", "tiny-teacher", "--random-weights"], "exclude each other"),
        (["--checkpoint", "x", "--random-weights"], "exclude each other"),
        (["--config", "tiny"], "--config goes with --checkpoint or --random-weights"),
    ],
)
def test_model_source_is_checked_before_any_work(tmp_path, capsys, no_model, args, message):
    rc = main(["generate", "p", "--out", str(tmp_path / "v.mp4"), "--no-progress", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
