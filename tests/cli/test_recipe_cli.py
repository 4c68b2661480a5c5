"""`neodragon recipe`: settings, the phase graph (what each phase reads from which earlier phase), the configs
its training phases get, the report built from the phases' own JSON, and the one-line errors. The whole
recipe at toy sizes (``--quick``) is run by hand and in the recipe's own benchmark, not here: each of its
commands has its own CLI test (text-distill, eval decoder, prune, synthesize, dmd, release, export)."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from neodragon_cli import recipe
from neodragon_cli.main import main
from neodragon_jax.config import load_config
from neodragon_jax.sharding import make_mesh
from train.recipe import PhaseRecord


def _run(tmp_path, *overrides, quick=True):
    s, extra = recipe.parse_settings(list(overrides), quick)
    cfg = load_config("tiny-teacher", extra)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return recipe.RecipeRun(tmp_path, s, cfg, mesh, extra)


def test_settings_split_and_refuse(tmp_path):
    s, extra = recipe.parse_settings(["recipe.dmd_steps=7 optim.b1=0.8", "recipe.dec_chroma=2"], quick=False)
    assert s.dmd_steps == 7 and s.dec_chroma == 2.0 and extra == ["optim.b1=0.8"]
    assert recipe.parse_settings([], quick=True)[0] == recipe.QUICK
    with pytest.raises(recipe.RecipeUsageError, match="unknown recipe setting 'recipe.dmd_step'"):
        recipe.parse_settings(["recipe.dmd_step=3"], quick=False)
    with pytest.raises(recipe.RecipeUsageError, match="recipe.td_steps must be >= 1"):
        recipe.parse_settings(["recipe.td_steps=0"], quick=False)
    with pytest.raises(recipe.RecipeUsageError, match="expected int"):
        recipe.parse_settings(["recipe.td_steps=1.5"], quick=False)
    with pytest.raises(recipe.RecipeUsageError, match="no shipped release of that name; shipped: .*tiny-teacher"):
        recipe.parse_settings(["recipe.teacher=nope"], quick=False)


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["recipe", "--workdir", str(tmp_path), "--set", "recipe.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neodragon recipe: unknown recipe setting") and "Traceback" not in err
    assert main(["recipe", "--workdir", str(tmp_path), "--quick", "--only", "nothing"]) == 2
    assert "--only nothing: unknown phase; phases: data, latents" in capsys.readouterr().err


def _record(name, folder, results, cfg=None):
    return PhaseRecord(name, folder, "k" + name, results, "ran", 1.0, cfg)


def test_phase_graph_and_training_configs(tmp_path):
    run = _run(tmp_path, "recipe.dmd_steps=5", "recipe.prune_batch=4")
    phases = {p.name: p for p in recipe.build_phases(run)}
    assert list(phases) == ["data", "latents", "corpus", "text-distill", "text-distill-eval", "decoder",
                            "decoder-eval", "importance", "select", "recover-flow", "recover-distill", "prune-eval",
                            "synthesize", "dmd", "dmd-eval", "release", "export"]
    assert phases["dmd"].inputs == ("select", "recover-distill", "synthesize")
    assert phases["release"].inputs == ("text-distill", "decoder", "dmd")
    # A setting is in the key of exactly the phases that read it.
    assert "dmd_steps" in phases["dmd"].settings and "dmd_steps" not in phases["release"].settings

    rec = {n: _record(n, tmp_path / n, {}) for n in phases}
    rec["select"] = _record("select", tmp_path / "select", {"kept": [0, 1, 2, 4, 6, 7]})
    dmd = phases["dmd"].configure(run.cfg, rec, phases["dmd"].settings)
    ds = dmd.stages.get_settings("dmd")
    assert ds.generator_blocks == (0, 1, 2, 4, 6, 7) and ds.teacher == "release:tiny-teacher"
    assert ds.generator_init == f"run:{tmp_path / 'recover-distill'}:ema"
    assert (dmd.train.steps, dmd.train.global_batch, dmd.data.source) == (5, run.settings.dmd_batch, "records")
    assert dmd.data.path == str(tmp_path / "synthesize" / "records")

    rd = phases["recover-distill"].configure(run.cfg, rec, phases["recover-distill"].settings)
    rs = rd.stages.get_settings("recover-distill")
    assert rs.init == f"run:{tmp_path / 'recover-flow'}:ema" and rs.student == str(tmp_path / "select" / "student")
    assert rd.train.global_batch == 4 and rd.data.path == str(tmp_path / "latents" / "records")

    dec = phases["decoder"].configure(run.cfg, rec, phases["decoder"].settings)
    assert dec.name == "tiny-teacher-decoder" and dec.stages.get_settings("decoder").chroma_weight == 0.1
    assert dec.stages.get_settings("decoder").vae == "release:tiny-teacher" and dec.mesh.rules == "dp"
    td = phases["text-distill"].configure(run.cfg, rec, phases["text-distill"].settings)
    assert td.stages.get_settings("text-distill").mode == "train-dt5"
    assert td.data.path == str(tmp_path / "corpus" / "corpus")


def _row(label, colour, motion, nfe, schedule="s"):
    return {"label": label, "schedule": schedule, "accuracy": {"colour": colour, "motion": motion, "shape": 0.2},
            "chance": {"colour": 0.1, "motion": 0.15}, "nfe": nfe, "seconds_per_video": 0.1}


def test_report_from_the_phases_json(tmp_path):
    run = _run(tmp_path)
    teacher = _row("teacher", 0.8, 0.9, 72, "4-4-4,4-4-4 cfg 7/5")
    results = {
        "text-distill-eval": {"downstream": {"prompts": 2, "scores": {"student tokens": _row("", 0.8, 0.8, 72),
                                                                      "teacher tokens": teacher},
                                             "chance": {"student tokens": {"colour": 0.1}, "teacher tokens": {}}},
                              "costs": {"teacher (T5 + CE)": {"params": 1000}, "student (DT5 + CA)": {"params": 200}}},
        "decoder-eval": {"scores": {"light": _row("", 0.7, 0.9, 0), "native": teacher}, "videos": 2,
                         "params": {"native": 2000, "light": 100}},
        "select": {"kept": [0, 2], "params": {"teacher_mmdit": 400, "student_mmdit": 300}},
        "prune-eval": {"rows": [teacher, _row("stage 1 + 2", 0.8, 0.9, 72)]},
        "dmd-eval": {"rows": [teacher, _row("DMD 1-1-1", 0.82, 0.92, 9)]},
        "release": {"scores": {"teacher": _row("", 0.76, 0.9, 9, "1-1-1,1-1-1 no cfg")},
                    "teacher_scores": {"teacher": teacher},
                    "against_teacher": {"teacher": {"teacher": {
                        "teacher_schedule": teacher["schedule"], "teacher_nfe": 72, "nfe": 9, "nfe_ratio": 8.0,
                        "kept": {"colour": 0.95, "motion": 1.0, "mean": 0.976}}}}},
        "export": {"artifacts": [], "litert_scores": {"prompts": 2, "judged": ["colour", "motion"], "rows": [
            _row("JAX", 0.76, 0.9, 9),
            dict(_row("LiteRT int8", 0.75, 0.9, 9), on_litert=["distil_t5", "light_decoder"],
                 change_points={"colour": -1.0, "motion": 0.0}, within_tolerance=True, psnr_vs_jax_db=41.5)]}},
    }
    records = {n: _record(n, tmp_path / n, r) for n, r in results.items()}
    path = recipe.write_report(run, records, 60.0)
    text = path.read_text()
    traj = json.loads((tmp_path / "report.json").read_text())["trajectory"]
    assert [t["model"].split(" (")[0] for t in traj] == [
        "teacher", "+ DistilT5 + ContextAdapter", "+ light decoder", "+ pruned MMDiT after both recovery stages",
        "+ pyramidal DMD", "= Neodragon-tiny"]
    assert "| 0.760 (0.100) | 0.900 (0.150) | 9 |" in text  # the shipped row beside chance
    assert "| 4-4-4,4-4-4 cfg 7/5 | 72 | 9 | 8.0x | 95.0% | 100.0% | 97.6% |" in text
    assert "| decoder (+ post_quant_conv) | 2,000 | 100 | 20.0x |" in text
    assert "### End to end through the exported graphs" in text
    assert "| LiteRT int8 | distil_t5, light_decoder | 0.750 (0.100) | 0.900 (0.150) | -1.0 / +0.0 | yes | 41.5 dB |" in text
    assert "| text encoder (T5 + CE vs DT5 + CA) | 1,000 | 200 | 5.0x |" in text
    # kept of the light-decoder row: (0.7 + 0.9) / (0.8 + 0.9)
    assert f"| {(0.7 + 0.9) / 1.7:.1%} |" in text
