"""`neodragon demo --quick` on the recipe runner: every phase runs and the report (accuracies beside their
chance levels) is written; a rerun reuses every phase; a changed flow setting rebuilds flow and the phases
after it, an unrelated one only the phase that reads it; bad settings and config keys the demo sets itself
are one-line errors with exit status 2."""

import contextlib
import io
import json
import re
import time

import pytest

from neodragon_cli.demo import (DEMO_KEYS, PHASES, QUICK, DemoSettings, _checkpoint_every, _flow_steps,
                                parse_settings)
from neodragon_cli.main import main

FLOW_LR = QUICK.flow_lr  # the quick demo's flow learning rate; the third run doubles it

def _demo(workdir, *extra):
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = main(["demo", "--workdir", str(workdir), "--quick", "--compile-cache", "none", *extra])
    return rc, out.getvalue(), time.perf_counter() - t0


def _statuses(report: str) -> dict[str, str]:
    return dict(re.findall(r"^\| (\w+) \| .* \| (reused|ran|resumed|rebuilt) \|$", report, re.M))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    runs = {}
    lr = ("--set", f"demo.flow_lr={2 * FLOW_LR!r}")
    sheets = lr + ("--set", "demo.sheet_videos=2")
    for name, extra in (("first", ()), ("again", ()), ("flow_lr", lr), ("sheets", sheets)):
        runs[name] = _demo(workdir, *extra) + ((workdir / "report.md").read_text(),)
        if name == "first":  # the later runs rebuild flow with another learning rate
            runs["first_flow_config"] = json.loads((workdir / "flow" / "config.json").read_text())
    return workdir, runs


def test_quick_demo_runs_every_phase_and_writes_the_report(quick_demo):
    workdir, runs = quick_demo
    rc, out, _, report = runs["first"]
    assert rc == 0, out[-3000:]
    for phase in PHASES:
        assert f"[{phase}] finished in" in out
        done = json.loads((workdir / phase / "DONE.json").read_text())
        assert done["seconds"] > 0 and isinstance(done["key"], str)
    assert re.search(r"\[vae\] step 2/2 \(100%\)", out) and re.search(r"\[flow\] step 2/2 \(100%\)", out)

    vae_cfg = json.loads((workdir / "vae" / "config.json").read_text())
    assert vae_cfg["train"]["steps"] == 2  # the quick size, set by demo.vae_steps
    vs = vae_cfg["stages"]["vae"]
    assert (vs["kernel_init"], vs["zero_init_residual"], vs["clip_frames"], vs["crop"]) == ("inflated", True, 1, 0)
    assert (vs["chroma_weight"], vs["kl_weight"]) == (QUICK.vae_chroma, QUICK.vae_kl)
    assert vae_cfg["model"]["vae"]["causal"]["norm_groups"] == 0  # the tiny-teacher preset
    vae = json.loads((workdir / "vae" / "DONE.json").read_text())["results"]
    assert set(vae["normalisation"]) == {"image_shift", "image_scale", "video_shift", "video_scale"}
    assert set(vae["metrics"]) >= {"loss", "psnr", "ssim", "kl"} and vae["end_step"] == 2
    assert len(list((workdir / "latents" / "records").glob("*.npz"))) == 48
    assert (workdir / "text" / "params.npz").is_file()
    flow_cfg = runs["first_flow_config"]
    assert flow_cfg["data"]["in_memory"] is True  # 48 small records: read once, not per step
    assert flow_cfg["optim"]["lr"] == FLOW_LR and flow_cfg["optim"]["ema_decay"] == QUICK.flow_ema
    for i in range(4):
        for suffix in (".mp4", ".gif", "_frames.png"):
            assert (workdir / "samples" / f"{i:03d}{suffix}").stat().st_size > 0
        meta = json.loads((workdir / "samples" / f"{i:03d}.json").read_text())
        assert meta["nfe"] > 0 and meta["nfe"] == meta["schedule"]["nfe_expected"]
    from neodragon_jax.eval.heldout import heldout_prompts

    captions = [json.loads(line)["text"] for line in (workdir / "samples" / "captions.jsonl").read_text().splitlines()]
    assert captions == heldout_prompts(4)  # the prompts every report of the project scores
    ev = json.loads((workdir / "eval" / "DONE.json").read_text())["results"]
    assert set(ev["scores"]) == {"renders", "vae_recon", "generated"}
    for sc in ev["scores"].values():
        assert set(sc["chance"]) >= {"colour", "motion"}  # beside every accuracy: its chance level
    assert ev["scores"]["renders"]["accuracy"]["colour"] >= 0.75  # the scorer on the renderer's own videos
    assert len(ev["psnr_per_video"]) == 4 and all(p > 0 for p in ev["psnr_per_video"])
    # The teacher beside a per-patch linear denoiser, per pyramid stage (48 records are enough to fit it).
    assert [r["stage"] for r in ev["flow_vs_linear"]] == [0, 1, 2]
    assert all(r["teacher"] > 0 and 0 < r["linear_baseline"] for r in ev["flow_vs_linear"])

    for section in ("## Headline", "## Phases", "## Scores", "## VAE", "## Flow teacher", "## Files"):
        assert section in report
    assert re.search(r"\| colour accuracy \(held-out prompts\) \| [\d.]+ \| [\d.]+ \| >= 0.6 \|", report)
    assert re.search(r"\| motion accuracy \(held-out prompts\) \| [\d.]+ \| [\d.]+ \| >= 0.4 \|", report)
    assert "| figure | this run | chance | target |  | shipped `tiny-teacher` |" in report
    assert "VAE reconstruction PSNR" in report
    assert ("| attribute | renders | chance | VAE reconstructions | chance | generated | chance |" in report)
    assert "| stage | latent | var(v*) | per-patch linear baseline | teacher |" in report
    for png in ("eval/generated_vs_render.png", "eval/vae_reconstructions.png"):
        assert f"]({png})" in report and (workdir / png).stat().st_size > 0
    assert _statuses(report) == dict.fromkeys(PHASES, "ran")
    assert "report: " in out and "PSNR" in out
    line = next(x for x in out.splitlines() if x.startswith("held-out prompts, generated (chance in brackets): "))
    for attr in ("colour", "shape", "motion"):
        assert re.search(rf"\b{attr} [\d.]+ \([\d.]+\)", line), line


def test_second_run_reuses_every_phase_and_says_so(quick_demo):
    _, runs = quick_demo
    t_first = runs["first"][2]
    rc, out, t_second, report = runs["again"]
    assert rc == 0, out[-3000:]
    for phase in PHASES:
        assert f"[{phase}] reused" in out and f"[{phase}] finished in" not in out
    assert "every phase was already complete: nothing rebuilt" in out
    assert t_second < 0.6 * t_first, (t_first, t_second)
    assert _statuses(report) == dict.fromkeys(PHASES, "reused")


def test_a_flow_setting_rebuilds_flow_and_what_follows_it(quick_demo):
    workdir, runs = quick_demo
    rc, out, _, report = runs["flow_lr"]
    assert rc == 0, out[-3000:]
    assert _statuses(report) == {"data": "reused", "vae": "reused", "text": "reused", "latents": "reused",
                                 "flow": "rebuilt", "samples": "rebuilt", "eval": "rebuilt"}
    change = f"{FLOW_LR!r} -> {2 * FLOW_LR!r}"
    assert f"[flow] rebuilding: config.optim.lr: {change}; settings.flow_lr: {change}" in out
    assert "[samples] rebuilding: input flow changed" in out and "[eval] rebuilding: input flow changed" in out
    assert json.loads((workdir / "flow" / "config.json").read_text())["optim"]["lr"] == 2 * FLOW_LR


def test_an_unrelated_setting_reuses_the_training_phases(quick_demo):
    workdir, runs = quick_demo
    rc, out, _, report = runs["sheets"]
    assert rc == 0, out[-3000:]
    assert _statuses(report) == {**dict.fromkeys(PHASES, "reused"), "eval": "rebuilt"}
    assert "[eval] rebuilding: settings.sheet_videos: 4 -> 2" in out


def test_config_keys_the_demo_sets_are_refused(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--quick", "--set", "optim.lr=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "demo.vae_lr (vae) and demo.flow_lr (flow)" in err
    assert main(["demo", "--workdir", str(tmp_path), "--quick", "--set", "stages.vae.crop=16"]) == 2
    assert "demo.vae_crop" in capsys.readouterr().err
    assert DEMO_KEYS["optim.lr"] and not list(tmp_path.iterdir())  # refused before any work


def test_settings_are_parsed_and_checked():
    s, rest = parse_settings(["demo.flow_steps=7 optim.b1=0.8", "demo.flow_lr=1", "checkpoint.keep_every=600"],
                             quick=False)
    assert s.flow_steps == 7 and s.flow_lr == 1.0 and rest == ["optim.b1=0.8", "checkpoint.keep_every=600"]
    assert parse_settings([], quick=True)[0].vae_steps < DemoSettings().vae_steps
    for bad, msg in (("demo.nope=1", "unknown demo setting"), ("demo.flow_steps=x", "expected int"),
                     ("demo.flow_steps=0", ">= 1"), ("demo.vae_init=xavier", "vae_init must be one of"),
                     ("demo.vae_zero_init=1", "expected bool"),
                     ("demo.flow_time_limit=-5", "flow_time_limit must be >= 0"),
                     ("demo.flow_decay_steps=-1", "flow_decay_steps must be >= 0"),
                     ("demo.vae_kl=-1", "vae_kl must be >= 0"), ("demo.flow_ema=1", r"flow_ema must be in \[0, 1\)"),
                     ("demo.eval_videos=1", "eval_videos must be >= 2"),
                     ("train.global_batch=8", "demo.vae_batch"), ("data.path=x", "the demo sets data.path")):
        with pytest.raises(Exception, match=msg):
            parse_settings([bad], quick=True)


@pytest.mark.parametrize("extra, msg", [
    (("--set", "demo.nope=1"), "unknown demo setting 'demo.nope'"),
    (("--set", "demo.vae_frames=7"), "demo.vae_frames=7"),
    (("--set", "demo.vae_crop=30"), "multiple of the VAE's spatial factor"),
    (("--set", "model.nope=1"), "config error"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, extra, msg):
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--quick", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.startswith("neodragon demo: ") and len(err.splitlines()) == 1, err


def test_default_demo_layout_fits_at_full_size():
    """The default (non-quick) demo config, traced without training: the tiny-teacher preset's 4x VAE gives
    8x8x8 latents of the 9-frame 32x32 clips, and the MMDiT takes every pyramid stage at the largest training
    layout (the last 4-frame unit with its history)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from neodragon_cli.demo import DEFAULT_CONFIG, DEMO_OVERRIDES
    from neodragon_jax.config import load_config
    from neodragon_jax.models.mmdit import PyramidMMDiT
    from neodragon_jax.models.vae import CausalVideoVAE
    from neodragon_jax.pyramid.loss import flow_matching_loss
    from neodragon_jax.pyramid.scheduler import make_schedule

    cfg = load_config(DEFAULT_CONFIG, list(DEMO_OVERRIDES))
    v = cfg.video
    vae_graph, vae_state = nnx.split(nnx.eval_shape(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0))))
    video = jax.ShapeDtypeStruct((1, 3, v.num_frames, v.height, v.width), jnp.float32)
    post = jax.eval_shape(lambda st, x: nnx.merge(vae_graph, st).encode(x).mean, vae_state, video)
    assert post.shape == (1, 8, 9, 8, 8)

    mm_graph, mm_state = nnx.split(nnx.eval_shape(lambda: PyramidMMDiT(cfg.model.mmdit, rngs=nnx.Rngs(0))))
    assert cfg.model.mmdit.hidden_size == 128
    t = cfg.model.text
    batch = {"latents": jax.ShapeDtypeStruct((2,) + post.shape[1:], jnp.float32),
             "text_tokens": jax.ShapeDtypeStruct((2, t.max_length, cfg.model.mmdit.context_in_dim), jnp.float32),
             "text_mask": jax.ShapeDtypeStruct((2, t.max_length), jnp.int32),
             "pooled": jax.ShapeDtypeStruct((2, cfg.model.mmdit.pooled_dim), jnp.float32)}
    sch = make_schedule(cfg.pyramid)
    for stage in range(sch.num_stages):
        loss, aux = jax.eval_shape(
            lambda st, b: flow_matching_loss(nnx.merge(mm_graph, st), b, jax.random.PRNGKey(0), schedule=sch,
                                             stage=stage, unit=2),
            mm_state, batch)
        assert loss.shape == () and aux["loss_per_sample"].shape == (2,)


def test_checkpoint_cadence_is_every_250_steps_or_20_a_run():
    assert [_checkpoint_every(n) for n in (2, 250, 600, 5000, 20000)] == [2, 250, 250, 250, 1000]


def test_report_says_where_a_time_limit_stopped_the_teacher():
    s = DemoSettings(flow_steps=9000, flow_time_limit=300.0)
    assert _flow_steps({"end_step": 9000}, s) == "9000"
    assert _flow_steps({"end_step": 4321}, s) == "4321 (of 9000; time limit 300 s)"
    assert _flow_steps({"steps": 4321}, s) == "4321 (of 9000; time limit 300 s)"  # a record of the older demo


def test_report_compares_with_the_shipped_release_when_there_is_one(tmp_path):
    """No release folder (a fresh clone before the teacher ships), a record without scores, and one with
    scores per schedule: the report's last column says which."""
    from neodragon_cli.demo import _shipped_cell, shipped_scores

    assert shipped_scores("tiny-teacher", root=tmp_path / "none") is None
    assert _shipped_cell(None, "colour") == "not shipped in this installation"
    rel = tmp_path / "tiny-teacher"
    rel.mkdir()
    (rel / "release.json").write_text(json.dumps({"name": "tiny-teacher", "preset": "tiny-teacher"}))
    assert shipped_scores("tiny-teacher", root=tmp_path) == {}
    assert _shipped_cell({}, "colour") == "no recorded score"
    scores = {"teacher": {"schedule": "4-4-4,4-4-4 cfg 7/5", "videos": 96, "accuracy": {"colour": 0.92, "motion": 0.81},
                          "chance": {"colour": 0.125, "motion": 0.11}},
              "1-1-1": {"videos": 96, "accuracy": {"colour": 0.5}, "chance": {"colour": 0.12}}}
    (rel / "release.json").write_text(json.dumps({"name": "tiny-teacher", "preset": "tiny-teacher", "scores": scores}))
    got = shipped_scores("tiny-teacher", root=tmp_path)
    assert got == scores
    assert _shipped_cell(got, "colour") == ("0.920 (chance 0.125) [teacher, 96 prompts]; "
                                            "0.500 (chance 0.120) [1-1-1, 96 prompts]")
    assert _shipped_cell(got, "motion") == "0.810 (chance 0.110) [teacher, 96 prompts]"
    (rel / "release.json").write_text("{not json")
    assert shipped_scores("tiny-teacher", root=tmp_path) is None  # a damaged record: no comparison, no crash


def test_demo_defaults_are_the_tiny_teacher_and_its_vae_recipe():
    from neodragon_cli.demo import DEFAULT_CONFIG
    from neodragon_jax.eval.heldout import HELDOUT_SEED

    s = DemoSettings()
    assert DEFAULT_CONFIG == "tiny-teacher"
    assert (s.vae_frames, s.vae_crop, s.vae_batch, s.vae_lr, s.vae_chroma, s.vae_kl) == (1, 0, 32, 4e-3, 1.0, 1e-3)
    assert s.eval_seed == HELDOUT_SEED  # the held-out prompts a release is scored on
