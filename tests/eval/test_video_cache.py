"""The evaluation video cache: an identical request reads back the same pixels (and its original timings);
a changed weight, config, seed, schedule, guidance or prompt is another key, never a stale hit; a damaged
entry is regenerated."""

import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.eval.heldout import evaluate_heldout, heldout_prompts
from neodragon_jax.eval.video_cache import VideoCache, pipeline_digest


@pytest.fixture(scope="module")
def pipe():
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

    return TextToVideoPipeline.random(load_config("tiny", ["video.num_frames=9"]), seed=0)


class Counting:
    """The pipeline, counting the videos it really generates."""

    def __init__(self, pipe):
        self.pipe, self.generated = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, req):
        self.generated += 1
        return self.pipe.generate(req)


def test_identical_requests_read_back_the_same_pixels_and_timings(pipe, tmp_path):
    prompts = heldout_prompts(3)
    kw = dict(first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1), cfg_scales=(0.0, 0.0))
    counting = Counting(pipe)
    cache = VideoCache(tmp_path / "cache")
    first = evaluate_heldout(counting, prompts, cache=cache, **kw)
    assert counting.generated == 3 and cache.misses == 3 and cache.hits == 0
    again = evaluate_heldout(counting, prompts, cache=VideoCache(tmp_path / "cache"), **kw)
    assert counting.generated == 3  # all three read back
    for a, b in zip(first.videos, again.videos):
        np.testing.assert_array_equal(a, b)
    assert again.report.accuracy == first.report.accuracy and again.nfe == first.nfe
    # the timings are those of the generation, not of reading the file
    assert again.seconds_per_video == pytest.approx(first.seconds_per_video)
    assert again.denoise_seconds == pytest.approx(first.denoise_seconds)
    uncached = evaluate_heldout(pipe, prompts, **kw)
    for a, b in zip(first.videos, uncached.videos):
        np.testing.assert_array_equal(a, b)


def test_every_field_that_decides_pixels_changes_the_key(pipe, tmp_path):
    import dataclasses

    from neodragon_jax.pipelines.text_to_video import GenerationRequest

    cache = VideoCache(tmp_path)
    base = GenerationRequest(prompt="a red circle moving left on a white background", seed=3,
                             first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1), cfg_scales=(0.0, 0.0))
    k0 = cache.key(pipe, base)
    assert cache.key(pipe, dataclasses.replace(base)) == k0  # the same request, the same key
    changes = dict(prompt="a blue circle moving left on a white background", seed=4, num_frames=1,
                   first_unit_steps=(2, 1, 1), later_unit_steps=(1, 1, 2), cfg_scales=(2.0, 0.0),
                   negative_prompt="blurry")
    keys = {name: cache.key(pipe, dataclasses.replace(base, **{name: v})) for name, v in changes.items()}
    assert k0 not in keys.values() and len(set(keys.values())) == len(keys), keys

    # one weight moved by 1e-3: another pipeline digest, so another key
    other = pipe.replace(mmdit=pipe.mmdit)
    d0 = pipeline_digest(other)
    leaf = other.mmdit.proj_out.bias
    saved = np.asarray(leaf[...]).copy()
    leaf[...] = leaf[...].at[0].add(1e-3)
    try:
        assert pipeline_digest(other) != d0
        assert VideoCache(tmp_path).key(other, base) != k0
    finally:
        leaf[...] = saved
    assert pipeline_digest(other) == d0
    # a config change that touches no weight (the pyramid's gamma, which moves the stage boundaries) too
    gamma = pipe.replace(cfg=dataclasses.replace(pipe.cfg, pyramid=dataclasses.replace(pipe.cfg.pyramid, gamma=0.5)))
    assert VideoCache(tmp_path).key(gamma, base) != k0


def test_a_damaged_entry_is_regenerated(pipe, tmp_path):
    prompts = heldout_prompts(2)
    kw = dict(first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1), cfg_scales=(0.0, 0.0))
    c0 = VideoCache(tmp_path)
    first = evaluate_heldout(pipe, prompts, cache=c0, **kw)
    entry = c0._path(c0.key(pipe, _request(prompts[0], 0, **kw)))
    entry.write_bytes(entry.read_bytes()[:100])
    c = VideoCache(tmp_path)
    again = evaluate_heldout(pipe, prompts, cache=c, **kw)
    assert c.hits == 1 and c.misses == 1
    for a, b in zip(first.videos, again.videos):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob("*/*.tmp"))


def _request(prompt, seed, first_unit_steps, later_unit_steps, cfg_scales):
    from neodragon_jax.pipelines.text_to_video import GenerationRequest

    return GenerationRequest(prompt=prompt, seed=seed, first_unit_steps=first_unit_steps,
                             later_unit_steps=later_unit_steps, cfg_scales=cfg_scales)
