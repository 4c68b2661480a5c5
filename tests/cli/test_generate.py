"""`neodragon generate` end to end on the tiny preset with random weights, and its error messages."""

import json

import numpy as np
import pytest

from neodragon_cli.main import main
from neodragon_jax.data.video_io import read_video
from neodragon_jax.pipelines.text_to_video import ScheduleError, parse_cfg_scales, parse_schedule


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
    rc = main(["generate", "a red circle moving left on a black background", "--config", "tiny",
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
    rc = main(["generate", "p", "--config", "tiny", "--out", str(tmp_path / "v.mp4"), "--no-progress", *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["generate", "p", "--config", "tiny", "--out", str(blocker / "v.mp4")])
    assert rc == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="must end in .mp4"):
        main(["generate", "p", "--out", str(tmp_path / "v.avi")])
