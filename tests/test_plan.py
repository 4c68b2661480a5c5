"""`neodragon plan`: parameter counts and FLOPs computed without allocating."""

import json

import pytest

from neodragon_cli.main import main
from neodragon_jax.config import load_config
from neodragon_jax.plan import format_table, plan, schedule_flops


def test_tiny_plan_counts_and_flops_are_consistent():
    cfg = load_config("tiny")
    comps = {c.name: c for c in plan(cfg)}
    assert {"T5 encoder", "CLIP-L", "CLIP-bigG", "MMDiT", "VAE encoder", "native decoder", "light decoder"} <= set(comps)
    mmdit = comps["MMDiT"]
    per_call = {c.label: c.flops for c in mmdit.calls if c.label.startswith("unit")}
    # 17 frames -> 3 latent frames -> 3 units x 3 stages.
    assert len(per_call) == 9
    # More history tokens and finer stages cost more: unit 2 stage 2 is the most expensive call.
    assert max(per_call, key=per_call.get) == "unit 2 stage 2"
    assert per_call["unit 0 stage 0"] < per_call["unit 0 stage 2"]
    assert all(f > 0 for f in per_call.values())
    # The video totals are the schedule-weighted sums of the per-call figures.
    table = {(int(k.split()[1]), int(k.split()[3])): v for k, v in per_call.items()}
    total, nfe = schedule_flops(table, (20, 20, 20), (10, 10, 10), 7.0, 5.0)
    assert nfe == (3 * 20 + 2 * 3 * 10) * 2
    assert any(c.flops == pytest.approx(total) for c in mmdit.calls)
    text = format_table(cfg, list(comps.values()))
    assert "| MMDiT |" in text and "unit 2 stage 2" in text


def test_neodragon_text_stack_is_a_small_fraction_of_t5_xxl():
    teacher = {c.name: c for c in plan(load_config("pyramid-flow-sd3-320p"), ["text"])}
    student = {c.name: c for c in plan(load_config("neodragon-320p"), ["text"])}
    assert teacher["T5 encoder"].params == 4_762_310_656
    assert student["DistilT5"].params == 129_551_488
    assert student["ContextAdapter"].params == 130_041_344
    t5 = teacher["T5 encoder"].calls[0].flops
    small = student["DistilT5"].calls[0].flops + student["ContextAdapter"].calls[0].flops
    assert 0.02 < small / t5 < 0.1


def test_plan_cli_json(capsys):
    assert main(["plan", "--config", "tiny", "--parts", "text", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["config"] == "tiny"
    assert {c["name"] for c in report[0]["components"]} == {"T5 encoder", "CLIP-L", "CLIP-bigG"}


def test_plan_cli_reports_config_errors(capsys):
    assert main(["plan", "--config", "tiny", "--set", "model.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
