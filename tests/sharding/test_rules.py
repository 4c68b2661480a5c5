"""Logical-axis rule resolution, activation constraints and the sharding check."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from neodragon_jax.config import load_config
from neodragon_jax.sharding import (
    ShardingCheckError,
    activate,
    check_sharded,
    constrain,
    get_rules,
    make_mesh,
    param_shardings,
    resolve_spec,
)
from neodragon_jax.sharding.rules import RULE_SETS

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def test_rules_map_logical_axes():
    fsdp, tp = RULE_SETS["fsdp"].params, RULE_SETS["fsdp_tp"].params
    assert resolve_spec((64, 256), ("embed", "mlp"), fsdp, MESH) == P("fsdp", None)
    assert resolve_spec((256, 64), ("mlp", "embed"), fsdp, MESH) == P(None, "fsdp")
    assert resolve_spec((64, 256), ("embed", "heads"), tp, MESH) == P("fsdp", "tensor")
    assert resolve_spec((256, 64), ("heads", "embed"), tp, MESH) == P("tensor", "fsdp")
    # A mesh axis is used once per tensor: the second 'embed' stays replicated.
    assert resolve_spec((64, 64), ("embed", "embed"), fsdp, MESH) == P("fsdp", None)
    assert resolve_spec((64,), ("norm",), tp, MESH) == P(None)
    assert resolve_spec((64, 64), ("embed", "mlp"), RULE_SETS["dp"].params, MESH) == P(None, None)


def test_undivisible_dim_falls_back_to_replicated():
    tp = RULE_SETS["fsdp_tp"].params
    assert resolve_spec((63, 256), ("embed", "mlp"), tp, MESH) == P(None, "tensor")
    # An axis of size 1 shards nothing, so it is not named.
    assert resolve_spec((64, 64), ("embed", "mlp"), tp, {"data": 8, "fsdp": 1, "tensor": 1}) == P(None, None)
    # A multi-axis rule drops trailing axes until the product divides (batch 2 over data=2 x fsdp=4).
    acts = RULE_SETS["fsdp"].activations
    assert resolve_spec((2, 8), ("batch", None), acts, {"data": 2, "fsdp": 4, "tensor": 1}) == P("data", None)
    assert resolve_spec((16, 8), ("batch", None), acts, {"data": 2, "fsdp": 4, "tensor": 1}) == P(("data", "fsdp"), None)


def test_size_fallback_shards_large_unannotated_tensors():
    r = get_rules("fsdp")
    big = resolve_spec((3, 3, 130, 512), None, r.params, MESH, fallback=r.fallback, min_shard_elements=1000)
    assert big == P(None, None, None, "fsdp")  # largest dim divisible by fsdp=2
    odd = resolve_spec((3, 3, 512, 129), None, r.params, MESH, fallback=r.fallback, min_shard_elements=1000)
    assert odd == P(None, None, "fsdp", None)  # 129 is not divisible: next largest
    small = resolve_spec((8, 8), None, r.params, MESH, fallback=r.fallback, min_shard_elements=1000)
    assert small == P(None, None)


def test_regex_override_for_unannotated_params():
    class Bare(nnx.Module):
        def __init__(self):
            self.table = nnx.Param(jnp.zeros((64, 32)))

    state = nnx.state(nnx.eval_shape(Bare))
    mesh = make_mesh(MESH)
    rules = get_rules("fsdp_tp").with_overrides((r"table$", ("vocab", "embed")))
    sh = param_shardings(state, rules, mesh, min_shard_elements=1 << 30)
    assert sh["table"].spec == P("tensor", "fsdp")


def test_logical_axes_length_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"blocks.0.kernel: logical axes \('embed',\) have 1 names"):
        resolve_spec((4, 4), ("embed",), RULE_SETS["fsdp"].params, MESH, where="blocks.0.kernel")


def test_constrain_is_noop_outside_mesh_and_shards_inside():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "length", "mlp")) is x
    mesh = make_mesh(MESH)
    with activate(mesh, "fsdp_tp"):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "length", "mlp")))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")


def _big_toy_state(hidden=256):
    from train.stages import ToyStage

    cfg = load_config("tiny")
    stage = ToyStage(cfg, dim=64, hidden=hidden, depth=2)
    modules = nnx.eval_shape(lambda: stage.build_trainable(cfg, nnx.Rngs(0)))
    return nnx.state(modules["student"], nnx.Param)


@pytest.mark.parametrize("rules,mesh_shape", [("fsdp", {"data": 2, "fsdp": 4}), ("fsdp_tp", {"fsdp": 4, "tensor": 2})])
def test_large_params_are_sharded(rules, mesh_shape):
    state = _big_toy_state()
    mesh = make_mesh(mesh_shape)
    sh = param_shardings(state, rules, mesh)
    abstract = nnx.to_pure_dict(state)
    want_shards = 4 if rules == "fsdp" else 8
    report = check_sharded(abstract, sh, min_bytes=64 * 1024, min_shards=want_shards, max_replicated_fraction=0.02)
    assert report.device_bytes < report.global_bytes / 3


def test_sharding_check_fails_when_replicated():
    state = _big_toy_state()
    mesh = make_mesh({"data": 8})
    sh = param_shardings(state, "dp", mesh)
    with pytest.raises(ShardingCheckError, match=r"blocks\.0\.kernel.*1 shard"):
        check_sharded(nnx.to_pure_dict(state), sh, min_bytes=64 * 1024)
