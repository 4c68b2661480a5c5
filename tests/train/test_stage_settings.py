"""Typed stage settings (``cfg.stages.<name>``) from the one stage registry: overrides, refusals, records,
and `neodragon train --help` listing every trainable stage."""

import json

import pytest

from neodragon_jax.config import ConfigError, from_json, load_config, to_json
from train import registry  # noqa: F401 - registers the stages' settings
from train.loop import with_stage_settings
from train.vae import VAESettings, VAEStage


def test_settings_are_config_keys_that_reach_the_stage():
    cfg = load_config("tiny", ["stages.vae.crop=32", "stages.vae.kernel_init=inflated", "stages.vae.ssim_weight=0"])
    assert isinstance(cfg.stages.vae, VAESettings) and cfg.stages.vae.crop == 32
    stage = VAEStage(cfg)
    assert stage.crop == 32 and stage.kernel_init == "inflated" and stage.weights.ssim == 0.0
    # The stage's own arguments win, and what is in force is what a run records.
    stage = VAEStage(cfg, crop=16)
    recorded = json.loads(to_json(with_stage_settings(cfg, stage)))["stages"]["vae"]
    assert recorded["crop"] == 16 and recorded["kernel_init"] == "inflated"
    assert load_config("tiny").stages.vae == VAESettings()  # defaults when never set
    assert load_config("tiny").stages.flow.init == ""


def test_unknown_stage_or_field_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown stage 'nosuch' in 'stages.nosuch'; stages with settings: "
                                          r"decoder, dmd, flow, recover-distill, recover-flow, text-distill, toy, toy_distill, vae"):
        load_config("tiny", ["stages.nosuch.crop=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'stages.vae.crp'. Did you mean stages.vae.crop"):
        load_config("tiny", ["stages.vae.crp=1"])
    with pytest.raises(ConfigError, match=r"stages.vae.crop: expected an int"):
        load_config("tiny", ["stages.vae.crop=big"])


def test_settings_survive_the_json_record():
    cfg = load_config("tiny", ["stages.dmd.fake_updates=3", "stages.dmd.generator_blocks=[0, 1]"])
    again = from_json(to_json(cfg))
    assert again == cfg and again.stages.dmd.generator_blocks == (0, 1)
    # A record naming a stage this process does not know is still read (kept as written).
    tree = json.loads(to_json(cfg))
    tree["stages"]["elsewhere"] = {"alpha": 1}
    assert json.loads(to_json(from_json(json.dumps(tree))))["stages"]["elsewhere"] == {"alpha": 1}
    assert load_config("tiny", ["stages.vae.crop=0"]) == load_config("tiny")  # defaults compare equal


def test_train_help_lists_every_trainable_stage_from_the_registry(capsys):
    from neodragon_cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after a name's hyphen
    for name in ("flow (", "vae (", "toy (", "toy_distill (", "dmd (", "recover-flow (", "recover-distill ("):
        assert name in out
    assert "dmd_plan" not in out and "stages.STAGE.FIELD" in out
