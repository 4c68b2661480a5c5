"""Roles and ordered updates: a frozen teacher beside a trained student (config overrides per role, frozen
weights never move nor reach a checkpoint, updates applied in order, bit-exact resume on 8 devices), roles
initialised from another run's checkpoint sub-tree, refused roles and init sources, the DMD stand-in's
three roles with a 1:2 update list."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.sharding import activate, make_mesh
from train.checkpoint import Checkpointer, flat_shapes
from train.loop import checkpoint_dir, run
from train.roles import Models, RoleError, Update, plan_roles
from train.stages import ToyStage
from train.state import build_setup
from train.step import make_train_step, step_rng
from train.toy_distill import ToyDistill
from train.weights import WeightSourceError, flatten, load_weights, parse_source, run_state

MESH = {"data": 2, "fsdp": 4, "tensor": 1}


def _cfg(tmp_path, *extra):
    return load_config("tiny", [
        "train.stage=toy_distill", "train.steps=6", "train.global_batch=8", "train.log_every=1",
        "train.peak_flops=1e9", "train.tensorboard=false", "checkpoint.every_steps=2", "checkpoint.keep_latest=5",
        "data.num_synthetic=40", "optim.warmup_steps=0", 'mesh.rules="fsdp"', "mesh.data=2", "mesh.fsdp=4",
        f'train.output_dir="{tmp_path}"', *extra])


def test_roles_have_their_own_config_optimiser_and_ema(tmp_path):
    cfg = _cfg(tmp_path)
    setup = build_setup(ToyDistill(cfg), cfg, make_mesh(MESH))
    assert set(setup.trainable) == {"student"} and set(setup.frozen) == {"teacher"}
    assert len(setup.frozen["teacher"].params["blocks"]) == 3 and len(setup.trainable["student"].params["blocks"]) == 1
    assert setup.ema_decays == {"student": 0.5} and cfg.optim.ema_decay == 0.0
    # Two updates of the student a step: its schedule runs over 2 x train.steps optimiser updates.
    assert setup.plan.applications("student") == 2
    assert float(setup.schedules["student"](0)) == pytest.approx(3e-2)
    assert float(setup.schedules["student"](12)) == pytest.approx(0.0, abs=1e-9)


def test_updates_run_in_order_and_frozen_weights_stay_put(tmp_path):
    cfg = _cfg(tmp_path)
    mesh = make_mesh(MESH)
    setup = build_setup(ToyDistill(cfg), cfg, mesh)
    state, frozen = setup.init_state(), setup.init_frozen()
    frozen0 = jax.device_get(frozen)
    p0, opt0 = jax.device_get(state["params"]["student"]), jax.device_get(state["opt_state"]["student"])
    x = np.asarray(jax.random.normal(jax.random.key(3), (8, 8, 8)))
    batch = {"x": x, "y": np.sin(x)}
    with activate(mesh, setup.rules):
        new, metrics = jax.jit(make_train_step(setup))(state, frozen, batch)
    assert "loss/distill" in metrics and "fit/mae" in metrics

    # Reference on the host: distill at p0 with key fold_in(step key, 0), then fit at p1 with fold_in(., 1).
    stage, tx = setup.stage, setup.txs["student"]
    teacher = setup.frozen["teacher"].to_module(frozen0["teacher"]["params"], frozen0["teacher"]["model_state"])
    spec = setup.trainable["student"]
    rng = step_rng(cfg, 0)

    def apply(loss_fn, p, opt, key):
        def f(q):
            m = {"student": spec.to_module(q, jax.device_get(state["model_state"]["student"])), "teacher": teacher}
            return loss_fn(Models(m), batch, key)[0]

        upd, opt = tx.update(jax.grad(f)(p), opt, p)
        return optax.apply_updates(p, upd), opt

    def reference(order):
        p, opt = p0, opt0
        fns = {"distill": stage.distill_loss, "fit": stage.fit_loss}
        for i, name in enumerate(order):
            p, opt = apply(fns[name], p, opt, jax.random.fold_in(rng, i))
        return p

    got = jax.device_get(new["params"]["student"])

    def dist(want):
        return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got, want)))

    err, swapped = dist(reference(("distill", "fit"))), dist(reference(("fit", "distill")))
    assert err < 1e-5 < swapped, (err, swapped)
    # The EMA moved after each of the two updates: ema = 0.25 p0 + 0.25 p1 + 0.5 p2 (decay 0.5).
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(np.isfinite(a))) and a.shape == b.shape,
                                     jax.device_get(new["ema"]["student"]), got))
    # The frozen teacher is an input the step never writes (nor donates).
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), frozen0)


def test_resume_is_bit_exact_and_checkpoints_hold_no_frozen_role(tmp_path):
    full = run(_cfg(tmp_path / "full"), console=False, keep_state=True)
    cfg = _cfg(tmp_path / "split")
    first = run(cfg, console=False, stop_after=3)
    assert first.end_step == 3
    second = run(cfg, console=False, keep_state=True)
    assert second.resumed_from == 3 and second.end_step == 6
    a, b = jax.device_get(full.state), jax.device_get(second.state)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bit-exact: params, optimiser moments, EMA, step
    for k in sorted(full.losses):
        assert full.losses[k] == (first.losses | second.losses)[k], k

    ck = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint, read_only=True)
    meta = ck.manager.item_metadata(6)["state"]
    keys = flat_shapes(getattr(meta, "tree", meta))
    assert any(k.startswith("params/student/") for k in keys) and any(k.startswith("ema/student/") for k in keys)
    assert not any("teacher" in k for k in keys), [k for k in keys if "teacher" in k]


def test_role_initialised_from_another_runs_checkpoint_subtree(tmp_path):
    src = tmp_path / "src"
    run(_cfg(src, "train.steps=2"), console=False)
    _, state = run_state(src, 2)
    ema = {k: np.asarray(v) for k, v in flatten(state["ema"]["student"]).items()}
    raw = {k: np.asarray(v) for k, v in flatten(state["params"]["student"]).items()}

    # The student takes only its input projection from the run's EMA; the teacher's first block and output
    # take the run's raw student weights through the train.role_init override.
    cfg = _cfg(tmp_path / "dst", f'stages.toy_distill.student_init="run:{src}@2:ema#student.proj_in->proj_in"',
               f'train.role_init=["teacher=run:{src}#student.proj_out->proj_out"]')
    setup = build_setup(ToyDistill(cfg), cfg, make_mesh(MESH))
    student = {k: np.asarray(v) for k, v in flatten(jax.device_get(setup.init_state()["params"]["student"])).items()}
    teacher = {k: np.asarray(v) for k, v in flatten(jax.device_get(setup.init_frozen()["teacher"]["params"])).items()}
    np.testing.assert_array_equal(student["proj_in.kernel"], ema["proj_in.kernel"])
    np.testing.assert_array_equal(teacher["proj_out.kernel"], raw["proj_out.kernel"])
    assert not np.array_equal(ema["proj_in.kernel"], raw["proj_in.kernel"])  # EMA and raw weights differ
    assert not np.array_equal(student["proj_out.kernel"], raw["proj_out.kernel"])  # the rest kept its init

    # A sub-tree that does not fit is one error listing the keys.
    with pytest.raises(Exception, match=r"(?s)missing keys.*proj_in.kernel.*unexpected keys.*kernel"):
        load_weights(f"run:{src}@2#student.proj_out", setup.trainable["student"].params)


def test_unknown_roles_and_init_sources_are_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(WeightSourceError, match=r"unknown kind 'hub'; valid forms: random, official:PATH, run:DIR"):
        parse_source("hub:some/model")
    with pytest.raises(WeightSourceError, match="STEP after @ must be a number"):
        parse_source("run:runs/a@last")
    assert parse_source("run:runs/a@20:ema#student.blocks->blocks") == parse_source(
        "run:runs/a@20:ema#student.blocks->blocks")
    assert str(parse_source("prune:teacher[0, 2,3]")) == "prune:teacher.transformer_blocks[0,2,3]"
    cfg = _cfg(tmp_path)
    with pytest.raises(RoleError, match=r"unknown role 'pupil'; this stage's roles: teacher, student"):
        plan_roles(ToyDistill(cfg), dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, role_init=("pupil=random",))))
    for spec, message in (("nope:x", r"role 'student': weight source 'nope:x'"),
                          ("prune:ghost[0]", r"no role 'ghost'; roles: teacher, student")):
        bad = _cfg(tmp_path, f'stages.toy_distill.student_init="{spec}"')
        with pytest.raises(RoleError, match=message):
            plan_roles(ToyDistill(bad), bad)

    class BadUpdate(ToyDistill):
        def updates(self, cfg):
            return [Update(("pupil",), self.fit_loss), Update(("teacher",), self.fit_loss)]

    with pytest.raises(RoleError, match=r"names unknown role 'pupil'; roles: teacher, student"):
        plan_roles(BadUpdate(cfg), cfg)


def test_legacy_optim_hook_ema_decay_is_honoured():
    """The per-model ``optim_config`` hook's ``ema_decay`` used to be ignored (only cfg.optim's counted)."""

    class Hooked(ToyStage):
        def optim_config(self, cfg, name):
            return dataclasses.replace(cfg.optim, ema_decay=0.25)

    cfg = load_config("tiny", ["train.global_batch=8"])
    setup = build_setup(Hooked(cfg), cfg, make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1]))
    assert setup.ema_decays == {"student": 0.25} and set(setup.abstract_state["ema"]) == {"student"}


def test_dmd_is_three_roles_with_two_fake_updates_per_generator_update():
    from train.dmd import PyramidalDMD
    from train.stages import get_stage

    cfg = load_config("tiny", ["train.stage=dmd", "model.mmdit.num_layers=2", "train.pyramid_units=[0]",
                               "train.global_batch=4", "stages.dmd.generator_blocks=[1]", "stages.dmd.teacher=random"])
    stage = get_stage("dmd", cfg)
    assert isinstance(stage, PyramidalDMD) and not getattr(stage, "plan_only", False)
    setup = build_setup(stage, cfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    plan = setup.plan
    assert plan.trained == ["fake_score", "generator"] and plan.frozen == ["real_score"]
    assert [(u.label, u.roles, u.repeat) for u in plan.updates] == [
        ("fake_score", ("fake_score",), 2), ("generator", ("generator",), 1)]
    assert plan.applications("fake_score") == 2 and plan.applications("generator") == 1
    # The generator is a 1-block student pruned from the 2-block real score (its own config).
    assert plan.configs["generator"].model.mmdit.num_layers == 1 and str(plan.inits["generator"]) == \
        "prune:real_score.transformer_blocks[1]"
    assert len(setup.trainable["generator"].params["transformer_blocks"]) == 1
    batch = stage.example_batch(cfg, 4)
    new, metrics = jax.eval_shape(make_train_step(setup), setup.abstract_state, setup.abstract_frozen, batch)
    assert {"loss/fake_score", "loss/generator", "loss", "grad_norm/generator", "lr/fake_score"} <= set(metrics)
    assert jax.tree.structure(new) == jax.tree.structure(setup.abstract_state)
