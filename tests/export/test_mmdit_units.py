"""Static MMDiT graphs for a model with several latent frames per unit (the tiny world has 4): one graph per stage
for the later units (one slot per history frame, the current clip's 4 frames) and one for unit 0; each equals the
JAX model, and a sampler whose model is those graphs (the slot filling of export.litert_sampler.LiteRTMMDiT)
generates the JAX sampler's latents. The graphs run through the PyTorch mirror here; their TFLite files are
checked against the mirror by `neodragon export` like every component."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export import components as ec  # noqa: E402
from export.litert_sampler import LiteRTMMDiT  # noqa: E402


@pytest.fixture(scope="module")
def built():
    from neodragon_jax.releases import get_release

    rel = get_release("neodragon-tiny")
    cfg, models = ec.load_jax_models(rel.config(), str(rel.folder))
    names = tuple(n for n in ec.component_names(cfg) if n.startswith("mmdit"))
    return cfg, models, ec.build_components(cfg, models, ec.ExportOptions(components=names))


def test_unit_graphs_match_the_jax_model(built):
    cfg, _, comps = built
    assert cfg.pyramid.frames_per_unit == 4 and cfg.pyramid.num_stages == 3
    assert [c.name for c in comps] == ["mmdit_stage0", "mmdit_stage0_first", "mmdit_stage1", "mmdit_stage1_first",
                                       "mmdit_stage2", "mmdit_stage2_first"]
    # 9 latent frames = unit 0 (1 frame) + 2 units of 4: the last unit sees unit 0 one stage down, unit 1 at its
    # own stage, frame by frame
    assert ec.stage_grids(cfg, 2) == [(2, 2)] + [(4, 4)] * 4 + [(4, 4)]  # patch grids (latent 8x8, patch 2)
    assert ec.stage_grids(cfg, 0) == [(1, 1)] * 6
    for c in comps:
        assert c.inputs["current"].shape[2] == (1 if c.name.endswith("_first") else 4)
        with torch.no_grad():
            (got,) = c.run_torch()
        want = np.asarray(c.jax_fn(*c.inputs.values()))
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), c.name


def test_a_sampler_on_the_graphs_generates_the_jax_latents(built):
    import jax

    from export.tflite import io_spec
    from neodragon_jax.pyramid.loss import TextCondition
    from neodragon_jax.pyramid.sampler import PyramidSampler
    from neodragon_jax.pyramid.scheduler import make_schedule

    cfg, models, comps = built

    def runner(module):
        def run(inputs):
            with torch.no_grad():
                return [module(*(torch.from_numpy(np.array(a)) for a in inputs)).numpy()]
        return run

    graphs = {c.name: (runner(c.module), io_spec(c)) for c in comps}
    m, t = cfg.model.mmdit, cfg.model.text
    rng = np.random.default_rng(0)
    cond = TextCondition(rng.standard_normal((2, t.max_length, m.context_in_dim or m.hidden_size)).astype(np.float32),
                         np.ones((2, t.max_length), np.int32), rng.standard_normal((2, m.pooled_dim)).astype(np.float32))
    t_lat, h, w = ec.latent_geometry(cfg)
    kw = dict(num_frames=t_lat, height=h, width=w, key=jax.random.key(3), first_unit_steps=(2, 1, 1),
              later_unit_steps=(1, 1, 1), channels=m.in_channels)
    want = PyramidSampler(models["mmdit"], make_schedule(cfg.pyramid)).sample(cond, **kw)
    got = PyramidSampler(LiteRTMMDiT(graphs), make_schedule(cfg.pyramid)).sample(cond, **kw)
    assert got.nfe == want.nfe
    np.testing.assert_allclose(np.asarray(got.latents), np.asarray(want.latents), atol=1e-4)
