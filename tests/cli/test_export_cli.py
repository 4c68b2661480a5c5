"""`neodragon export`: one small end-to-end run (TFLite + ONNX + AI Hub dry run of the ContextAdapter) and the
usage / configuration errors, which must fail before anything is built. No network: qai_hub submission and
socket connections raise if called."""

import importlib.util
import json
import socket
import time

import pytest

pytest.importorskip("torch")
qai_hub = pytest.importorskip("qai_hub")
# Not importorskip: importing litert_torch turns on jax_enable_x64 process-wide (export/tflite.py scopes it).
if importlib.util.find_spec("litert_torch") is None:
    pytest.skip("litert_torch not installed", allow_module_level=True)
pytest.importorskip("onnxscript")

from neodragon_cli.main import main  # noqa: E402

pytestmark = [pytest.mark.export, pytest.mark.needs_torch]


def _refuse(*args, **kwargs):
    raise AssertionError("the CLI test reached for the network")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    for name in ("submit_compile_job", "submit_profile_job", "submit_inference_job", "upload_model", "get_devices"):
        monkeypatch.setattr(qai_hub, name, _refuse)
        monkeypatch.setattr(qai_hub.Client, name, _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "absent_client.ini"))
    monkeypatch.delenv("QAIHUB_API_TOKEN", raising=False)


def test_export_all_dry_run_one_component(tmp_path, capsys):
    out = tmp_path / "export"
    rc = main(["export", "all", "--config", "tiny", "--components", "context_adapter", "--precision", "fp32,fp16",
               "--out", str(out), "--latency-runs", "1", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0, text
    for f in ("tflite/context_adapter.fp32.tflite", "tflite/context_adapter.fp16.tflite", "onnx/context_adapter.onnx",
              "qnn/requests.json", "qnn/inputs/context_adapter.npz", "report.md", "report.json"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "| `context_adapter` | 37,184 |" in report and "None: every artifact converted" in report
    data = json.loads((out / "report.json").read_text())
    statuses = {(a["backend"], a["precision"]): a["status"] for a in data["artifacts"]}
    assert statuses == {("tflite", "fp32"): "ok", ("tflite", "fp16"): "ok", ("onnx", "fp32"): "ok",
                        ("qnn", "fp16"): "prepared"}
    assert data["stack"] == "neodragon" and data["components"][0]["torch_ms"] is not None
    jobs = json.loads((out / "qnn" / "requests.json").read_text())["jobs"]
    assert [j["name"] for j in jobs] == ["neodragon-context_adapter-fp16"]
    assert jobs[0]["input_specs"] == {"features": [[1, 32, 64], "float32"]}


@pytest.mark.parametrize("target", ["qnn", "all"])
def test_missing_ai_hub_configuration_fails_before_building(tmp_path, capsys, target):
    t0 = time.perf_counter()
    rc = main(["export", target, "--config", "tiny", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 5.0
    assert "Qualcomm AI Hub is not configured" in err and "qai-hub configure --api_token" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["export", "tflite", "--precision", "fp8"], "unknown TFLite precision"),
    (["export", "qnn", "--dry-run", "--qnn-precision", "int4"], "unknown AI Hub precision"),
    (["export", "tflite", "--device", "Snapdragon 8 Elite QRD"], "--device is for the qnn target"),
    (["export", "onnx", "--components", "unet"], "unknown component(s) ['unet']"),
    (["export", "onnx", "--mmdit-split", "9"], "mmdit_split must be between 1 and the number of blocks (4)"),
    (["export", "onnx", "--model", "no-such-release"], "--model 'no-such-release': no release named"),
    (["export", "onnx", "--model", "tiny-teacher", "--checkpoint", "x"], "give --model or --checkpoint, not both"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    rc = main(argv + ["--out", str(tmp_path / "x")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    """A missing or empty --checkpoint folder ended in a traceback (issue 23 item 1, as for generate)."""
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "empty", "is empty")):
        rc = main(["export", "onnx", "--config", "tiny", "--checkpoint", str(folder), "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "expected the official" in err and "Traceback" not in err
