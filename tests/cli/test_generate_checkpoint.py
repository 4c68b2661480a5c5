"""`neodragon generate --checkpoint` / ``TextToVideoPipeline.from_official`` on bad folders and on folders whose
config.json disagrees with the preset (issue 23 items 1 and 6).

The folders are written without PyTorch: random non-zero weights through the official key maps, the
``config.json`` our exporter writes for the MMDiT and the VAE, and the shipped tiny tokenizers.
"""

import dataclasses
import json
import shutil

import pytest
from flax import nnx

from export.convert import mmdit_config_json, random_weights, torch_state_dict, vae_config_json
from neodragon_cli.main import main
from neodragon_jax.config import load_config
from neodragon_jax.convert.io import CheckpointNotFoundError, CheckpointReadError, write_safetensors
from neodragon_jax.models.mmdit import PyramidMMDiT
from neodragon_jax.models.text.conditioner import TextConditioner
from neodragon_jax.models.text.tokenizers import shipped_tokenizer_dir
from neodragon_jax.models.vae import CausalVideoVAE
from neodragon_jax.pipelines.official import OfficialConfigMismatch, check_official_folder
from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

TINY = load_config("tiny")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def write_tiny_folder(out, cfg=TINY):
    """A teacher-layout folder for ``cfg`` (tiny sizes): tokenizer*/, text_encoder*/ (CLIP-L, CLIP-G, T5),
    diffusion_transformer_320p/ and causal_video_vae/ with config.json."""

    def make(ctor, seed):
        return random_weights(nnx.eval_shape(ctor), seed)

    text = make(lambda: TextConditioner(cfg.model.text, rngs=nnx.Rngs(0)), 0)
    mmdit = make(lambda: PyramidMMDiT(cfg.model.mmdit, rngs=nnx.Rngs(0)), 1)
    vae = make(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0)), 2)
    for name, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        write_safetensors(torch_state_dict(getattr(text, name)), out / folder / "model.safetensors")
    write_safetensors(torch_state_dict(mmdit), out / "diffusion_transformer_320p" / WEIGHTS)
    (out / "diffusion_transformer_320p" / "config.json").write_text(json.dumps(mmdit_config_json(mmdit.cfg)))
    write_safetensors(torch_state_dict(vae), out / "causal_video_vae" / WEIGHTS)
    (out / "causal_video_vae" / "config.json").write_text(json.dumps(vae_config_json(vae.cfg, vae.decoder_kind)))
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(shipped_tokenizer_dir("tiny") / sub, out / sub)
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("ckpt") / "model")


def _generate(args, tmp_path, capsys):
    rc = main(["generate", "p", "--config", "tiny", "--out", str(tmp_path / "v.mp4"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# ---- item 1: missing, empty, truncated, corrupted --------------------------------------------------------------


def test_missing_folder(tmp_path, capsys):
    rc, err = _generate(["--checkpoint", str(tmp_path / "nope")], tmp_path, capsys)
    assert rc == 2
    assert f"checkpoint folder '{tmp_path / 'nope'}' does not exist" in err
    assert "expected the official Pyramid Flow SD3 layout: tokenizer/" in err


def test_empty_folder_names_the_layout_not_tokenizer_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = _generate(["--checkpoint", str(tmp_path / "empty")], tmp_path, capsys)
    assert rc == 2
    assert f"checkpoint folder '{tmp_path / 'empty'}' is empty" in err
    assert "causal_video_vae/" in err and "tokenizer_dir" not in err
    assert len(err.strip().splitlines()) == 1


def test_incomplete_folder_lists_everything_missing(tmp_path, good):
    partial = tmp_path / "partial"
    shutil.copytree(good, partial)
    shutil.rmtree(partial / "text_encoder_2")
    shutil.rmtree(partial / "causal_video_vae")
    with pytest.raises(CheckpointNotFoundError, match=r"lacks text_encoder_2/, causal_video_vae/"):
        TextToVideoPipeline.from_official(partial, TINY)
    (partial / "context_adapter").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="looks like a Neodragon folder"):
        check_official_folder(partial, "teacher")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_are_named(tmp_path, capsys, good, damage):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    target = bad / "text_encoder_2" / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 16 + data[16:])
    rc, err = _generate(["--checkpoint", str(bad)], tmp_path, capsys)
    assert rc == 2
    assert str(target) in err and "truncated or corrupted" in err
    with pytest.raises(CheckpointReadError, match="text_encoder_2/model.safetensors"):
        check_official_folder(bad, "teacher")


def test_good_folder_loads(good):
    pipe = TextToVideoPipeline.from_official(good, TINY)
    assert not pipe.random_weights and pipe.cfg.model == dataclasses.replace(
        TINY.model, text=dataclasses.replace(TINY.model.text, tokenizer_dir=str(good)))


# ---- item 6: config.json against the preset --------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_groups(tmp_path_factory):
    """A checkpoint whose VAE has 8 norm groups: the tiny preset says 4 and no weight shape depends on it."""
    causal = dataclasses.replace(TINY.model.vae.causal, norm_groups=8)
    cfg = dataclasses.replace(TINY, model=dataclasses.replace(
        TINY.model, vae=dataclasses.replace(TINY.model.vae, causal=causal),
        mmdit=dataclasses.replace(TINY.model.mmdit, norm_eps=1e-5)))
    return write_tiny_folder(tmp_path_factory.mktemp("ckpt8") / "model", cfg)


def test_preset_contradicting_config_json_is_refused(tmp_path, capsys, eight_groups):
    """It loaded silently (60-86% relative output error for the VAE): now every field is named."""
    with pytest.raises(OfficialConfigMismatch) as e:
        TextToVideoPipeline.from_official(eight_groups, TINY)
    assert [f[0] for f in e.value.fields] == ["model.mmdit.norm_eps", "model.vae.causal.norm_groups"]
    msg = str(e.value)
    assert "model.vae.causal.norm_groups is 4 in the config, 8 in causal_video_vae/config.json" in msg
    assert "model.mmdit.norm_eps is 1e-06 in the config, 1e-05 in diffusion_transformer_320p/config.json" in msg
    assert "--set model.vae.causal.norm_groups=8" in msg

    rc, err = _generate(["--checkpoint", str(eight_groups)], tmp_path, capsys)
    assert rc == 2 and "causal_video_vae/config.json" in err and len(err.strip().splitlines()) == 1


def test_matching_config_loads_and_keeps_runtime_settings(eight_groups):
    cfg = load_config("tiny", ["model.vae.causal.norm_groups=8", "model.mmdit.norm_eps=1e-5",
                               "model.mmdit.scan_blocks=true"])
    pipe = TextToVideoPipeline.from_official(eight_groups, cfg)
    assert pipe.vae.cfg.causal.norm_groups == 8 and pipe.cfg.model.vae.causal.norm_groups == 8
    assert pipe.mmdit.cfg.norm_eps == 1e-5
    assert pipe.cfg.model.mmdit.scan_blocks is True  # how to run, not what the checkpoint is: the config's


def test_official_config_without_our_entry_is_read(tmp_path, good):
    """The release's config.json (no _neodragon_jax entry): the official field names are mapped."""
    folder = tmp_path / "official"
    shutil.copytree(good, folder)
    path = folder / "causal_video_vae" / "config.json"
    j = json.loads(path.read_text())
    del j["_neodragon_jax"]
    j["encoder_norm_num_groups"] = 2
    path.write_text(json.dumps(j))
    with pytest.raises(OfficialConfigMismatch, match="model.vae.causal.norm_groups is 4 in the config, 2 in"):
        TextToVideoPipeline.from_official(folder, TINY)
    pipe = TextToVideoPipeline.from_official(folder, load_config("tiny", ["model.vae.causal.norm_groups=2"]))
    assert pipe.vae.cfg.causal.norm_groups == 2
    path.write_text("{not json")
    with pytest.raises(CheckpointReadError, match="causal_video_vae/config.json: not valid JSON"):
        TextToVideoPipeline.from_official(folder, TINY)


def test_config_json_contradiction_and_misshaped_weights_exit_2(tmp_path, capsys, good):
    rc, err = _generate(["--checkpoint", str(good), "--set", "model.mmdit.head_dim=8"], tmp_path, capsys)
    assert rc == 2 and "model.mmdit.head_dim is 8 in the config, 16 in" in err
    # without a config.json to compare with, the strict key maps refuse the shapes: still exit 2, no traceback
    bare = tmp_path / "bare"
    shutil.copytree(good, bare)
    (bare / "diffusion_transformer_320p" / "config.json").unlink()
    rc, err = _generate(["--checkpoint", str(bare), "--set", "model.mmdit.head_dim=8"], tmp_path, capsys)
    assert rc == 2 and "does not fit config 'tiny'" in err and "mis-shaped keys" in err
