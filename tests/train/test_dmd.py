"""Pyramidal DMD: re-noising reproduces the flow-matching training construction, the generator gradient is zero
when the fake score equals the (CFG) real score, the update ratio and level set are honoured, and a sharded run
on 8 simulated devices leaves the teacher unchanged and checkpoints both optimisers exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.pyramid.loss import LossGroup, TextCondition, flow_matching_inputs
from neodragon_jax.pyramid.pyramids import latent_pyramid
from neodragon_jax.pyramid.scheduler import make_schedule
from neodragon_jax.sharding import make_mesh
from tests.eval.test_block_importance import randomise
from train.checkpoint import Checkpointer
from train.data import write_npz_records
from train.dmd import PyramidalDMD, cfg_velocity, draw_levels, renoise
from train.flow_matching import flow_geometry, synthetic_record
from train.loop import checkpoint_dir
from train.state import build_setup
from train.weights import flatten, run_state


def test_renoise_reproduces_the_training_construction():
    cfg = load_config("tiny")
    sch = make_schedule(cfg.pyramid)
    g = flow_geometry(cfg)
    batch = {k: jnp.stack([synthetic_record(g, 0, i)[k] for i in range(3)]) for k in
             ("latents", "text_tokens", "text_mask", "pooled")}
    for stage in range(sch.num_stages - 1):  # stages whose end keeps noise (sigma_e > 0) pin eps down
        inp = flow_matching_inputs(batch, jax.random.key(stage), schedule=sch, stage=stage, unit=0, text_dropout=0.0)
        x, target, sl = inp.clips[-1], inp.target, inp.aux["sigma_l"]
        z_s = latent_pyramid(batch["latents"][:, :, :1], sch.num_stages)[stage]
        end = x - sl[:, None, None, None, None] * target
        sig_e = sch.end_sigmas[stage]
        eps = (end - (1.0 - sig_e) * z_s) / sig_e  # the noise the construction drew
        got, got_target, t = renoise(z_s, eps, sl, sch, stage)
        np.testing.assert_allclose(got, x, atol=2e-5)
        np.testing.assert_allclose(got_target, target, atol=2e-5)
        np.testing.assert_allclose(t, inp.timestep, rtol=1e-6)


def test_level_draws_use_only_the_fixed_levels_evenly():
    levels = (0.125, 0.375, 0.625, 0.875)
    u = jnp.linspace(0.0, 1.0, 4001)[:-1]
    tau = np.asarray(draw_levels(u, levels))
    assert set(np.unique(tau)) == set(np.float32(levels))
    assert all(abs(np.mean(tau == np.float32(lv)) - 0.25) < 1e-3 for lv in levels)
    assert cfg_velocity(jnp.asarray([[1.0], [3.0]]), 2.0)[0, 0] == pytest.approx(1.0 + 2.0 * (3.0 - 1.0))


SHAPE = ["video.num_frames=9"]


def _cfg(tmp_path, *extra):
    return load_config("tiny", [
        *SHAPE, "train.stage=dmd", "model.mmdit.num_layers=2", "train.pyramid_units=[0]", "train.global_batch=8",
        "train.peak_flops=1e9", "train.tensorboard=false", "train.log_every=1", "optim.warmup_steps=0",
        "optim.lr=1e-3", "optim.ema_decay=0.9", "stages.dmd.teacher=random", "data.source=records",
        f"data.path={tmp_path / 'records'}", "data.shuffle=false", *extra])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("dmd")
    g = flow_geometry(load_config("tiny", SHAPE))
    write_npz_records(d / "records", [synthetic_record(g, 0, i) for i in range(8)])
    return d


def test_generator_gradient_vanishes_when_the_fake_score_is_the_real_score(records):
    # CFG scale 1: the real score is the conditional teacher velocity, which the fake score (same weights)
    # also gives; with the regression term off, the DMD gradient w (v_real - v_fake) is exactly zero.
    cfg = _cfg(records, "stages.dmd.cfg_first=1.0", "stages.dmd.cfg_later=1.0", "stages.dmd.reg_weight=0.0")
    stage = PyramidalDMD(cfg)
    teacher = randomise(stage._mmdit(cfg, nnx.Rngs(0)), seed=4)
    fake = randomise(stage._mmdit(cfg, nnx.Rngs(0)), seed=4)
    gen = randomise(stage._mmdit(cfg, nnx.Rngs(0)), seed=5)
    batch = {k: jnp.stack([synthetic_record(flow_geometry(cfg), 0, i)[k] for i in range(4)]) for k in
             ("latents", "text_tokens", "text_mask", "pooled")}
    null = TextCondition(batch["text_tokens"][:1] * 0, batch["text_mask"][:1] * 0, batch["pooled"][:1] * 0)
    graphdef, params = nnx.split(gen, nnx.Param)
    fake_def, fake_params = nnx.split(fake, nnx.Param)

    @jax.jit
    def grads_for(p, fp):
        out = []
        for stage_index in range(3):
            def loss(p):
                models = {"generator": nnx.merge(graphdef, p), "fake_score": nnx.merge(fake_def, fp),
                          "real_score": teacher}
                g = LossGroup(stage=stage_index, unit=0, indices=(0, 1, 2, 3))
                per, m = stage.group_losses(models, batch, null, jax.random.key(1), g, "generator")
                return jnp.mean(per), m

            (_, m), grads = jax.value_and_grad(loss, has_aux=True)(p)
            out.append((jnp.max(m["score_gap"]), jnp.min(m["score_gap"]),
                        jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(grads)]))))
        return out

    same = grads_for(params, fake_params)
    # v_u + 1 * (v_c - v_u) on a doubled batch against v_c: equal up to float32 rounding (velocities are O(1))
    assert all(float(gap) < 1e-5 for gap, _, _ in same), same
    # ... and a fake score that differs gives the generator a gradient, orders of magnitude larger.
    other = grads_for(params, nnx.state(randomise(fake, seed=6), nnx.Param))
    for (_, _, g_same), (_, gap_min, g_other) in zip(same, other):
        assert float(gap_min) > 1e-3 and float(g_same) < 1e-4 * float(g_other), (g_same, g_other)


def test_update_ratio_is_a_setting():
    cfg = load_config("tiny", ["stages.dmd.teacher=random", "stages.dmd.fake_updates=5",
                               "stages.dmd.levels=[0.25, 0.75]"])
    stage = PyramidalDMD(cfg)
    assert [(u.name, u.roles, u.repeat) for u in stage.updates(cfg)] == [
        ("fake_score", ("fake_score",), 5), ("generator", ("generator",), 1)]
    assert stage.levels == (0.25, 0.75)
    with pytest.raises(ValueError, match="levels"):
        PyramidalDMD(load_config("tiny", ["stages.dmd.teacher=random", "stages.dmd.levels=[0.0, 0.5]"]))


def test_sharded_dmd_run_keeps_the_teacher_and_resumes_both_optimisers(records, tmp_path):
    from train.loop import run

    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices=jax.devices()[:8])
    shard = ["mesh.data=2", "mesh.fsdp=4", 'mesh.rules="fsdp"', "checkpoint.every_steps=2", "checkpoint.async_save=false"]
    one_block = "model.mmdit.num_layers=1"
    cfg = _cfg(records, *shard, one_block, "train.steps=2", f"train.output_dir={tmp_path / 'a'}")
    stage = PyramidalDMD(cfg)
    setup = build_setup(stage, cfg, mesh)
    teacher = flatten(jax.device_get(setup.init_frozen()["real_score"]["params"]))
    res = run(cfg, stage=stage, mesh=mesh, console=False, keep_state=True)
    m = res.last_metrics
    assert {"loss/fake_score", "loss/generator", "generator/dmd", "generator/regression", "fake_score/flow"} <= set(m), \
        sorted(m)
    assert all(np.isfinite(v) for v in res.losses.values())
    after = flatten(jax.device_get(setup.init_frozen()["real_score"]["params"]))
    for k, v in teacher.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)

    # What a resume reads back is the live state exactly: both models, both optimiser states, the EMA.
    step, saved = run_state(tmp_path / "a")
    assert step == 2
    roles = {k.split(".")[1] for k in flatten(saved) if k.startswith(("params.", "opt_state.", "ema."))}
    assert roles == {"generator", "fake_score"}  # the teacher is not checkpointed
    restored, _, _ = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint, read_only=True).restore(None, setup.abstract_state)
    live, back = flatten(jax.device_get(res.state)), flatten(jax.device_get(restored))
    assert set(live) == set(back)
    for k in live:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(live[k]), err_msg=k)
    assert any(k.startswith("opt_state.fake_score") for k in live) and any(k.startswith("ema.generator") for k in live)
    assert any(k.startswith("opt_state.generator") for k in live)
