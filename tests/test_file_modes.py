"""Files written through a temporary file and a rename get the modes a plain open() would give them (issue 23
item 2: ``mkstemp`` made every mp4, gif, png, safetensors and config.json 0600, unreadable to other users)."""

import os
import stat
from contextlib import contextmanager

import numpy as np
import pytest

from export.convert import _write_json
from neodragon_jax.convert.io import write_safetensors
from neodragon_jax.data.video_io import contact_sheet, write_gif, write_mp4, write_png
from neodragon_jax.fsutil import current_umask, default_mode


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it():
    with umask(0o027):
        assert current_umask() == 0o027
        assert current_umask() == 0o027
        assert default_mode() == 0o640 and default_mode(directory=True) == 0o750


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writers_respect_the_umask(tmp_path, mask, expected):
    frames = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    with umask(mask):
        written = [
            write_mp4(frames, tmp_path / "v.mp4", fps=8),
            write_gif(frames, tmp_path / "v.gif", fps=8),
            write_png(contact_sheet(frames), tmp_path / "v_frames.png"),
        ]
        write_safetensors({"w": np.ones((2, 2), np.float32)}, tmp_path / "m" / "model.safetensors")
        _write_json({"a": 1}, tmp_path / "m" / "config.json")
    written += [tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json"]
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(expected) for p in written}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "v.gif", "v.mp4", "v_frames.png"]  # no temp left
