"""`neodragon demo --quick`: every phase runs and the report is written; a rerun reuses every phase and says
so; a workdir built with other settings and unknown settings are refused."""

import contextlib
import io
import json
import re
import time

import pytest

from neodragon_cli.demo import DemoSettings, _checkpoint_every, _flow_steps, parse_settings
from neodragon_cli.main import main

PHASES = ("data", "vae", "latents", "flow", "samples", "eval")


def _demo(workdir, *extra):
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = main(["demo", "--workdir", str(workdir), "--quick", "--compile-cache", "none", *extra])
    return rc, out.getvalue(), time.perf_counter() - t0


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    first = _demo(workdir) + ((workdir / "report.md").read_text(),)
    second = _demo(workdir) + ((workdir / "report.md").read_text(),)
    return workdir, first, second


def test_quick_demo_runs_every_phase_and_writes_the_report(quick_demo):
    workdir, (rc, out, _, report), _ = quick_demo
    assert rc == 0, out[-3000:]
    for phase in PHASES:
        assert f"[{phase}] finished in" in out
        done = json.loads((workdir / phase / "DONE.json").read_text())
        assert done["seconds"] > 0
    assert re.search(r"\[vae\] step 2/2 \(100%\)", out) and re.search(r"\[flow\] step 2/2 \(100%\)", out)

    vae_key = json.loads((workdir / "vae" / "DONE.json").read_text())["key"]
    assert vae_key["vae_steps"] == 2  # the quick size
    assert vae_key["vae_init"] == "inflated" and vae_key["vae_zero_init"] is True
    assert vae_key["model.vae"]["causal"]["norm_groups"] == 0
    vae = json.loads((workdir / "vae" / "DONE.json").read_text())["results"]
    assert set(vae["normalisation"]) == {"image_shift", "image_scale", "video_shift", "video_scale"}
    assert set(vae["train_metrics"]) >= {"loss", "psnr", "ssim", "kl"}
    assert len(list((workdir / "latents" / "records").glob("*.npz"))) == 48
    assert (workdir / "text" / "params.npz").is_file()
    flow_cfg = json.loads((workdir / "flow" / "config.json").read_text())
    assert flow_cfg["data"]["in_memory"] is True  # 48 small records: read once, not per step
    for i in range(4):
        assert (workdir / "samples" / f"{i:03d}.mp4").stat().st_size > 0
        meta = json.loads((workdir / "samples" / f"{i:03d}.json").read_text())
        # 9 latent frames with frames_per_unit=8: the first frame, then one 8-frame unit
        assert meta["nfe"] > 0 and meta["nfe"] == meta["schedule"]["nfe_expected"]
    ev = json.loads((workdir / "eval" / "DONE.json").read_text())["results"]
    assert set(ev["scores"]) == {"renders", "vae_recon", "generated"}
    assert ev["scores"]["renders"]["accuracy"]["colour"] >= 0.75  # the scorer on the renderer's own videos
    assert len(ev["psnr_per_video"]) == 4 and all(p > 0 for p in ev["psnr_per_video"])
    # The teacher beside a per-patch linear denoiser, per pyramid stage (48 records are enough to fit it).
    assert [r["stage"] for r in ev["flow_vs_linear"]] == [0, 1, 2]
    assert all(r["teacher"] > 0 and 0 < r["linear_baseline"] for r in ev["flow_vs_linear"])

    for section in ("## Headline", "## Phases", "## Scores", "## VAE", "## Flow teacher", "## Files"):
        assert section in report
    assert "colour accuracy (held-out prompts)" in report and "motion accuracy (held-out prompts)" in report
    assert "VAE reconstruction PSNR" in report and "| renders | VAE reconstructions | generated |" in report
    assert "| stage | latent | var(v*) | per-patch linear baseline | teacher |" in report
    for png in ("eval/generated_vs_render.png", "eval/vae_reconstructions.png"):
        assert f"]({png})" in report and (workdir / png).stat().st_size > 0
    for phase in PHASES:
        assert re.search(rf"\| {phase} \| .* \| ran \|", report), phase
    assert "report: " in out and "PSNR" in out


def test_second_run_reuses_every_phase_and_says_so(quick_demo):
    workdir, (_, _, t_first, _), (rc, out, t_second, report) = quick_demo
    assert rc == 0, out[-3000:]
    for phase in PHASES:
        assert f"[{phase}] done already" in out
        assert f"[{phase}] finished in" not in out
    assert "every phase was already complete: nothing rebuilt" in out
    assert t_second < 0.6 * t_first, (t_first, t_second)
    for phase in PHASES:
        assert re.search(rf"\| {phase} \| .* \| reused \|", report), phase


def test_a_workdir_built_with_other_settings_is_refused(quick_demo, capsys):
    workdir = quick_demo[0]
    rc = main(["demo", "--workdir", str(workdir), "--quick", "--compile-cache", "none", "--set", "demo.vae_steps=3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "vae_steps" in err and "other settings" in err and str(workdir / "vae") in err


def test_settings_are_parsed_and_checked():
    s, rest = parse_settings(["demo.flow_steps=7 optim.b1=0.8", "demo.flow_lr=1"], quick=False)
    assert s.flow_steps == 7 and s.flow_lr == 1.0 and rest == ["optim.b1=0.8"]
    assert parse_settings([], quick=True)[0].vae_steps < DemoSettings().vae_steps
    for bad, msg in (("demo.nope=1", "unknown demo setting"), ("demo.flow_steps=x", "expected int"),
                     ("demo.flow_steps=0", ">= 1"), ("demo.vae_init=xavier", "vae_init must be one of"),
                     ("demo.vae_zero_init=1", "expected bool"), ("demo.flow_time_limit=-5", "flow_time_limit must be >= 0"),
                     ("demo.flow_decay_steps=-1", "flow_decay_steps must be >= 0")):
        with pytest.raises(Exception, match=msg):
            parse_settings([bad], quick=True)


def test_unknown_setting_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--quick", "--set", "demo.nope=1"]) == 2
    assert "unknown demo setting 'demo.nope'" in capsys.readouterr().err


def test_default_demo_layout_fits_at_full_size():
    """The default (non-quick) demo config, traced without training: a 4x VAE gives 16x16x16 latents of the
    17-frame clips, and the MMDiT (positional table = the finest 8x8 patch grid) takes every pyramid stage at the
    largest training layout (the last 8-frame unit with its history)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from neodragon_cli.demo import DEMO_OVERRIDES
    from neodragon_jax.config import load_config
    from neodragon_jax.models.mmdit import PyramidMMDiT
    from neodragon_jax.models.vae import CausalVideoVAE
    from neodragon_jax.pyramid.loss import flow_matching_loss
    from neodragon_jax.pyramid.scheduler import make_schedule

    cfg = load_config("tiny", list(DEMO_OVERRIDES))
    v = cfg.video
    vae_graph, vae_state = nnx.split(nnx.eval_shape(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0))))
    video = jax.ShapeDtypeStruct((1, 3, v.num_frames, v.height, v.width), jnp.float32)
    post = jax.eval_shape(lambda st, x: nnx.merge(vae_graph, st).encode(x).mean, vae_state, video)
    assert post.shape == (1, 16, 17, 16, 16)

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
    assert _flow_steps({"steps": 9000}, s) == "9000"
    assert _flow_steps({"steps": 4321}, s) == "4321 (of 9000; time limit 300 s)"
    assert _flow_steps({}, DemoSettings(flow_steps=50)) == "50"  # a DONE.json written before steps were recorded
