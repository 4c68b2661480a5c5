"""Teacher-video synthesis split over local devices: the records are the same as on one device (the CFG
path included), a partial last batch is padded and its padding dropped, and a batch that does not split over
the devices is refused."""

import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.data.synthesize import SynthesizeError, synthesize_records

PROMPTS = ["a red circle moving left on a white background", "a blue square moving up on a black background",
           "a green triangle resting on a gray background", "a yellow diamond moving right on a white background",
           "a cyan circle moving down on a black background", "a magenta square moving left on a gray background"]
STEPS = dict(first_unit_steps=(1, 1, 1), later_unit_steps=(1, 1, 1), cfg_scales=(3.0, 2.0))


@pytest.fixture(scope="module")
def pipe():
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

    return TextToVideoPipeline.random(load_config("tiny", ["video.num_frames=9"]), seed=0)


def _records(folder):
    return {p.name: dict(np.load(p)) for p in sorted((folder / "records").glob("*.npz"))}


def test_records_are_the_same_on_one_and_on_four_devices(pipe, tmp_path):
    one = synthesize_records(pipe, PROMPTS, tmp_path / "one", batch=4, devices=1, **STEPS)
    four = synthesize_records(pipe, PROMPTS, tmp_path / "four", batch=4, **STEPS)  # 4 of the 8 local devices
    assert one["devices"] == 1 and four["devices"] == 4
    assert one["written"] == four["written"] == len(PROMPTS)  # the padded rows of the last batch are dropped
    a, b = _records(tmp_path / "one"), _records(tmp_path / "four")
    assert sorted(a) == sorted(b) == [f"{i:06d}.npz" for i in range(len(PROMPTS))]
    for name in a:
        assert str(a[name]["caption"]) == str(b[name]["caption"])
        np.testing.assert_allclose(a[name]["latents"], b[name]["latents"], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(a[name]["text_mask"], b[name]["text_mask"])
    assert not np.allclose(a["000000.npz"]["latents"], a["000001.npz"]["latents"])  # per-prompt videos


def test_a_batch_that_does_not_split_over_the_devices_is_refused(pipe, tmp_path):
    with pytest.raises(SynthesizeError, match="a batch of 3 does not split over 2 devices"):
        synthesize_records(pipe, PROMPTS, tmp_path / "x", batch=3, devices=2, **STEPS)
    with pytest.raises(SynthesizeError, match="local device"):
        synthesize_records(pipe, PROMPTS, tmp_path / "y", batch=4, devices=64, **STEPS)
