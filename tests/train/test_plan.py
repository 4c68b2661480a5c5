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


def _report(num_layers, per_block, const, **kw):
    from train.plan import PlanReport

    fields = dict(stage="flow", mesh={"fsdp": 8}, rules="fsdp", platform="cpu", global_batch=32, micro_batches=1,
                  num_params={"mmdit": const + per_block * num_layers}, num_frozen_params={},
                  param_bytes_per_device=4 * (const + per_block * num_layers),
                  optimizer_bytes_per_device=8 * (const + per_block * num_layers) + 8, frozen_bytes_per_device=0,
                  batch_bytes_per_device=1000, temp_bytes_per_device=10_000 + 3_000 * num_layers,
                  argument_bytes_per_device=1, output_bytes_per_device=1, alias_bytes_per_device=1,
                  flops_per_device=1e9 + 2e9 * num_layers, flops_per_step=8 * (1e9 + 2e9 * num_layers),
                  compile_seconds=10.0 * num_layers, num_layers=num_layers)
    fields.update(kw)
    return PlanReport(**fields)


def test_depth_extrapolation_is_affine_in_the_block_count():
    from train.plan import PlanReport, extrapolate_depth

    rep = extrapolate_depth(_report(2, 777, 55), _report(4, 777, 55), 18)
    exact = _report(18, 777, 55)
    for name in ("num_params", "param_bytes_per_device", "optimizer_bytes_per_device", "batch_bytes_per_device",
                 "temp_bytes_per_device", "flops_per_device", "flops_per_step"):
        assert getattr(rep, name) == getattr(exact, name), name
    assert rep.depth_probe == (2, 4) and rep.num_layers == 18 and rep.compile_seconds == 60.0
    assert "18 MMDiT blocks, extrapolated from compiles at 2 and 4 blocks" in rep.table()
    assert PlanReport.from_json(rep.to_json()) == rep
    with pytest.raises(ValueError, match="two different depths"):
        extrapolate_depth(_report(2, 1, 1), _report(2, 1, 1), 18)


def test_generated_code_is_extrapolated_when_it_grows_and_never_below_the_compiled_size():
    from train.plan import extrapolate_depth

    growing = extrapolate_depth(_report(2, 1, 1, generated_code_bytes_per_device=300),
                                _report(3, 1, 1, generated_code_bytes_per_device=400), 18)
    assert growing.generated_code_bytes_per_device == 1900
    # The TPU compile of the DMD step at 3 blocks made less code than at 2 (outlined blocks); the line would give
    # -4.3 GiB at 18 blocks and a total below the state plus temporaries.
    shrinking = extrapolate_depth(_report(2, 1, 1, generated_code_bytes_per_device=900),
                                  _report(3, 1, 1, generated_code_bytes_per_device=600), 18)
    assert shrinking.generated_code_bytes_per_device == 900
    assert shrinking.total_bytes_per_device >= shrinking.temp_bytes_per_device + shrinking.param_bytes_per_device


def _pruned_report(teacher, student):
    """Figures affine in both block counts, with different per-block costs for the teacher and student."""
    frozen, trained = 100 + 700 * teacher, 50 + 777 * student
    return _report(teacher, 0, 0, stage="recover-distill", num_params={"mmdit": trained},
                   num_frozen_params={"teacher": frozen}, param_bytes_per_device=4 * trained,
                   optimizer_bytes_per_device=8 * trained, frozen_bytes_per_device=2 * frozen,
                   temp_bytes_per_device=10_000 + 1_000 * teacher + 3_000 * student,
                   flops_per_device=1e9 + 1e9 * teacher + 3e9 * student,
                   flops_per_step=8 * (1e9 + 1e9 * teacher + 3e9 * student), student_layers=student)


def test_pruned_stage_extrapolation_is_affine_in_teacher_and_student_depth():
    from train.plan import PlanReport, combine_reports

    points = [(2, 2), (4, 4), (4, 3)]
    rep = combine_reports([_pruned_report(*p) for p in points], points, (24, 18), 24, (2, 4), student_layers=18)
    exact = _pruned_report(24, 18)
    for name in ("num_params", "num_frozen_params", "param_bytes_per_device", "optimizer_bytes_per_device",
                 "frozen_bytes_per_device", "temp_bytes_per_device", "flops_per_device", "flops_per_step"):
        assert getattr(rep, name) == pytest.approx(getattr(exact, name)), name
    assert rep.num_layers == 24 and rep.student_layers == 18
    assert "24-block teacher, 18-block student" in rep.table()
    assert PlanReport.from_json(rep.to_json()) == rep
    with pytest.raises(ValueError, match="do not determine"):
        combine_reports([_pruned_report(2, 2)] * 3, [(2, 2), (4, 4), (6, 6)], (24, 18), 24, (2, 4))


def test_depth_probe_scales_a_pruned_student_with_the_teacher():
    import train.stages  # noqa: F401  (registers the stages' settings)
    from train.plan import pruned_student, spread_blocks, with_mmdit_depth

    assert spread_blocks(4, 3) == (0, 2, 3) and spread_blocks(4, 1) == (3,) and spread_blocks(24, 24) == tuple(range(24))
    with pytest.raises(ValueError):
        spread_blocks(3, 4)
    kept = "[" + ",".join(str(k) for k in range(24) if k not in (3, 7, 11, 15, 19, 20)) + "]"
    cfg = load_config("tiny", ["model.mmdit.num_layers=24", "train.stage=recover-distill",
                               f"stages.recover-distill.kept={kept}"])
    assert pruned_student(cfg)[0] == "kept" and len(pruned_student(cfg)[1]) == 18
    small = with_mmdit_depth(cfg, 4, 3)
    assert small.model.mmdit.num_layers == 4 and small.stages.get_settings("recover-distill").kept == (0, 2, 3)
    dmd = load_config("tiny", ["model.mmdit.num_layers=8", "train.stage=dmd", "stages.dmd.generator_blocks=[0,2,4,6,7]"])
    assert pruned_student(dmd) == ("generator_blocks", (0, 2, 4, 6, 7))
    assert with_mmdit_depth(dmd, 4, 4).stages.get_settings("dmd").generator_blocks == (0, 1, 2, 3)
    assert pruned_student(load_config("tiny", ["train.stage=flow"])) is None


@pytest.mark.slow
def test_depth_probe_predicts_the_compiled_deeper_step():
    """The tiny flow step at 4 blocks on fsdp=8, compiled, against the extrapolation from 2 and 3 blocks.
    Parameters and optimizer bytes are exact; FLOPs within 1% and temporaries within 10% (buffer packing)."""
    from train.plan import plan_by_depth

    cfg = load_config("tiny", ['mesh.rules="fsdp"', "train.global_batch=8", "train.stage=flow",
                               "model.mmdit.num_layers=4", "train.pyramid_units=[1]"])
    probe = plan_by_depth(None, cfg, {"fsdp": 8}, probe=(2, 3))
    exact = plan(None, cfg, {"fsdp": 8})
    assert probe.depth_probe == (2, 3) and exact.depth_probe is None and exact.num_layers == 4
    assert probe.num_params == exact.num_params
    assert probe.param_bytes_per_device == exact.param_bytes_per_device
    assert probe.optimizer_bytes_per_device == exact.optimizer_bytes_per_device
    assert probe.flops_per_device == pytest.approx(exact.flops_per_device, rel=0.01)
    assert probe.temp_bytes_per_device == pytest.approx(exact.temp_bytes_per_device, rel=0.10)
    with pytest.raises(ValueError, match=">= 2"):
        plan_by_depth(None, cfg, {"fsdp": 8}, probe=(1, 3))
