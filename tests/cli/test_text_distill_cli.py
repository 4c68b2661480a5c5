"""`neodragon text-distill` and `neodragon train text-distill`: the corpus command, one-line errors, and a
train -> eval -> export round on random towers (the downstream part through a random tiny pipeline; the exported
Neodragon folder reproduces the student's tokens)."""

import json

import numpy as np
import pytest

from neodragon_cli.main import main
from neodragon_cli.text_distill import teacher_pipeline
from neodragon_jax.config import apply_overrides
from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline
from train.roles import Models
from train.text_distill import load_run, t5_tokenize

# The tiny teacher's shapes with one T5 / DT5 layer, 10 tokens and a one-frame clip through a 2-block MMDiT with
# a 1-1-1 schedule.
FAST = ["model.text.max_length=10", "model.text.t5.num_layers=1", "model.text.distil_t5.body.num_layers=1",
        "model.mmdit.num_layers=2", "video.num_frames=1",
        "sampling.first_unit_steps=[1,1,1]", "sampling.later_unit_steps=[1,1,1]", "sampling.first_unit_cfg=0.0",
        "sampling.later_unit_cfg=0.0", "train.peak_flops=1e9", "train.tensorboard=false",
        "stages.text-distill.teacher_init=random", "mesh.data=1", "mesh.fsdp=-1"]


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def test_corpus_command_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["text-distill", "corpus", "--out", str(out), "--tiny", "40", "--heldout", "3"]) == 0
    assert "40 training and 3 held-out prompts" in capsys.readouterr().out
    assert (out / "train.jsonl").is_file() and json.loads((out / "corpus.json").read_text())["num_heldout"] == 3

    assert main(["text-distill", "corpus", "--out", str(tmp_path / "x")]) == 2
    assert "no prompt files given" in capsys.readouterr().err
    assert main(["text-distill", "eval", "--run", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["text-distill", "eval", "--run", str(out)]) == 2
    assert "not a training run" in capsys.readouterr().err
    rc = main(["train", "text-distill", "--config", "tiny", "--steps", "1", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2 and "reads its prompts from data.path" in err and len(err.strip().splitlines()) == 1
    rc = main(["train", "text-distill", "--config", "tiny", "--steps", "1", "--workdir", str(tmp_path / "w2"),
               "--set", f"data.path={out}", "--set", "stages.text-distill.teacher_init=release:no-such-release"])
    err = capsys.readouterr().err
    assert rc == 2 and "no release named 'no-such-release'" in err


@pytest.mark.slow
def test_train_eval_export_on_random_towers(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert main(["text-distill", "corpus", "--out", str(corpus), "--tiny", "64", "--heldout", "4"]) == 0
    work = tmp_path / "run"
    rc = main(["train", "text-distill", "--config", "tiny-teacher", "--steps", "4", "--batch", "8",
               "--workdir", str(work),
               "--compile-cache", "none", *_sets(FAST + [f"data.path={corpus}", "stages.text-distill.ema=0.5"])])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["text-distill", "eval", "--run", str(work), "--downstream", "2", "--teacher", "random"]) == 0
    report = (work / "report.md").read_text()
    assert "Held-out tokens against the teacher's CE(T5(p))" in report
    assert "| teacher (T5 + CE) |" in report and "student / teacher" in report
    r = json.loads((work / "report.json").read_text())
    assert r["tokens"]["prompts"] == 4 and -1.0 <= r["tokens"]["cos"] <= 1.0 and r["weights"] == "ema"
    d = r["downstream"]
    assert d["prompts"] == 2 and set(d["scores"]) == {"teacher tokens", "student tokens"}
    assert "colour" in d["chance"]["student tokens"]
    assert (work / "text_distill_sheet.png").stat().st_size > 0

    # Export: the official Neodragon folder computes the student's tokens (DT5 -> CA at the MMDiT width).
    neo = tmp_path / "neo"
    assert main(["text-distill", "export", "--run", str(work), "--out", str(neo), "--teacher", "random"]) == 0
    assert (neo / "text_encoder_3").is_dir() and (neo / "context_adapter").is_dir()
    assert main(["text-distill", "export", "--run", str(work), "--out", str(neo), "--teacher", "random"]) == 2
    assert "exists" in capsys.readouterr().err

    run = load_run(work)
    # A random teacher has no pipeline of its own: eval skips the downstream part unless --teacher is given.
    assert teacher_pipeline(run, None) is None
    pipe = TextToVideoPipeline.from_official(neo, apply_overrides(run.cfg, [
        "model.text.kind=neodragon", "model.mmdit.context_in_dim=none"]))
    ids, mask = t5_tokenize(pipe.tokenizers, ["a red circle moving left", "a blue square"], 10)
    want = np.asarray(run.stage.student_tokens(Models(run.models), ids, mask))
    got = np.asarray(pipe.text.encode_tokens(ids, mask))
    np.testing.assert_allclose(got[mask != 0], want[mask != 0], rtol=1e-4, atol=1e-5)
