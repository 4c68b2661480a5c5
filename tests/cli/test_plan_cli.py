"""`neodragon plan --mesh`: the AOT-compiled train step's per-device memory table; error messages."""

import os
import re

import pytest

from neodragon_cli.main import main
from neodragon_cli.train import plan_config, resolve_plan_stage

SMALL = ["--config", "tiny", "--set", "model.mmdit.num_layers=1", "--set", "train.pyramid_units=[0]"]


def _bytes(text: str, label: str) -> float:
    m = re.search(rf"{label}\s+([\d.]+) (GiB|MiB|KiB)", text)
    assert m, (label, text)
    return float(m.group(1)) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}[m.group(2)]


def test_plan_mesh_prints_the_memory_table(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # plan_mesh appends a compile flag
    assert main(["plan", *SMALL, "--mesh", "data=2,fsdp=4", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    for line in ("train step of stage 'flow'", "mesh data=2 x fsdp=4 x tensor=1, rules 'fsdp'",
                 "global batch 16", "per device: params", "optimizer", "temporaries", "total",
                 "FLOPs per step", "activations saved for backward", "fits: 16 GiB yes, 95 GiB yes"):
        assert line in out, line
    n = int(re.search(r"trained params: mmdit ([\d,]+)", out).group(1).replace(",", ""))
    params, opt = _bytes(out, "per device: params"), _bytes(out, "optimizer")
    # FSDP over 4 devices (data=2 replicates): each holds about a quarter of the float32 weights, Adam twice that
    assert 0.2 * 4 * n <= params < 0.4 * 4 * n
    assert 1.9 * params < opt < 2.1 * params
    assert _bytes(out, "temporaries") > 0 and float(re.search(r"FLOPs per step: ([\d.e+]+)", out).group(1)) > 0


def test_plan_config_defaults_rules_and_batch_from_the_mesh():
    cfg, shape = plan_config("neodragon-320p", [], "data=8,fsdp=32", "flow", None)
    assert shape == {"data": 8, "fsdp": 32, "tensor": 1} and cfg.mesh.rules == "fsdp"
    assert cfg.train.global_batch == 4 * 256 and cfg.train.stage == "flow"
    cfg, _ = plan_config("tiny", [], "fsdp=2,tensor=4", "flow", None)
    assert cfg.mesh.rules == "fsdp_tp" and cfg.train.global_batch == 8  # batch over data x fsdp only
    cfg, _ = plan_config("tiny", ["mesh.rules=dp"], "fsdp=2,tensor=4", "flow", 3)
    assert cfg.mesh.rules == "dp" and cfg.train.global_batch == 3
    assert resolve_plan_stage("flow") == "flow"
    assert resolve_plan_stage("dmd") == "dmd"


@pytest.mark.parametrize("mesh, message", [
    ("data=2,foo=4", "unknown mesh axis 'foo'"),
    ("data=two", "size 'two' is not an integer"),
    ("data=2,fsdp=-1", "give every axis a size"),
    ("data2", "must look like axis=size"),
])
def test_plan_bad_mesh_is_one_clear_line(mesh, message, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    assert main(["plan", "--config", "tiny", "--mesh", mesh]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"neodragon plan: bad --mesh {mesh!r}") and message in err and "Traceback" not in err


def test_plan_stage_flags_need_a_mesh(capsys):
    assert main(["plan", "--config", "tiny", "--stage", "dmd"]) == 2
    assert "need --mesh" in capsys.readouterr().err
    assert main(["plan", "--config", "tiny", "--mesh", "data=2", "--stage", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown --stage 'nosuch'" in err and "'flow'" in err and err.count("\n") == 1


@pytest.mark.parametrize("probe, message", [("x", "expects two block counts like 2,4"),
                                            ("1,3", "two different depths >= 2"), ("3,3", "two different depths")])
def test_plan_bad_depth_probe_is_one_clear_line(probe, message, capsys):
    assert main(["plan", "--config", "tiny", "--mesh", "fsdp=8", "--depth-probe", probe]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_every_verb_documents_set(capsys):
    """`--set` had no help text in `generate` and `plan` (issue 23 item 8)."""
    from neodragon_cli.main import build_parser

    parser = build_parser()
    for verb in ("plan", "generate", "train", "export"):
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--help"])
        out = capsys.readouterr().out
        assert re.search(r"^\s+--set KEY=VALUE\s+dotted config override, repeatable", out, re.M), (verb, out)
