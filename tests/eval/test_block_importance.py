"""Block importance: an identity block scores zero on both modalities through the real sampler (CFG branches
included), the last block has no text score, and the selection rules keep the last block."""

import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.convert.io import assign_params, param_arrays
from neodragon_jax.eval.block_importance import (
    Importance,
    ImportanceAccumulator,
    measure_importance,
    plot_importance,
    rank_correlation,
    select_blocks,
)


def randomise(model, seed=0, zero_blocks=()):
    """Every parameter non-zero (the from-scratch init zeroes AdaLN, which makes every block the identity);
    blocks in ``zero_blocks`` made the identity by zeroing their AdaLN modulation (all gates 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in param_arrays(model).items():
        if k.endswith("scale"):
            out[k] = (1.0 + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
        else:
            out[k] = (rng.standard_normal(v.shape) * 1.5 / np.sqrt(v.shape[-1] if v.ndim else 1)).astype(v.dtype)
        for b in zero_blocks:
            if k.startswith((f"transformer_blocks.{b}.norm1.", f"transformer_blocks.{b}.norm1_context.")):
                out[k] = np.zeros_like(v)
    assign_params(model, out)
    return model


@pytest.fixture(scope="module")
def pipe():
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

    cfg = load_config("tiny", ["video.num_frames=9"])
    p = TextToVideoPipeline.random(cfg, seed=0)
    randomise(p.mmdit, zero_blocks=(1,))
    return p


def test_identity_block_scores_zero_on_both_modalities_over_both_cfg_branches(pipe, tmp_path):
    imp = measure_importance(pipe, ["a red circle moving left", "a blue square"], samples_per_prompt=2,
                             first_unit_steps=(1, 1, 1), later_unit_steps=(2, 1, 1), cfg_scales=(3.0, 2.0))
    n = len(pipe.mmdit.transformer_blocks)
    assert len(imp.visual) == len(imp.text) == n
    assert abs(imp.visual[1]) < 1e-7 and abs(imp.text[1]) < 1e-7, (imp.visual, imp.text)
    assert all(v > 1e-5 for i, v in enumerate(imp.visual) if i != 1), imp.visual
    assert all(t > 1e-5 for i, t in enumerate(imp.text[:-1]) if i != 1), imp.text
    assert imp.text[-1] is None  # the context_pre_only last block has no text output
    assert set(imp.by_branch) == {"cond", "uncond"}
    # 2 latent units (first 1-1-1, later 2-1-1) x 4 videos: one model call per Euler step (CFG is one call).
    assert imp.calibration["model_calls"] == 4 * (3 + 4)
    assert imp.teacher_indices == list(range(n))
    back = Importance.read(imp.write(tmp_path / "imp.json"))
    assert back == imp
    assert plot_importance(imp, tmp_path / "imp.png").stat().st_size > 1000


def test_accumulator_splits_cfg_rows_and_weights_text_by_valid_tokens():
    acc = ImportanceAccumulator(2, batch=1)
    img = np.array([[10.0, 4.0], [5.0, 5.0]])  # [K, rows]: rows 0 = uncond, 1 = cond
    txt = np.array([[1.0, 3.0], [0.0, 0.0]])
    acc.add(img, np.array([10.0, 10.0]), txt, np.array([1.0, 3.0]))
    v, t = acc.importance(("cond",))
    np.testing.assert_allclose(v, [1 - 4 / 10, 1 - 5 / 10])
    assert t[0] == pytest.approx(0.0) and np.isnan(t[1])
    v, t = acc.importance()
    np.testing.assert_allclose(v, [1 - 14 / 20, 1 - 10 / 20])
    assert t[0] == pytest.approx(1 - 4 / 4)


def _imp(visual, text):
    return Importance(list(range(len(visual))), visual, text, {}, rank_correlation(visual, text), {})


def test_selection_rules_always_keep_the_last_block():
    imp = _imp([0.5, 0.1, 0.3, 0.2, 0.01], [0.9, 0.8, 0.05, 0.7, None])
    assert select_blocks(imp, 5, remove=1, rule="visual") == (0, 2, 3, 4)  # block 4 is lowest but kept
    assert select_blocks(imp, 5, remove=2, rule="visual") == (0, 2, 4)
    assert select_blocks(imp, 5, remove=1, rule="text") == (0, 1, 3, 4)
    # combined, each score over its maximum: block 1 = .5*.2 + .5*.889 = .544, block 2 = .5*.6 + .5*.056 = .328
    assert select_blocks(imp, 5, remove=1, rule="combined", text_weight=0.5) == (0, 1, 3, 4)
    assert select_blocks(imp, 5, remove=1, rule="combined", text_weight=0.0) == (0, 2, 3, 4)
    assert select_blocks(None, 5, rule="explicit", explicit=(4, 0, 2)) == (0, 2, 4)
    with pytest.raises(ValueError, match="last block"):
        select_blocks(None, 5, rule="explicit", explicit=(0, 1))
    with pytest.raises(ValueError, match="needs an importance file"):
        select_blocks(None, 5, remove=1, rule="visual")
    with pytest.raises(ValueError, match="remove must be"):
        select_blocks(imp, 5, remove=5, rule="visual")
    with pytest.raises(ValueError, match="scores 5 blocks"):
        select_blocks(imp, 6, remove=1, rule="visual")


def test_rank_correlation_is_spearman_over_blocks_with_both_scores():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, None]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2], [1, 2]) is None
