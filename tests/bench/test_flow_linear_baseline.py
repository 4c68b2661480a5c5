"""bench/bench_flow_linear_baseline.py reads a demo workdir (records + flow metrics) and names what is missing."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_flow_linear_baseline",
                                                  ROOT / "bench" / "bench_flow_linear_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_reads_a_demo_workdir(bench, tmp_path, monkeypatch, capsys):
    from neodragon_jax.config import load_config

    cfg = load_config("tiny", ["pyramid.frames_per_unit=8"])
    (tmp_path / "demo.json").write_text(json.dumps({"config": {
        "pyramid": dataclasses.asdict(cfg.pyramid), "model": {"mmdit": {"patch_size": 2}}}}))
    rec = tmp_path / "latents" / "records"
    rec.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        np.savez(rec / f"{i:06d}.npz", latents=rng.standard_normal((4, 9, 8, 8)).astype(np.float32))
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss/stage0": 0.1, "loss/stage1": 0.2, "loss/stage2": 0.5 + i}) + "\n"
                for i in range(10)))
    monkeypatch.setattr(sys, "argv", ["bench", "--workdir", str(tmp_path), "--records", "16"])
    bench.main()
    out = capsys.readouterr().out
    assert "16 records (4, 9, 8, 8), patch 2, 3 stages" in out
    lines = [line for line in out.splitlines() if line.startswith("| 2 | 8x8 |")]
    assert len(lines) == 1 and lines[0].endswith("| 9.500 |")  # the teacher's last 10% of steps: step 9 only


def test_script_names_what_is_missing(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="run `neodragon demo"):
        bench.main()
