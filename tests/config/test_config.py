"""Config schema, presets and dotted overrides."""

import dataclasses

import pytest

from neodragon_jax.config import (
    Config,
    ConfigError,
    available_presets,
    from_json,
    load_config,
    to_json,
    valid_keys,
)


def test_presets_exist_and_load():
    assert {"tiny", "neodragon-320p", "pyramid-flow-sd3-320p"} <= set(available_presets())
    for name in available_presets():
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert cfg.name == name


def test_full_size_presets_describe_the_two_families():
    teacher = load_config("pyramid-flow-sd3-320p")
    student = load_config("neodragon-320p")
    assert (teacher.model.mmdit.num_layers, teacher.model.mmdit.context_in_dim) == (24, 4096)
    assert (student.model.mmdit.num_layers, student.model.mmdit.context_in_dim) == (18, None)
    assert teacher.model.text.kind == "teacher" and student.model.text.kind == "neodragon"
    assert teacher.model.text.token_dim == 4096 and student.model.text.token_dim == 1536
    assert student.model.text.pooled_dim == teacher.model.text.pooled_dim == 2048
    assert student.model.vae.decoder == "light" and teacher.model.vae.decoder == "native"
    # Neodragon decodes later frames with 0.3031, Pyramid Flow with 1/3.0986 (spec §5.1, open question 3).
    assert student.model.vae.causal.video_scale == pytest.approx(0.3031)
    assert teacher.model.vae.causal.video_scale == pytest.approx(0.3227)


def test_dotted_overrides_apply_and_coerce():
    cfg = load_config(
        "tiny",
        ["model.mmdit.num_layers=3", "precision.dtype=bfloat16", "pyramid.stage_sample_ratios=[1, 1, 1]",
         "pyramid.gamma=1", "model.mmdit.context_in_dim=none"],
    )
    assert cfg.model.mmdit.num_layers == 3
    assert cfg.precision.dtype == "bfloat16"
    assert cfg.pyramid.stage_sample_ratios == (1, 1, 1)
    assert cfg.pyramid.gamma == 1.0 and isinstance(cfg.pyramid.gamma, float)
    assert cfg.model.mmdit.context_in_dim is None


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["model.mmdit.num_blocks=3"])
    msg = str(e.value)
    assert "model.mmdit.num_blocks" in msg and "model.mmdit.num_layers" in msg


def test_unknown_key_names_near_matches_first_not_every_key():
    """It printed all ~170 leaf keys (issue 23 item 8): now the near matches, then the section's keys."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["model.vae.causal.norm_group=8"])
    msg = str(e.value)
    assert msg.startswith("unknown config key 'model.vae.causal.norm_group'. Did you mean "
                          "model.vae.causal.norm_groups")
    assert "optim.lr" not in msg and "train.steps" not in msg and len(msg) < 800
    with pytest.raises(ConfigError, match=r"'model.num_layers'. Did you mean model.mmdit.num_layers"):
        load_config("tiny", ["model.num_layers=3"])
    with pytest.raises(ConfigError, match=r"'modl.mmdit.num_layers'. Did you mean model.mmdit.num_layers"):
        load_config("tiny", ["modl.mmdit.num_layers=3"])
    with pytest.raises(ConfigError, match=r"'nosuch'\. Keys under the root: name, model, "):
        load_config("tiny", ["nosuch=1"])


def test_wrong_types_are_refused():
    with pytest.raises(ConfigError, match="expected an int"):
        load_config("tiny", ["model.mmdit.num_layers=three"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("tiny", ["precision.dtype=float64"])
    with pytest.raises(ConfigError, match="expected a list"):
        load_config("tiny", ["pyramid.stage_sample_ratios=3"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config("tiny", ["model.mmdit=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config("tiny", ["model.mmdit.num_layers"])


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        load_config("nope")


def test_json_round_trip_is_exact():
    cfg = load_config("pyramid-flow-sd3-320p", ["model.mmdit.teacher_block_indices=[0, 2, 23]"])
    again = from_json(to_json(cfg))
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_valid_keys_cover_nested_sections():
    keys = valid_keys()
    assert "model.text.distil_t5.body.d_model" in keys
    assert "model.vae.causal.video_scale" in keys


def test_preset_file_with_base(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('base = "tiny"\n[model.mmdit]\nnum_layers = 2\n')
    cfg = load_config(p)
    assert cfg.name == "mine"
    assert cfg.model.mmdit.num_layers == 2
    assert cfg.model.mmdit.head_dim == load_config("tiny").model.mmdit.head_dim
    bad = tmp_path / "bad.toml"
    bad.write_text("[model.mmdit\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
