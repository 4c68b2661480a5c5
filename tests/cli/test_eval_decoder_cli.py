"""`neodragon train decoder` -> `neodragon eval decoder` on a tiny run: a small random VAE written as an
official folder is the frozen encoder and the native baseline, a light decoder trains for two steps, and the
evaluation writes its report (per-frame PSNR / SSIM, streaming against whole-clip decoding, timings, sizes,
contact sheet); missing runs, releases and teachers are one line with exit status 2."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

import neodragon_jax.releases as releases
from neodragon_cli.main import main
from neodragon_jax.config import load_config, to_json
from neodragon_jax.convert.io import write_safetensors
from neodragon_jax.convert.vae import pf_vae_keymap
from neodragon_jax.models.build import init_jit
from train.vae import VAEStage
from train.weights import flatten

# The tiny teacher's VAE layout (4x spatial, no temporal compression, light decoder 4x / 1x) at test size:
# 16x16 frames, 3 of them (frame 0 and two later frames: both normalisation constants).
SMALL = ["model.vae.causal.latent_channels=4", "model.vae.causal.block_out_channels=[8,8]",
         "model.vae.causal.spatial_down=[true,true]", "model.vae.causal.temporal_down=[false,false]",
         "model.vae.causal.norm_groups=0", 'model.vae.decoder="native"', "model.vae.light_decoder.latent_channels=4",
         "model.vae.light_decoder.channels=[8,8]", "model.vae.light_decoder.blocks_per_stage=1",
         "model.vae.light_decoder.spatial_upscale=[true,true]",
         "model.vae.light_decoder.temporal_upscale=[false,false]",
         "video.height=16", "video.width=16", "video.num_frames=3",
         "train.peak_flops=1e9", "train.tensorboard=false", "train.log_every=1", "data.num_synthetic=8",
         "optim.warmup_steps=0"]


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def _official_vae(folder):
    """A random VAE (the vae stage's init: informative latents) as an official causal_video_vae folder."""
    cfg = load_config("tiny", SMALL)
    vae = init_jit(lambda: VAEStage(cfg)._vae(cfg, nnx.Rngs(5)))
    flat = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(vae, nnx.Param))).items()}
    (folder / "causal_video_vae").mkdir(parents=True)
    write_safetensors(pf_vae_keymap(cfg.model.vae).to_torch(flat),
                      folder / "causal_video_vae" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_train_then_eval_decoder_and_one_line_errors(tmp_path, capsys, monkeypatch):
    # The default VAE source is the shipped tiny-teacher release: absent, training stops at once in one line.
    monkeypatch.setattr(releases, "RELEASES_DIR", tmp_path / "no-releases")
    rc = main(["train", "decoder", "--config", "tiny", "--steps", "1", "--workdir", str(tmp_path / "w0"),
               *_sets(SMALL)])
    err = capsys.readouterr().err
    assert rc == 2 and "no release named 'tiny-teacher'" in err and "official:DIR" in err, err
    assert len(err.strip().splitlines()) == 1

    _official_vae(tmp_path / "vae")
    run = tmp_path / "run"
    rc = main(["train", "decoder", "--config", "tiny", "--steps", "2", "--batch", "8", "--workdir", str(run),
               "--compile-cache", "none", *_sets(SMALL + [f'stages.decoder.vae="official:{tmp_path / "vae"}"'])])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()

    # Bad input: no run, a smoke run against a random VAE (its encoder was never saved), --prompts 1, a
    # missing teacher (checked before any decoding), an unreadable --data folder.
    smoke = tmp_path / "smoke"
    smoke.mkdir()
    (smoke / "config.json").write_text(to_json(load_config("tiny", SMALL + [
        "train.stage=decoder", 'stages.decoder.vae="random"'])))
    for argv, want in [
        (["--run", str(smoke)], "trained against a random VAE"),
        (["--run", str(tmp_path / "nowhere")], "is not a training run folder"),
        (["--run", str(run), "--prompts", "1"], "--prompts 0"),
        (["--run", str(run)], "no release named 'tiny-teacher'"),  # the default teacher, absent here
        (["--run", str(run), "--teacher", str(tmp_path / "nope")], "no such folder"),
        (["--run", str(run), "--prompts", "0", "--data", str(tmp_path / "no-videos")], "--data"),
    ]:
        assert main(["eval", "decoder", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert want in err and len(err.strip().splitlines()) == 1, (argv, err)

    assert main(["eval", "decoder", "--run", str(run), "--videos", "3", "--repeats", "2", "--prompts", "0"]) == 0
    printed = capsys.readouterr().out
    assert "whole clip" in printed and "streaming vs whole clip" in printed
    r = json.loads((run / "eval" / "report.json").read_text())
    assert r["family"] == "light" and r["videos"] == 3 and r["weights"] == "raw"
    assert r["params"]["native"] > 0 and r["params"]["light"] > 0
    assert r["param_ratio"] == r["params"]["native"] / r["params"]["light"]
    assert all(t > 0 for t in r["decode_seconds_per_video"].values())
    # LightDecoder.step, one latent frame a call, decodes what the whole-clip pass does.
    assert r["stream_max_abs_diff"] < 1e-4
    for k in ("native", "light"):
        assert len(r["per_frame"][k]["psnr"]) == 3 and len(r["per_frame"][k]["ssim"]) == 3
        assert 0 < r["whole_clip"][k]["psnr"] < 100 and -1 <= r["whole_clip"][k]["ssim"] <= 1
    assert r["scores"] is None and "skipped" in r["teacher"]
    report = (run / "eval" / "report.md").read_text()
    assert "Reconstruction per frame position" in report and "reconstructions.png" in report
    assert (run / "eval" / "reconstructions.png").stat().st_size > 0

    # The scorer's part with a stand-in teacher (a real one is minutes of CPU): its "generated" latents,
    # normalised as a pipeline returns them, go through both decoders, are scored against their prompts and
    # beside the chance level, and land in the report with their own sheet.
    from neodragon_cli import eval_decoder
    from neodragon_jax.config import from_json

    cfg = from_json((run / "config.json").read_text())
    asked = []

    class StandIn:
        def __init__(self):
            self.cfg = cfg

        def generate(self, request):
            asked.append(request.prompt)
            z = np.random.default_rng(request.seed).normal(size=(4, 3, 4, 4)).astype(np.float32)
            return SimpleNamespace(latents=z)

    monkeypatch.setattr(eval_decoder, "_teacher", lambda spec, c: (StandIn(), "stand-in"))
    assert main(["eval", "decoder", "--run", str(run), "--videos", "2", "--repeats", "1", "--prompts", "3",
                 "--out", str(tmp_path / "ev2")]) == 0
    capsys.readouterr()
    r = json.loads((tmp_path / "ev2" / "report.json").read_text())
    assert len(asked) == 3 and len(set(asked)) > 1 and r["teacher"] == "stand-in"
    for k in ("native", "light"):
        sc = r["scores"][k]
        assert set(sc["accuracy"]) >= {"colour", "shape"} and set(sc["chance"]) >= {"colour", "shape"}
        assert all(0.0 <= v <= 1.0 for v in sc["accuracy"].values()) and 0.0 <= sc["all_correct"] <= 1.0
    report = (tmp_path / "ev2" / "report.md").read_text()
    assert "Strict scorer on the teacher's generated videos (stand-in, 3 held-out prompts)" in report
    assert (tmp_path / "ev2" / "generated.png").stat().st_size > 0
