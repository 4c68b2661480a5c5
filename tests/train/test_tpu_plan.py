"""TPU-topology plans: topology parsing and errors, the fit verdict on synthetic reports, and (with libtpu)
the tiny flow step compiled by the TPU compiler for a v5e topology."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neodragon_jax.accelerators import (
    CHIPS,
    GIB,
    TopologyError,
    fit_verdict,
    fits_line,
    libtpu_available,
    parse_topology,
    topology_chips,
)
from train.plan import PlanReport, extrapolate_depth

NO_LIBTPU = 'libtpu is not installed (pip install -c constraints.txt -e ".[tpu]"): no TPU compiler to plan with'


def _report(**kw) -> PlanReport:
    base = dict(stage="flow", mesh={"data": 2, "fsdp": 8, "tensor": 1}, rules="fsdp_sp", platform="tpu",
                global_batch=32, micro_batches=1, num_params={"mmdit": 10}, num_frozen_params={},
                param_bytes_per_device=1 * GIB, optimizer_bytes_per_device=2 * GIB, frozen_bytes_per_device=0,
                batch_bytes_per_device=0, temp_bytes_per_device=10 * GIB, argument_bytes_per_device=3 * GIB,
                output_bytes_per_device=3 * GIB, alias_bytes_per_device=3 * GIB, flops_per_device=1.97e12,
                flops_per_step=16 * 1.97e12, compile_seconds=1.0, num_layers=2, topology="v5e:4x4", chip="v5e",
                attention="splash", remat="none", generated_code_bytes_per_device=GIB // 2, est_step_seconds=0.02)
    base.update(kw)
    return PlanReport(**base)


def test_parse_topology_and_chip_counts():
    chip, shape = parse_topology("v5e:4x4")
    assert chip.name == "v5e" and shape == (4, 4) and topology_chips("v5e:4x4") == 16
    assert topology_chips("v5p:4x4x8") == 128 and parse_topology("V6E:16x16")[0].name == "v6e"
    for bad in ("v9:2x2", "v5e-16", "v5e", "", "v5e:4"):
        with pytest.raises(TopologyError, match="v5e:2x2"):  # the message lists the valid shapes
            parse_topology(bad)


def test_fit_verdict_on_synthetic_reports():
    r = _report()  # 1 + 2 + 10 + 0.5 = 13.5 GiB
    assert r.total_bytes_per_device == int(13.5 * GIB)
    v = fit_verdict(r.total_bytes_per_device)
    assert v["v5e"] and v["v5p"] and v["v6e"]
    big = _report(temp_bytes_per_device=14 * GIB)  # 17.5 GiB
    v = fit_verdict(big.total_bytes_per_device)
    assert not v["v5e"] and v["v4"] and v["v6e"] and v["v5p"] and v["h100"]
    edge = _report(temp_bytes_per_device=16 * GIB - int(3.5 * GIB))  # exactly 16 GiB: fits
    assert fit_verdict(edge.total_bytes_per_device)["v5e"]
    assert not fit_verdict(edge.total_bytes_per_device + 1)["v5e"]
    line = fits_line(big.total_bytes_per_device, compiled_for="v5e")
    assert line.startswith("fits: v5e 16 GiB NO, ") and "v5p 95 GiB yes" in line
    # MFU: 1.97 TFLOP in 20 ms on a 197 TFLOP/s chip = 50 %
    assert r.est_mfu == pytest.approx(0.5)
    assert _report(est_step_seconds=None).est_mfu is None and _report(chip=None).est_mfu is None
    text = r.table()
    assert "TPU v5e topology v5e:4x4" in text and "MFU 50.0%" in text and "code" in text


def test_report_json_roundtrip_and_old_reports_load():
    r = _report()
    assert PlanReport.from_json(r.to_json()) == r
    import json

    old = json.loads(r.to_json())
    for k in ("topology", "chip", "attention", "remat", "generated_code_bytes_per_device",
              "bytes_accessed_per_device", "est_step_seconds"):
        old.pop(k)
    back = PlanReport.from_json(json.dumps(old))  # a CPU report written before these fields existed
    assert back.topology is None and back.est_mfu is None and back.generated_code_bytes_per_device == 0


def test_depth_extrapolation_keeps_tpu_fields():
    lo = _report(num_layers=2, temp_bytes_per_device=2 * GIB, est_step_seconds=0.01, flops_per_device=1e12)
    hi = _report(num_layers=4, temp_bytes_per_device=4 * GIB, est_step_seconds=0.02, flops_per_device=2e12)
    r = extrapolate_depth(lo, hi, 18)
    assert r.temp_bytes_per_device == 18 * GIB and r.est_step_seconds == pytest.approx(0.09)
    assert r.topology == "v5e:4x4" and r.chip == "v5e" and r.depth_probe == (2, 4)
    assert extrapolate_depth(lo, _report(num_layers=4, est_step_seconds=None), 18).est_step_seconds is None


def test_chip_table_cites_sources():
    for c in CHIPS.values():
        assert c.source.startswith("https://") and c.hbm_bytes > 0 and c.peak_bf16_flops > 1e14


@pytest.mark.parametrize("argv, needle", [
    (["--topology", "v9:2x2"], "unknown TPU topology 'v9:2x2'"),
    (["--topology", "v5e:4x4", "--mesh", "data=1,fsdp=8"], "has 8 devices but topology v5e:4x4 has 16 chips"),
    (["--topology", "v5e:4x4", "--mesh", "data=2,fsdp=banana"], "bad --mesh"),
    (["--topology", "v5e:4x4", "--stage", "flow,bogus"], "unknown --stage bogus"),
])
def test_plan_topology_usage_errors(argv, needle, capsys):
    from neodragon_cli.main import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.skipif(libtpu_available(), reason="libtpu is installed: the no-libtpu message cannot be checked")
def test_plan_topology_without_libtpu_says_how_to_install(capsys):
    from neodragon_cli.main import main

    assert main(["plan", "--topology", "v5e:2x2", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert '.[tpu]' in err and len(err.strip().splitlines()) == 1


def test_splash_under_a_mesh_matches_reference():
    """The splash path inside shard_map (batch over what divides it, heads over the rest) on 8 CPU devices,
    in interpret mode, against the dense reference."""
    from neodragon_jax.layers.attention import JointMask, attend, joint_attention_bias, masked_attention
    from neodragon_jax.sharding import activate, make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices=jax.devices()[:8])
    b, s, heads, k = 2, 16, 4, 64
    frames = (40, 72)
    pos = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(frames)])[None]
    tm = jnp.asarray(np.arange(s)[None] < np.array([[4], [16]]))
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.standard_normal((b, s + sum(frames), heads, k)), jnp.float32) for _ in range(3))
    ref = masked_attention(q, kk, v, joint_attention_bias(tm, np.ones_like(pos), pos))
    with activate(mesh, "fsdp_sp"):
        mask = JointMask.build(tm, np.ones_like(pos), pos, impl="splash")
        out = jax.jit(lambda a, bb, c: attend(a, bb, c, mask))(q, kk, v)
    assert float(jnp.max(jnp.abs(out - ref))) < 1e-5


@pytest.mark.skipif(not libtpu_available(), reason=NO_LIBTPU)
def test_tpu_topology_plan_of_the_tiny_step():
    """The tiny flow step (1 block, one pyramid layout) compiled by the TPU compiler for a v5e:2x2 topology:
    memory from the compiler's buffer assignment, FLOPs including the splash kernels, an estimated step time."""
    from neodragon_jax.config import load_config
    from train.plan import plan

    cfg = load_config("tiny", ["model.mmdit.num_layers=1", "train.pyramid_units=[0]", "mesh.rules=fsdp_sp"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage="flow", global_batch=8))
    r = plan(None, cfg, "data=1,fsdp=4", global_batch=8, topology="v5e:2x2")
    assert r.platform == "tpu" and r.chip == "v5e" and r.topology == "v5e:2x2"
    assert r.attention == "splash" and r.remat == "none"
    assert r.temp_bytes_per_device > 0 and r.generated_code_bytes_per_device > 0
    assert r.flops_per_device > 0 and r.est_step_seconds is not None and r.est_step_seconds > 0
    assert 0 < r.est_mfu < 1
    assert fit_verdict(r.total_bytes_per_device)["v5e"]
    with pytest.raises(TopologyError, match="4 chips"):
        plan(None, cfg, "data=1,fsdp=8", global_batch=8, topology="v5e:2x2")
