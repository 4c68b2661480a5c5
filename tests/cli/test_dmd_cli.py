"""`neodragon synthesize` -> `train dmd` -> `dmd eval` -> `dmd export` -> `generate`, on a one-block random teacher
written as an official folder (its own file so that the suite's workers run it beside the pruning chain)."""

import json

import numpy as np
import pytest

from neodragon_cli.main import main
from neodragon_jax.config import load_config
from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline
from tests.cli.test_prune import BASE, SHAPE


def test_synthesize_train_dmd_eval_and_export(tmp_path, capsys):
    """`neodragon synthesize` (resumable, refuses other settings) -> `train dmd` -> `dmd eval` -> `dmd export`, on a
    one-block random teacher (the DMD step holds three MMDiTs: its compile dominates)."""
    from export.convert import jax_to_official_folder
    from tests.eval.test_block_importance import randomise

    one = SHAPE + ["model.mmdit.num_layers=1"]
    pipe = TextToVideoPipeline.random(load_config("tiny", one), seed=0)
    randomise(pipe.mmdit, seed=3)
    folder = jax_to_official_folder(pipe, tmp_path / "teacher")
    teacher_args = ["--config", "tiny", *[x for o in one for x in ("--set", o)]]
    src = ["--checkpoint", str(folder), *teacher_args]
    data = tmp_path / "data"
    synth = ["synthesize", *src, "--schedule", "1-1-1", "--cfg", "2", "--prompts", "4", "--batch", "2",
             "--out", str(data)]
    assert main(synth) == 0
    files = sorted((data / "records").glob("*.npz"))
    assert len(files) == 4 and (data / "sheet.png").is_file()
    with np.load(files[0]) as z:
        assert {"latents", "text_tokens", "text_mask", "pooled", "null_text_tokens", "caption"} <= set(z.files)
    stamp = files[0].stat().st_mtime_ns
    capsys.readouterr()
    assert main(synth) == 0 and "0 records (4 already there, " in capsys.readouterr().out
    assert files[0].stat().st_mtime_ns == stamp
    assert main([*synth[:-2], "--seed", "1", "--out", str(data)]) == 2
    err = capsys.readouterr().err
    assert "synthesized with other settings" in err and "seed differ" in err

    run_dir = tmp_path / "dmd"
    assert main(["train", "dmd", *BASE, "--set", "model.mmdit.num_layers=1", "--records", str(data / "records"),
                 "--workdir", str(run_dir), "--set", "optim.ema_decay=0.9",
                 "--set", f"stages.dmd.teacher=official:{folder}"]) == 0
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["dmd", "eval", "--run", str(run_dir), "--prompts", "2", "--teacher-schedule", "2-2", "--out",
                 str(out)]) == 2
    assert "--teacher-schedule '2-2'" in capsys.readouterr().err
    assert main(["dmd", "eval", "--run", str(run_dir), "--prompts", "2", "--teacher-schedule", "2-2-2", "--out",
                 str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["teacher", "teacher 2-2-2", "teacher 1-1-1", "DMD 1-1-1", "DMD 4-4-4",
                                          "hybrid"]
    nfe = {r["label"]: r["nfe"] for r in rows}
    against = {r["label"]: r["against"]["teacher 2-2-2"] for r in rows}
    assert against["DMD 1-1-1"]["nfe_ratio"] == nfe["teacher 2-2-2"] / nfe["DMD 1-1-1"]
    assert against["teacher 2-2-2"]["kept_share"] == pytest.approx(1.0)
    assert "Against **teacher 2-2-2**" in (out / "report.md").read_text()
    assert nfe["DMD 1-1-1"] == nfe["teacher 1-1-1"] == 6 and nfe["DMD 4-4-4"] == 24  # 2 latent units x 3 stages
    assert (out / "dmd_sheet.png").is_file()
    exported = tmp_path / "exported"
    assert main(["dmd", "export", "--run", str(run_dir), "--out", str(exported)]) == 0
    assert main(["generate", "a red circle", "--checkpoint", str(exported), *teacher_args, "--schedule", "1-1-1",
                 "--cfg", "0", "--out", str(tmp_path / "gen.mp4")]) == 0
