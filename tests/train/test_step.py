"""Sharded train step == single-device step (fp32, 1e-5), micro-batch accumulation, state placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from neodragon_jax.config import load_config
from neodragon_jax.sharding import activate, check_sharded, make_mesh
from train.data import DataIterator, SyntheticSource, to_global
from train.stages import ToyStage
from train.state import build_setup
from train.step import batch_sharding_tree, jit_grad_fn, jit_train_step

TOL = 1e-5  # fp32, max abs difference of loss and every gradient entry


def _cfg(*overrides):
    return load_config("tiny", ["train.global_batch=8", "optim.warmup_steps=2", "optim.ema_decay=0.9", *overrides])


def _stage(cfg):
    # Frozen teacher included so the frozen-model path is sharded and exercised too.
    return ToyStage(cfg, dim=16, hidden=64, depth=2, frozen_teacher=True)


def _setup(cfg, mesh_shape, devices=None):
    mesh = make_mesh(mesh_shape, devices=devices)
    return build_setup(_stage(cfg), cfg, mesh)


def _batch(setup, cfg):
    _, sh = batch_sharding_tree(setup)
    it = DataIterator(SyntheticSource(setup.stage, cfg), ["x", "y"], cfg.train.global_batch, prefetch=0)
    return to_global(next(it), sh, cfg.train.global_batch)


def _grads(setup, cfg, state, frozen):
    with activate(setup.mesh, setup.rules):
        return jit_grad_fn(setup)(state, frozen, _batch(setup, cfg))


@pytest.fixture(scope="module")
def reference():
    cfg = _cfg()
    setup = _setup(cfg, {"data": 1}, devices=jax.devices()[:1])
    state, frozen = setup.init_state(), setup.init_frozen()
    loss, metrics, grads = _grads(setup, cfg, state, frozen)
    return jax.device_get((state, frozen, loss, grads))


def _place(tree, shardings):
    return jax.tree.map(lambda x, sh: jax.device_put(x, sh), tree, shardings)


@pytest.mark.parametrize(
    "rules,mesh_shape",
    [("dp", {"data": 2, "fsdp": 2, "tensor": 2}), ("fsdp", {"data": 2, "fsdp": 2, "tensor": 2}),
     ("fsdp_tp", {"data": 1, "fsdp": 4, "tensor": 2})],
)
def test_sharded_grads_match_single_device(reference, rules, mesh_shape):
    ref_state, ref_frozen, ref_loss, ref_grads = reference
    cfg = _cfg(f'mesh.rules="{rules}"')
    setup = _setup(cfg, mesh_shape)
    if rules == "fsdp_tp":
        state, frozen = setup.init_state(), setup.init_frozen()
        # Initialisation straight into shardings draws the same numbers as the single-device init.
        for a, b in zip(jax.tree.leaves(jax.device_get((state, frozen))), jax.tree.leaves((ref_state, ref_frozen))):
            np.testing.assert_array_equal(a, b)
    else:
        state, frozen = _place(ref_state, setup.state_shardings), _place(ref_frozen, setup.frozen_shardings)
    loss, _, grads = _grads(setup, cfg, state, frozen)
    assert abs(float(loss) - float(ref_loss)) < TOL
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), grads, ref_grads)
    assert max(jax.tree.leaves(diffs)) < TOL, diffs
    sharded = [s for s in jax.tree.leaves(setup.state_shardings["params"]) if any(a is not None for a in s.spec)]
    assert (len(sharded) > 0) == (rules != "dp")


def test_micro_batch_accumulation_matches_full_batch(reference):
    import dataclasses

    ref_state, ref_frozen, _, _ = reference
    cfg1 = _cfg('mesh.rules="fsdp"')
    setup1 = _setup(cfg1, {"data": 2, "fsdp": 2, "tensor": 2})
    # Micro-batches draw fold_in(rng, k) noise instead of one draw: compare on a noise-free loss.
    setup1.stage.loss = _noise_free_loss
    setup4 = dataclasses.replace(setup1, cfg=_cfg('mesh.rules="fsdp"', "train.micro_batches=4"))
    state, frozen = _place(ref_state, setup1.state_shardings), _place(ref_frozen, setup1.frozen_shardings)
    loss1, _, grads1 = _grads(setup1, cfg1, state, frozen)
    loss, _, grads = _grads(setup4, setup4.cfg, state, frozen)
    assert abs(float(loss) - float(loss1)) < TOL
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, grads1)
    assert max(jax.tree.leaves(diffs)) < TOL, diffs


def _noise_free_loss(trainable, frozen, batch, rng):
    pred = trainable["student"](batch["x"])
    target = frozen["teacher"](batch["x"])
    return jnp.mean(jnp.square(pred - target)), {}


def test_train_step_updates_state_in_place_shardings():
    cfg = _cfg('mesh.rules="fsdp_tp"', "train.micro_batches=2", "optim.weight_decay=0.01")
    setup = build_setup(ToyStage(cfg, dim=16, hidden=64, depth=2), cfg, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    state, frozen = setup.init_state(), setup.init_frozen()
    before = jax.device_get(state["params"])
    batch = _batch(setup, cfg)
    with activate(setup.mesh, setup.rules):
        step = jit_train_step(setup)
        state, metrics = step(state, frozen, batch)
        state, metrics = step(state, frozen, batch)
    assert int(state["step"]) == 2
    assert set(metrics) >= {"loss", "grad_norm", "lr", "mae"}
    assert float(metrics["lr"]) == pytest.approx(cfg.optim.lr / 2 * 1, rel=1e-5)  # warmup: step 1 of 2
    # optax's scalar `count` is replicated over the whole mesh, not left on one device.
    counts = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim == 0]
    assert counts and all(c.sharding.spec == P() and len(c.sharding.device_set) == 8 for c in counts)
    after = jax.device_get(state["params"])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after, before)
    assert min(jax.tree.leaves(moved)) > 0
    # EMA lags the weights: ema = 0.9 * ema + 0.1 * params after each step.
    ema = jax.device_get(state["ema"])
    k0 = before["student"]["proj_in"]["kernel"]
    assert np.max(np.abs(ema["student"]["proj_in"]["kernel"] - k0)) < np.max(np.abs(after["student"]["proj_in"]["kernel"] - k0))
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(setup.state_shardings)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    check_sharded(state["params"], min_bytes=16 * 1024, min_shards=4, max_replicated_fraction=0.1)


def test_weight_decay_mask_excludes_biases_and_norms():
    from flax import nnx

    from train.optim import decay_mask

    cfg = _cfg()
    modules = nnx.eval_shape(lambda: _stage(cfg).build_trainable(cfg, nnx.Rngs(0)))
    mask = decay_mask(nnx.state(modules["student"], nnx.Param))
    assert mask["proj_in"]["kernel"] and mask["blocks"][1]["kernel"]
    assert not mask["proj_in"]["bias"] and not mask["norm"]["weight"]


def test_mixed_precision_keeps_fp32_master_weights():
    cfg = _cfg('mesh.rules="fsdp"', 'precision.dtype="bfloat16"', 'precision.param_dtype="float32"')
    setup = build_setup(ToyStage(cfg, dim=16, hidden=64, depth=2), cfg, make_mesh({"data": 2, "fsdp": 4}))
    state = setup.init_state()
    with activate(setup.mesh, setup.rules):
        lowered = jit_train_step(setup).lower(state, {}, _batch(setup, cfg))
        state, metrics = lowered.compile()(state, {}, _batch(setup, cfg))
    assert "bf16" in lowered.as_text()  # matmuls run in bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
