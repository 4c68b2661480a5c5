"""Stage registry and the multi-model (DMD-shaped) stage contract: per-model losses, frozen models apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.sharding import activate, make_mesh
from train.stages import Stage, ToyStage, available_stages, get_stage, register_stage
from train.state import build_setup
from train.step import jit_grad_fn, step_rng


class TwoStudents(ToyStage):
    """DMD-shaped: two trained models with their own losses and one frozen model."""

    name = "two_students"

    def build_trainable(self, cfg, rngs):
        return {"generator": self._mlp(cfg, rngs), "critic": self._mlp(cfg, rngs)}

    def build_frozen(self, cfg, rngs):
        return {"teacher": self._mlp(cfg, rngs)}

    def loss(self, trainable, frozen, batch, rng):
        x = batch["x"]
        fake = trainable["generator"](x)
        real = frozen["teacher"](x)
        # The generator follows the critic's score; the critic regresses on the (stopped) generator output.
        gen_loss = jnp.mean(jnp.square(trainable["critic"](fake) - real))
        critic_loss = jnp.mean(jnp.square(trainable["critic"](jax.lax.stop_gradient(fake)) - x))
        return {"generator": gen_loss, "critic": critic_loss}, {}


def test_registry_and_unknown_stage_message():
    cfg = load_config("tiny")
    assert "toy" in available_stages()
    assert isinstance(get_stage("toy", cfg), Stage)
    assert type(get_stage("train.stages:ToyStage", cfg)) is ToyStage  # "module:Factory" form
    register_stage("two_students_test", TwoStudents)
    assert get_stage("two_students_test", cfg).name == "two_students"
    with pytest.raises(ValueError, match=r"unknown training stage 'nope'; registered stages: \[.*'toy'"):
        get_stage("nope", cfg)


def test_each_trained_model_gets_the_gradient_of_its_own_loss():
    cfg = load_config("tiny", ['mesh.rules="fsdp"', "train.global_batch=8"])
    stage = TwoStudents(cfg, dim=8, hidden=32, depth=1)
    setup = build_setup(stage, cfg, make_mesh({"data": 2, "fsdp": 4}))
    state, frozen = setup.init_state(), setup.init_frozen()
    assert set(state["params"]) == {"generator", "critic"} and set(frozen) == {"teacher"}
    assert "teacher" not in jax.tree_util.tree_structure(state).__repr__()
    x = jax.random.normal(jax.random.key(1), (8, stage.seq, stage.dim))
    batch = {"x": x, "y": x}
    with activate(setup.mesh, setup.rules):
        loss, metrics, grads = jit_grad_fn(setup)(state, frozen, batch)
    params = jax.device_get(state["params"])
    fz = jax.device_get(frozen)
    rng = step_rng(cfg, 0)

    def own(name):
        def f(p):
            ps = dict(params, **{name: p})
            losses, _ = stage.loss(setup.modules(ps, state["model_state"]), setup.frozen_modules(fz), batch, rng)
            return losses[name]

        return jax.grad(f)(params[name])

    for name in ("generator", "critic"):
        want, got = own(name), jax.device_get(grads[name])
        err = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got, want)))
        assert err < 1e-5, (name, err)
    assert float(loss) == pytest.approx(float(metrics["loss/generator"] + metrics["loss/critic"]), rel=1e-6)
