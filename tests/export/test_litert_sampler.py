"""The shipped Neodragon-tiny sampled through its exported LiteRT text encoders and light decoder: the graphs stand
in for the JAX models numerically, and `export --score-prompts` scores the result end to end beside the JAX
pipeline (fp32 graphs: the same judgements)."""

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("torch")
# Not importorskip: importing litert_torch turns on jax_enable_x64 process-wide (export/tflite.py scopes it).
if importlib.util.find_spec("litert_torch") is None:
    pytest.skip("litert_torch not installed", allow_module_level=True)
pytest.importorskip("ai_edge_litert")

from neodragon_cli.main import main  # noqa: E402

GRAPHS = "clip_l,clip_g,distil_t5,context_adapter,light_decoder"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    code = main(["export", "tflite", "--model", "neodragon-tiny", "--precision", "fp32", "--components", GRAPHS,
                 "--latency-runs", "0", "--score-prompts", "2", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.slow
def test_score_prompts_reports_the_litert_pipeline_beside_jax(exported):
    scores = json.loads((exported / "report.json").read_text())["litert_scores"]
    jax_row, fp32 = scores["rows"]
    assert jax_row["label"] == "JAX" and fp32["precision"] == "fp32" and scores["prompts"] == 2
    assert fp32["on_litert"] == sorted(GRAPHS.split(","))
    assert fp32["nfe"] == jax_row["nfe"] == 9  # 1-1-1 without guidance
    # fp32 graphs match the mirror to 1e-6: the videos are the JAX pipeline's up to rounding, judged the same
    assert fp32["psnr_vs_jax_db"] > 40
    assert fp32["change_points"] == {"colour": 0.0, "motion": 0.0} and fp32["within_tolerance"]
    assert "End to end through the exported graphs" in (exported / "report.md").read_text()


@pytest.mark.slow
def test_litert_pipeline_matches_the_jax_text_encoders_and_decoder(exported):
    import jax

    from export.litert_sampler import LiteRTPipeline, LiteRTScoreError
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline
    from neodragon_jax.releases import get_release

    rel = get_release("neodragon-tiny")
    pipe = TextToVideoPipeline.from_official(rel.folder, rel.config(), transformer=rel.transformer)
    lite = LiteRTPipeline.wrap(pipe, exported / "tflite", "fp32")
    prompts = ["a red square moving right on a white background", "a blue circle standing still on a black background"]
    want, got = pipe.encode_text(prompts), lite.encode_text(prompts)
    for a, b in zip(want, got):  # tokens, mask, pooled
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-4, atol=1e-4)
    latents = jax.random.normal(jax.random.key(0), (1, pipe.cfg.model.mmdit.in_channels, *pipe.latent_shape(9)))
    np.testing.assert_allclose(np.asarray(lite.decode(latents)), np.asarray(pipe.decode(latents)), atol=1e-4)
    with pytest.raises(LiteRTScoreError, match="no int8 graphs"):
        LiteRTPipeline.wrap(pipe, exported / "tflite", "int8")


def test_score_prompts_needs_trained_weights(capsys):
    assert main(["export", "tflite", "--config", "tiny", "--score-prompts", "4"]) == 2
    assert "--model or --checkpoint" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", "neodragon-tiny", "--score-prompts", "4"]) == 2
    assert main(["export", "tflite", "--model", "neodragon-tiny", "--score-prompts", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
