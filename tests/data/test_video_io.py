"""Video writing and reading round trips (mp4 through PyAV, gif and PNG through Pillow)."""

import os

import numpy as np
import pytest

from neodragon_jax.data.video_io import (
    VideoWriteError,
    check_writable,
    contact_sheet,
    read_video,
    to_uint8_frames,
    write_gif,
    write_mp4,
    write_png,
)


def moving_square(f=9, h=32, w=48):
    frames = np.zeros((f, h, w, 3), np.uint8)
    for i in range(f):
        frames[i, 8:16, 2 + 3 * i:10 + 3 * i] = (250, 40, 40)
    return frames


def test_uint8_conversion_matches_official_rounding():
    video = np.array([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0], np.float32).reshape(1, 1, 1, 6).repeat(3, 0)
    out = to_uint8_frames(video)
    assert out.shape == (1, 1, 6, 3)
    # x*127.5+127.5 then truncation: 0.999 -> 254.87 -> 254; out of range clipped.
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_mp4_round_trip_keeps_frame_count_size_and_content(tmp_path):
    frames = moving_square()
    path = write_mp4(frames, tmp_path / "a.mp4", fps=8)
    back, fps = read_video(path)
    assert back.shape == frames.shape
    assert fps == pytest.approx(8)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6.0


def test_odd_sizes_are_padded_for_yuv420(tmp_path):
    back, _ = read_video(write_mp4(moving_square(h=31, w=45), tmp_path / "odd.mp4", fps=8))
    assert back.shape[1:3] == (32, 46)


def test_gif_and_contact_sheet(tmp_path):
    frames = moving_square()
    back, _ = read_video(write_gif(frames, tmp_path / "a.gif", fps=8))
    assert back.shape[0] == frames.shape[0]
    sheet = contact_sheet(frames, columns=4)
    assert sheet.shape == (3 * 32, 4 * 48, 3)
    write_png(sheet, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_unwritable_output_is_reported_early(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(VideoWriteError, match="is a folder"):
        check_writable(tmp_path / "dir.mp4")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VideoWriteError, match="cannot create the output folder"):
        check_writable(blocker / "sub" / "v.mp4")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(VideoWriteError, match="not writable"):
            check_writable(ro / "v.mp4")


def test_no_partial_file_left_on_failure(tmp_path):
    with pytest.raises(Exception):
        write_mp4(np.zeros((2, 8, 8), np.uint8), tmp_path / "bad.mp4")
    assert [p.name for p in tmp_path.iterdir()] == []
