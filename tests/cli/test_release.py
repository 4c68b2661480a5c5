"""Shipped releases: the writer (official layout + release.json with hashes), the loader (record, config,
hash check) and `generate --model` on a release, with a small random teacher of the tiny-teacher shapes."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from neodragon_cli.main import main  # noqa: E402
from neodragon_cli.release import parse_schedules, write_release_folder  # noqa: E402
from neodragon_jax.config import load_config  # noqa: E402
from neodragon_jax.pipelines.text_to_video import GenerationRequest, TextToVideoPipeline  # noqa: E402
from neodragon_jax.releases import ReleaseError, available_releases, get_release  # noqa: E402

pytestmark = [pytest.mark.needs_torch]

SMALL = ["model.mmdit.num_layers=2", "sampling.first_unit_steps=[1,1,1]", "sampling.later_unit_steps=[1,1,1]"]


@pytest.fixture(scope="module")
def teacher():
    from export.convert import random_weights

    pipe = TextToVideoPipeline.random(load_config("tiny-teacher", SMALL), seed=0)
    for m in (pipe.text, pipe.mmdit, pipe.vae):
        random_weights(m, seed=1)  # non-zero everywhere: the from-scratch init zeroes the MMDiT's output
    return pipe


@pytest.fixture(scope="module")
def releases(tmp_path_factory, teacher):
    root = tmp_path_factory.mktemp("releases")
    write_release_folder(teacher, root / "small32", name="small32", dtype="float32", description="test")
    write_release_folder(teacher, root / "small16", name="small16", dtype="float16")
    return root


def test_written_release_loads_back_with_the_same_numbers(teacher, releases):
    assert available_releases(releases) == ["small16", "small32"]
    rel = get_release("small32", root=releases)
    rel.verify()
    rec = rel.record
    assert rec["preset"] == "tiny-teacher" and rec["storage_dtype"] == "float32"
    assert {"causal_video_vae/diffusion_pytorch_model.safetensors", "tokenizer_3/tokenizer.json"} <= set(rec["files"])
    cfg = rel.config()
    assert cfg.model.mmdit.num_layers == 2 and cfg.video.height == 32 and cfg.sampling.first_unit_steps == (1, 1, 1)
    loaded = TextToVideoPipeline.from_official(rel.folder, cfg, transformer=rel.transformer)
    req = GenerationRequest(prompt="a red circle moving left on a black background", seed=3)
    a, b = teacher.generate(req), loaded.generate(req)
    np.testing.assert_array_equal(a.frames, b.frames)  # float32 storage: the same videos
    half = get_release("small16", root=releases)
    c = TextToVideoPipeline.from_official(half.folder, half.config(), transformer=half.transformer).generate(req)
    assert 0 < np.abs(a.latents - c.latents).max() < 0.05  # float16 storage: rounded, not broken


def test_a_changed_or_unlisted_file_is_refused(releases, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(releases / "small32", bad)
    rel = get_release("bad", root=tmp_path)
    f = bad / "causal_video_vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ReleaseError, match="changed or missing: causal_video_vae/diffusion_pytorch_model"):
        rel.verify()
    shutil.copy(releases / "small32" / "causal_video_vae" / "diffusion_pytorch_model.safetensors", f)
    rel.verify()
    (bad / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ReleaseError, match="not in the record: extra.safetensors"):
        rel.verify()
    with pytest.raises(ReleaseError, match="no release named 'nope'; shipped releases: bad"):
        get_release("nope", root=tmp_path)


def test_generate_model_uses_a_release_and_its_record(releases, tmp_path, monkeypatch, capsys):
    import neodragon_jax.releases as R

    monkeypatch.setattr(R, "RELEASES_DIR", releases)
    out = tmp_path / "v.mp4"
    rc = main(["generate", "a blue square moving up on a white background", "--model", "small32", "--out", str(out),
               "--no-progress", "--seed", "2"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["random_weights"] is False and "small32" in meta["weights"]
    assert meta["size"] == [32, 32] and meta["frames"] == 9
    assert main(["generate", "--list"]) == 0
    assert "small32: test" in capsys.readouterr().out


def test_schedules_and_bad_runs_are_refused_clearly(tmp_path, capsys):
    cfg = load_config("tiny-teacher")
    got = parse_schedules("teacher,1-1-1,20-20-20/10-10-10@7/5", cfg)
    assert got[0] == ("teacher", (4, 4, 4), (4, 4, 4), (7.0, 5.0))
    assert got[1][1:] == ((1, 1, 1), (1, 1, 1), (0.0, 0.0))
    assert got[2][1:] == ((20, 20, 20), (10, 10, 10), (7.0, 5.0))
    rc = main(["release", "--flow", str(tmp_path / "none"), "--vae", str(tmp_path), "--text", str(tmp_path / "t.npz"),
               "--out", str(tmp_path / "rel")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not a training run (no config.json)" in err and "Traceback" not in err



def test_neodragon_release_arguments_are_checked_in_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "rel")]
    assert main(["release", "--text-distill", str(tmp_path), "--dmd", str(tmp_path)] + out) == 2
    assert "missing --decoder (a Neodragon release needs --text-distill, --decoder, --dmd)" in capsys.readouterr().err
    assert main(["release", "--flow", str(tmp_path), "--dmd", str(tmp_path)] + out) == 2
    assert "give either --flow/--vae/--text (a teacher) or --text-distill/--decoder/--dmd" in capsys.readouterr().err
    assert main(["release", "--flow", str(tmp_path)] + out) == 2
    assert "missing --vae, --text (a teacher release needs" in capsys.readouterr().err
    args = ["release", "--text-distill", str(tmp_path / "td"), "--decoder", str(tmp_path), "--dmd", str(tmp_path)]
    assert main(args + out) == 2
    err = capsys.readouterr().err
    assert f"--text-distill {tmp_path / 'td'}: not a training run (no config.json)" in err and "Traceback" not in err


def test_kept_share_and_nfe_ratio_against_each_teacher_schedule():
    from neodragon_cli.release import against_teacher

    def row(colour, motion, nfe, schedule="s"):
        return {"schedule": schedule, "accuracy": {"colour": colour, "motion": motion, "shape": 0.1}, "nfe": nfe}

    got = against_teacher({"teacher": row(0.8, 0.9, 9)},
                          {"teacher": row(0.8, 1.0, 72, "4-4-4"), "20-20-20": row(0.5, 0.9, 360, "20-20-20")},
                          "release:t")
    a, b = got["teacher"]["teacher"], got["teacher"]["20-20-20"]
    assert (a["nfe_ratio"], b["nfe_ratio"]) == (8.0, 40.0) and a["teacher_schedule"] == "4-4-4"
    assert a["kept"]["colour"] == pytest.approx(1.0) and a["kept"]["motion"] == pytest.approx(0.9)
    assert a["kept"]["mean"] == pytest.approx(1.7 / 1.8) and b["kept"]["mean"] == pytest.approx(1.7 / 1.4)
    assert "shape" not in a["kept"]  # judged on colour and motion (the teacher's shape is at chance)

def test_release_command_writes_evaluates_and_records(teacher, tmp_path, monkeypatch, capsys):
    """The whole command on a small random teacher (training runs are replaced by the pipeline they would make):
    folder written and verified, storage dtype checked, held-out scores beside chance, reference videos kept."""
    import neodragon_cli.release as release

    for d in ("flow", "vae"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    (tmp_path / "text.npz").write_bytes(b"")
    monkeypatch.setattr(release, "build_pipeline", lambda *a, **k: (teacher, teacher.cfg, 7))
    monkeypatch.setattr(release, "_clips_seen", lambda run, cfg: {"steps": 0})
    out = tmp_path / "rel"
    argv = ["release", "--flow", str(tmp_path / "flow"), "--vae", str(tmp_path / "vae"), "--text",
            str(tmp_path / "text.npz"), "--name", "rel", "--out", str(out), "--eval-prompts", "3",
            "--schedules", "1-1-1", "--reference-videos", "2", "--dtype-check-prompts", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "float16 vs float32 on 1 prompts" in text and "(chance " in text
    rel = get_release("rel", root=tmp_path)
    rel.verify()
    rec = rel.record
    assert set(rec["scores"]) == {"1-1-1"} and rec["made_by"]["flow_step"] == 7
    assert rec["scores"]["1-1-1"]["videos"] == 3 and set(rec["scores"]["1-1-1"]["chance"]) >= {"colour", "motion"}
    ref = rec["reference"]
    assert ref["schedule"] == "1-1-1" and ref["seeds"] == [0, 1] and len(ref["judgements"]) == 2
    videos = np.load(out / ref["file"])["videos"]
    assert videos.shape == (2, 9, 32, 32, 3) and videos.dtype == np.uint8
    # The stored release regenerates its reference videos.
    pipe = TextToVideoPipeline.from_official(out, rel.config(), transformer=rel.transformer)
    again = pipe.generate(GenerationRequest(prompt=ref["prompts"][1], seed=1, first_unit_steps=(1, 1, 1),
                                            later_unit_steps=(1, 1, 1), cfg_scales=(0.0, 0.0))).frames
    np.testing.assert_array_equal(again, videos[1])
    # An existing release is not replaced without --overwrite.
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
