"""`neodragon prune` on a random tiny teacher written as an official folder (`--checkpoint`): importance -> select (an official folder holding the kept
teacher blocks exactly, loadable with its provenance) -> `train recover-flow` -> (stage 2 refused without stage 1) ->
`prune eval`, plus the one-line errors (stage 2 without stage 1 among them)."""

import json

import numpy as np
import pytest

from neodragon_cli.main import main
from neodragon_jax.config import load_config
from neodragon_jax.convert.io import param_arrays
from neodragon_jax.pipelines.official import config_from_official_folder
from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

FAST = ["--schedule", "1-1-1", "--cfg", "0"]
# The tiny preset at 9 frames (2 latent units): a random teacher written as an official folder.
SHAPE = ["video.num_frames=9"]
TEACHER = ["--config", "tiny", *[x for o in SHAPE for x in ("--set", o)]]
BASE = ["--config", "tiny", "--steps", "2", "--batch", "4", "--log-every", "1",
        *[x for o in SHAPE + ["train.pyramid_units=[0]", "train.tensorboard=false", "mesh.data=1", "mesh.fsdp=-1",
                              "checkpoint.every_steps=2"] for x in ("--set", o)]]
TRAIN = [*BASE, "--set", "data.source=synthetic", "--set", "data.num_synthetic=8"]


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    from export.convert import jax_to_official_folder
    from tests.eval.test_block_importance import randomise

    pipe = TextToVideoPipeline.random(load_config("tiny", SHAPE), seed=0)
    randomise(pipe.mmdit, seed=3)
    return jax_to_official_folder(pipe, tmp_path_factory.mktemp("teacher") / "official"), pipe


def test_importance_select_recover_and_eval(tmp_path, capsys, teacher_folder):
    folder, teacher = teacher_folder
    src = ["--checkpoint", str(folder), *TEACHER]
    imp_dir, student = tmp_path / "imp", tmp_path / "student"
    assert main(["prune", "importance", *src, "--prompts", "2", "--samples", "1", "--schedule", "1-1-1",
                 "--cfg", "2", "--out", str(imp_dir)]) == 0
    imp = json.loads((imp_dir / "importance.json").read_text())
    assert len(imp["visual"]) == 4 and imp["text"][-1] is None and set(imp["by_branch"]) == {"cond", "uncond"}
    assert (imp_dir / "importance.png").stat().st_size > 1000

    assert main(["prune", "select", *src, "--importance", str(imp_dir / "importance.json"), "--out", str(student)]) == 0
    record = json.loads((student / "prune.json").read_text())
    kept = record["kept"]
    assert len(kept) == 3 and kept[-1] == 3  # 25% of 4 blocks removed, the last kept
    assert record["removed"] == [min(range(3), key=lambda k: imp["visual"][k])]  # the lowest BI_v
    # The folder loads with its provenance and holds the kept teacher blocks exactly.
    cfg = config_from_official_folder(student, teacher.cfg)
    pruned = TextToVideoPipeline.from_official(student, cfg)
    assert pruned.mmdit.teacher_block_indices == tuple(kept)
    got, want = param_arrays(pruned.mmdit), param_arrays(teacher.mmdit)
    for k, v in got.items():
        if k.startswith("transformer_blocks."):
            i, rest = k[len("transformer_blocks."):].split(".", 1)
            k = f"transformer_blocks.{kept[int(i)]}.{rest}"
        np.testing.assert_array_equal(v, want[k], err_msg=k)

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main(["train", "recover-flow", *TRAIN, "--workdir", str(s1),
                 "--set", f"stages.recover-flow.student={student}"]) == 0
    capsys.readouterr()
    distill = ["--set", f"stages.recover-distill.student={student}", "--set",
               f"stages.recover-distill.teacher=official:{folder}"]
    rc = main(["train", "recover-distill", *TRAIN, "--workdir", str(tmp_path / "refused"), *distill])
    err = capsys.readouterr().err
    assert rc == 2 and "has not passed stage 1" in err and "Traceback" not in err
    # (a recover-distill run through the engine is tests/train/test_pruning.py's; its compile is the costly part)
    del s2

    out = tmp_path / "eval"
    assert main(["prune", "eval", *src, *FAST, "--prompts", "2", "--student", f"pruned={student}",
                 "--student", f"stage1={s1}", "--out", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())
    assert [row["label"] for row in r["rows"]] == ["teacher", "pruned", "stage1"]
    assert [row["blocks"] for row in r["rows"]] == [4, 3, 3]
    assert r["rows"][1]["params"] < r["rows"][0]["params"]
    assert all(np.isfinite(row["denoise_ms_per_nfe"]) for row in r["rows"])
    assert (out / "pruning_sheet.png").is_file() and "kept of teacher" in (out / "report.md").read_text()


def test_one_line_errors(tmp_path, capsys):
    cases = [
        (["prune", "select", "--out", str(tmp_path / "x")], "needs an importance file"),
        (["prune", "select", "--rule", "explicit", "--keep", "0,1,2", "--out", str(tmp_path / "x")], "must be kept"),
        (["prune", "ablate", "--blocks", "7", "--out", str(tmp_path / "a")], "the last block is always kept"),
        (["prune", "eval", "--student", "s=" + str(tmp_path / "missing"), "--out", str(tmp_path / "e")],
         "is not a folder"),
        (["prune", "importance", "--model", "no-such-release", "--out", str(tmp_path / "i")], "no-such-release"),
    ]
    for argv, needle in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, (argv, err)
    assert load_config("tiny-teacher").model.mmdit.num_layers == 8
