"""Held-out evaluation: the prompts are the held-out videos' captions, scoring and chance on real renders."""

import json

import numpy as np
import pytest

from neodragon_jax.data.captions import split_combinations
from neodragon_jax.data.synthetic import render_scene, write_dataset
from neodragon_jax.eval.heldout import evaluate_heldout, heldout_prompts, schedule_name
from neodragon_jax.eval.scorer import parse_caption


def test_prompts_are_the_held_out_folders_captions_and_use_held_out_triples(tmp_path):
    folder = write_dataset(tmp_path / "heldout", n=6, seed=1, height=32, width=32, num_frames=9, held_out=True,
                           progress=False)
    captions = [json.loads(line)["text"] for line in (folder / "captions.jsonl").read_text().splitlines()]
    assert heldout_prompts(6) == captions
    held = split_combinations().held_out
    for p in heldout_prompts(40):
        obj = parse_caption(p).objects[0]
        assert (obj.colour, obj.shape, obj.motion) in held, p
    with pytest.raises(ValueError):
        heldout_prompts(0)


class RenderPipeline:
    """A stand-in pipeline whose 'generation' is the renderer's own video of the prompt's scene (or, with
    ``wrong``, of another prompt's): the evaluation must score it perfect (or not) and give chance beside."""

    def __init__(self, scenes, wrong=False):
        from neodragon_jax.config import load_config

        self.cfg = load_config("tiny-teacher")
        self.scenes, self.wrong, self.calls = scenes, wrong, []

    def generate(self, req):
        self.calls.append(req)
        i = self.scenes["order"].index(req.prompt)
        if self.wrong:
            i = (i + 1) % len(self.scenes["order"])
        frames = render_scene(self.scenes["scene"][i], height=32, width=32, num_frames=9, seed=i)
        return type("R", (), {"frames": frames, "nfe": 72, "timings": {"denoise": 0.072 * (1 + len(self.calls))}})()


def test_evaluation_scores_renders_perfectly_and_reports_chance_beside():
    from neodragon_jax.data.synthetic import dataset_item

    held = split_combinations().held_out
    items = [dataset_item(i, seed=1, combinations=held, num_objects=1) for i in range(16)]
    scenes = {"order": [t for _, t, _ in items], "scene": [s for s, _, _ in items]}
    prompts = heldout_prompts(16)
    assert prompts == scenes["order"]
    pipe = RenderPipeline(scenes)
    res = evaluate_heldout(pipe, prompts, seed=5)
    assert [r.seed for r in pipe.calls] == list(range(5, 21))
    assert pipe.calls[0].first_unit_steps == (4, 4, 4) and pipe.calls[0].cfg_scales == (7.0, 5.0)
    assert res.report.accuracy["colour"] == 1.0 and res.report.accuracy["motion"] == 1.0
    assert res.chance["colour"] < 0.5 and res.chance["motion"] < 0.5
    # the median denoising time per NFE leaves out the first (compiling) video: videos 2..16 took 0.216..1.224 s
    assert res.denoise_ms_per_nfe == pytest.approx(np.median(0.072 * np.arange(3, 18)) * 1e3 / 72)
    d = res.as_dict()
    assert d["videos"] == 16 and d["nfe"] == 72 and d["schedule"] == "4-4-4,4-4-4 cfg 7/5"
    shifted = evaluate_heldout(RenderPipeline(scenes, wrong=True), prompts)
    assert shifted.report.accuracy["colour"] < 0.5  # the scorer notices videos of the wrong prompt
    assert schedule_name((1, 1, 1), (1, 1, 1), (0.0, 0.0)) == "1-1-1,1-1-1 no cfg"
