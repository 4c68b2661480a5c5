"""Video folder reader: sampling, resize + centre crop, normalisation, corrupt / missing / short files."""

import json
import logging

import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.data import synthetic as S
from neodragon_jax.data.video_folder import (
    ReadStats,
    VideoFolder,
    VideoReadError,
    decode_clip,
    read_captions,
    to_model_input,
)
from neodragon_jax.data.video_io import write_gif, write_mp4


def counting_video(f=16, h=32, w=32):
    """Frame k is uniformly grey level 12k: sampled frames reveal their source index."""
    return np.repeat((np.arange(f, dtype=np.uint8) * 12)[:, None, None, None], h * w * 3).reshape(f, h, w, 3)


def write_webm(frames, path, fps):
    import av

    with av.open(str(path), mode="w", format="webm") as c:
        s = c.add_stream("libvpx-vp9", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for fr in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three good videos (mp4, gif, webm), a truncated mp4, random bytes, and an entry for a missing file."""
    root = S.write_dataset(tmp_path_factory.mktemp("vf"), 3, seed=1, height=32, width=32, num_frames=9, fps=8,
                           progress=False)
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    scenes = S.read_scenes(root)
    frames1 = S.render_scene(scenes[1]["scene"], height=32, width=32, num_frames=9, seed=scenes[1]["render_seed"])
    write_gif(frames1, root / "videos/one.gif", fps=8)
    frames2 = S.render_scene(scenes[2]["scene"], height=32, width=32, num_frames=9, seed=scenes[2]["render_seed"])
    write_webm(frames2, root / "videos/two.webm", fps=8)
    rows[1]["video"], rows[2]["video"] = "videos/one.gif", "videos/two.webm"
    good = (root / "videos/000000.mp4").read_bytes()
    (root / "videos/truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "videos/noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    rows += [{"video": "videos/truncated.mp4", "text": "broken"}, {"video": "videos/noise.mp4", "text": "noise"},
             {"video": "videos/gone.mp4", "text": "missing"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, scenes


def test_reads_mp4_gif_webm_as_model_input(folder):
    root, scenes = folder
    vf = VideoFolder(root, height=32, width=32, num_frames=9, fps=8)
    assert len(vf) == 5 and vf.stats.missing == 1
    for i in range(3):
        item = vf[i]
        x = item["video"]
        assert x.shape == (3, 9, 32, 32) and x.dtype == np.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        ref = S.render_scene(scenes[i]["scene"], height=32, width=32, num_frames=9, seed=scenes[i]["render_seed"])
        err = np.abs(x - to_model_input(ref))
        assert err.mean() < 0.05 and np.median(err) < 0.02, (i, err.mean())  # codec error, mostly at edges
        assert item["text"] == scenes[i]["text"] and item["index"] == i
    assert vf.stats.read == 3


def test_corrupt_files_are_skipped_warned_and_counted(folder, caplog):
    root, _ = folder
    vf = VideoFolder(root, height=32, width=32, num_frames=9, fps=8)
    with caplog.at_level(logging.WARNING, logger="neodragon_jax.data.video_folder"):
        items = list(vf)
    assert [it["source"] for it in items] == ["videos/000000.mp4", "videos/one.gif", "videos/two.webm"]
    assert vf.stats == ReadStats(read=3, corrupt=2, too_short=0, missing=1)
    assert vf.stats.as_dict()["data/videos_skipped"] == 2
    text = caplog.text
    assert "truncated.mp4" in text and "noise.mp4" in text
    assert set(vf.failures) == {3, 4} and all(v.startswith("corrupt") for v in vf.failures.values())
    with pytest.raises(VideoReadError, match="noise.mp4"):
        vf[4]


def test_missing_file_and_missing_captions(folder, tmp_path, caplog):
    root, _ = folder
    with caplog.at_level(logging.WARNING, logger="neodragon_jax.data.video_folder"):
        VideoFolder(root, height=32, width=32, num_frames=9)
    assert "gone.mp4" in caplog.text and "does not exist" in caplog.text
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        VideoFolder(tmp_path, height=32, width=32, num_frames=9)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_captions(tmp_path / "nope")
    (tmp_path / "captions.jsonl").write_text('{"video": "a.mp4", "text": "x"}\n{"video": "b.mp4"\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: not valid JSON"):
        read_captions(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r':1: expected an object with string fields "video" and "text"'):
        read_captions(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"video": "a.mp4", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="none of the videos"):
        VideoFolder(tmp_path, height=8, width=8, num_frames=1)


def test_frame_sampling_at_a_target_rate(tmp_path):
    path = write_mp4(counting_video(), tmp_path / "count.mp4", fps=8)
    levels = lambda clip: (clip.reshape(len(clip), -1).mean(-1) / 12).round().astype(int).tolist()  # noqa: E731
    assert levels(decode_clip(path, num_frames=5, height=32, width=32)) == [0, 1, 2, 3, 4]
    assert levels(decode_clip(path, num_frames=5, height=32, width=32, fps=8)) == [0, 1, 2, 3, 4]
    assert levels(decode_clip(path, num_frames=5, height=32, width=32, fps=4)) == [0, 2, 4, 6, 8]
    assert levels(decode_clip(path, num_frames=8, height=32, width=32, fps=16)) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(VideoReadError, match="only 4 of 8 frames at 2 fps") as err:
        decode_clip(path, num_frames=8, height=32, width=32, fps=2)
    assert err.value.kind == "too_short"
    padded = decode_clip(path, num_frames=6, height=32, width=32, fps=2, short="pad")
    assert levels(padded) == [0, 4, 8, 12, 12, 12]


def test_too_short_is_counted(folder):
    root, _ = folder
    vf = VideoFolder(root, height=32, width=32, num_frames=17, fps=8)
    assert vf.get(0) is None and vf.stats.too_short == 1 and vf.failures[0].startswith("too_short")
    assert VideoFolder(root, height=32, width=32, num_frames=17, fps=8, short="pad")[0]["video"].shape[1] == 17


def test_resize_and_centre_crop(tmp_path):
    # 32x64 source: red | green | blue columns 16 | 32 | 16. Covering 16x16 scales by 1/2 and crops the
    # centre 16 columns, which is exactly the green band.
    src = np.zeros((1, 32, 64, 3), np.uint8)
    src[:, :, :16] = (220, 30, 30)
    src[:, :, 16:48] = (30, 200, 30)
    src[:, :, 48:] = (30, 30, 220)
    clip = decode_clip(write_gif(src, tmp_path / "bands.gif", fps=4), num_frames=1, height=16, width=16)
    assert clip.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(clip[:, :, 2:-2].reshape(-1, 3).mean(0), (30, 200, 30), atol=3)
    assert clip[..., 0].max() < 110 and clip[..., 2].max() < 110  # only antialiasing reaches the border
    tall = decode_clip(write_gif(src.transpose(0, 2, 1, 3), tmp_path / "tall.gif", fps=4), num_frames=1,
                       height=12, width=20)
    assert tall.shape == (1, 12, 20, 3)


def test_from_config_uses_the_preset_video_settings(folder):
    cfg = load_config("tiny")
    vf = VideoFolder.from_config(folder[0], cfg, short="pad")
    assert (vf.height, vf.width, vf.num_frames, vf.fps) == (64, 64, 17, 8)
    assert vf[0]["video"].shape == (3, 17, 64, 64)
    with pytest.raises(ValueError, match="short must be"):
        VideoFolder(folder[0], height=8, width=8, num_frames=1, short="loop")
