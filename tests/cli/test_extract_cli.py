"""`neodragon extract`: a captioned video folder -> training records with the shipped teacher's encoders
(records that `train recover-flow` reads), resumable, other settings refused, bad input exit 2."""

import numpy as np

from neodragon_cli.main import main
from neodragon_jax.data.captions import split_combinations
from neodragon_jax.data.synthetic import write_dataset
from neodragon_jax.releases import get_release


def test_extract_writes_resumes_and_refuses_other_settings(tmp_path, capsys):
    cfg = get_release("tiny-teacher").config()
    v = cfg.video
    write_dataset(tmp_path / "videos", n=3, seed=0, split=split_combinations(), height=v.height, width=v.width,
                  num_frames=v.num_frames, fps=v.fps)
    out = tmp_path / "cache"
    argv = ["extract", "--videos", str(tmp_path / "videos"), "--out", str(out), "--batch", "2", "--null-in-records"]
    assert main(argv) == 0
    assert "3 written now" in capsys.readouterr().out
    files = sorted((out / "records").glob("*.npz"))
    assert len(files) == 3
    with np.load(files[0]) as z:
        # the tiny VAE: 4x spatial and no temporal compression
        assert z["latents"].shape[1:] == (v.num_frames, v.height // 4, v.width // 4)
        assert {"latents", "text_tokens", "text_mask", "pooled", "null_text_tokens"} <= set(z.files)
        assert np.isfinite(z["latents"]).all()

    assert main(argv) == 0  # a rerun finds every record done
    assert "0 written now" in capsys.readouterr().out

    assert main(argv + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "differs in: seed)" in err and "--overwrite" in err and "Traceback" not in err
    assert len(list((out / "records").glob("*.npz"))) == 3  # nothing lost by the refusal
    assert main(argv + ["--seed", "1", "--overwrite"]) == 0
    assert "3 written now" in capsys.readouterr().out


def test_extract_bad_input_is_one_line(tmp_path, capsys):
    assert main(["extract", "--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "v").mkdir()
    assert main(["extract", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "c"), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
