"""Ahead-of-time plan: per-device memory and FLOPs from the compiled step, abstract-only for big models."""

import jax
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.sharding import check_sharded, make_mesh
from train.plan import plan, plan_in_process
from train.stages import ToyStage
from train.state import build_setup


def _cfg(rules, *extra):
    return load_config("tiny", [f'mesh.rules="{rules}"', "train.global_batch=16", "mesh.min_shard_elements=1024", *extra])


def test_fsdp_plan_holds_less_per_device_than_dp():
    stage = ToyStage(None, dim=64, hidden=256, depth=2)
    dp = plan_in_process(stage, _cfg("dp"), {"data": 8})
    fsdp = plan_in_process(stage, _cfg("fsdp"), {"fsdp": 8})
    n = dp.num_params["student"]
    assert n == 64 * 256 + 256 + 2 * (256 * 256 + 256) + 256 + 256 * 64 + 64
    assert dp.param_bytes_per_device == 4 * n
    assert fsdp.param_bytes_per_device < dp.param_bytes_per_device / 4
    # Adam mu + nu, plus two int32 step counters (adam, schedule).
    assert dp.optimizer_bytes_per_device == 2 * dp.param_bytes_per_device + 2 * 4
    # Same global work, split over 8 devices either way: forward + backward ~ 6 * params * tokens.
    tokens = 16 * stage.seq
    for rep in (dp, fsdp):
        assert 4 * n * tokens < rep.flops_per_step < 12 * n * tokens
        assert rep.flops_per_device > 0 and rep.temp_bytes_per_device >= 0
    assert "per device: params" in fsdp.table()


@pytest.mark.slow
def test_plan_for_more_devices_than_present_runs_on_simulated_devices():
    cfg = _cfg("fsdp_tp", "train.stage=toy")
    rep = plan(None, cfg, "data=2,fsdp=4,tensor=2", timeout=300)
    assert rep.mesh == {"data": 2, "fsdp": 4, "tensor": 2} and rep.platform == "cpu"
    assert rep.flops_per_device > 0 and rep.param_bytes_per_device > 0
    rep16 = plan(None, cfg, "fsdp=8,tensor=2", timeout=300)  # 16 > the 8 devices of this process
    assert rep16.mesh == {"data": 1, "fsdp": 8, "tensor": 2}
    assert rep16.param_bytes_per_device < rep.param_bytes_per_device


def test_two_billion_parameter_state_is_planned_abstractly():
    stage = ToyStage(None, dim=8192, hidden=8192, depth=28)
    cfg = _cfg("fsdp", "optim.ema_decay=0.999")
    live_before = len(jax.live_arrays())
    setup = build_setup(stage, cfg, make_mesh({"data": 2, "fsdp": 4}))
    n = setup.trainable["student"].num_params
    assert n > 2_000_000_000
    assert len(jax.live_arrays()) == live_before  # nothing was allocated
    report = check_sharded(setup.abstract_state["params"], min_bytes=1 << 20, min_shards=4)
    assert report.device_bytes < 1.01 * report.global_bytes / 4
    check_sharded(setup.abstract_state["opt_state"], min_bytes=1 << 20, min_shards=4)
