"""Qualcomm AI Hub: configuration checks, dry-run job requests, and the submission logic against a fake client.

Nothing here reaches the network: every qai_hub submission / upload / query function and socket connections
raise if called (autouse fixture), and the credentials come from files / variables under tmp_path.
"""

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
qai_hub = pytest.importorskip("qai_hub")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from export import qnn  # noqa: E402
from export.components import ExportOptions, build_components, load_jax_models, neodragon_variant  # noqa: E402
from export.onnx import export_onnx  # noqa: E402
from export.report import ArtifactResult  # noqa: E402
from neodragon_jax.config import load_config  # noqa: E402

pytestmark = [pytest.mark.export, pytest.mark.needs_torch]

CFG = neodragon_variant(load_config("tiny", ["model.mmdit.num_layers=2"]))
NAMES = ("distil_t5", "context_adapter", "light_decoder_step")  # int32 + float inputs, 5 inputs / 4 outputs
NETWORK_FUNCS = ("submit_compile_job", "submit_profile_job", "submit_inference_job", "submit_compile_and_profile_jobs",
                 "submit_quantize_job", "upload_model", "upload_dataset", "get_devices", "get_job", "get_model")


class NetworkUsed(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise NetworkUsed("a test reached for the network")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    for name in NETWORK_FUNCS:
        monkeypatch.setattr(qai_hub, name, _refuse)
        if hasattr(qai_hub.Client, name):
            monkeypatch.setattr(qai_hub.Client, name, _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "no_such_client.ini"))
    monkeypatch.delenv(qnn.TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub")
    cfg, models = load_jax_models(CFG, seed=0)
    comps = build_components(cfg, models, ExportOptions(components=NAMES))
    onnx_results = export_onnx(comps, out / "onnx")
    assert all(r.ok for r in onnx_results), [r.message for r in onnx_results]
    requests, skipped = qnn.prepare_requests(comps, onnx_results, out / "qnn", precisions=("fp16", "int8"))
    path = qnn.write_requests(requests, out / "qnn" / "requests.json", device=qnn.DEFAULT_DEVICE)
    return out, {c.name: c for c in comps}, onnx_results, requests, skipped, path


# ---- configuration ---------------------------------------------------------------------------------------------


def test_missing_configuration_fails_fast_with_instructions(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(qnn.HubConfigError) as err:
        qnn.check_configuration()
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert "qai-hub configure --api_token" in msg and "no_such_client.ini" in msg and qnn.TOKEN_ENV in msg
    assert "--dry-run" in msg


def test_configuration_sources(tmp_path, monkeypatch):
    ini = tmp_path / "client.ini"
    ini.write_text("[api]\napi_token = \napi_url = https://hub.example\nweb_url = https://hub.example\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    with pytest.raises(qnn.HubConfigError, match="has no api_token"):
        qnn.check_configuration()
    ini.write_text("[api]\napi_token = abc123\napi_url = https://hub.example\nweb_url = https://hub.example\n")
    cfg = qnn.check_configuration()
    assert (cfg.api_token, cfg.api_url, cfg.source) == ("abc123", "https://hub.example", str(ini))
    assert cfg.client_config().api_token == "abc123"  # builds qai_hub.ClientConfig offline
    ini.write_text("not an ini file")
    with pytest.raises(qnn.HubConfigError, match="unreadable"):
        qnn.check_configuration()
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "absent.ini"))
    monkeypatch.setenv(qnn.TOKEN_ENV, "tok")
    cfg = qnn.check_configuration()
    assert cfg.api_token == "tok" and cfg.source == f"${qnn.TOKEN_ENV}"


def test_unreachable_hub_fails_fast(monkeypatch):
    def refused(*a, **k):
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(qnn.HubConfigError, match="cannot reach Qualcomm AI Hub at hub.example:443"):
        qnn.check_reachable("https://hub.example")


def test_submit_checks_configuration_before_any_call(prepared):
    out, comps, _, requests, _, _ = prepared
    with pytest.raises(qnn.HubConfigError, match="qai-hub configure"):
        qnn.submit(requests, out / "qnn", comps)


# ---- dry run ----------------------------------------------------------------------------------------------------


def test_dry_run_requests_are_well_formed(prepared):
    from qai_hub import api_utils

    out, comps, onnx_results, requests, skipped, path = prepared
    assert not skipped
    assert [(r.component, r.precision) for r in requests] == [(n, p) for n in NAMES for p in ("fp16", "int8")]
    data = json.loads(path.read_text())
    assert data["device"] == "Snapdragon 8 Elite QRD" and len(data["jobs"]) == len(requests)
    assert qnn.load_requests(path) == requests
    onnx_by = {r.component: r for r in onnx_results}
    for req in requests:
        comp = comps[req.component]
        assert Path(req.model) == Path(onnx_by[req.component].path).resolve() and Path(req.model).is_file()
        assert req.model_sha256 == qnn._sha256(Path(req.model))
        # input_specs: the component's inputs, in order, with the artifact's shapes and dtypes
        assert req.hub_input_specs() == {k: (tuple(v.shape), str(v.dtype)) for k, v in comp.inputs.items()}
        assert req.input_specs == qnn.onnx_input_specs(req.model)
        api_utils.input_shapes_to_tensor_type_list_pb(req.hub_input_specs())  # qai_hub's own (offline) encoding
        assert qai_hub.Device(req.device["name"]).name == "Snapdragon 8 Elite QRD"
        assert req.options.startswith("--target_runtime qnn_context_binary")
        assert ("--quantize_full_type float16" in req.options) == (req.precision == "fp16")
        assert ("--quantize_full_type w8a16" in req.options) == (req.precision == "int8")
        assert (req.calibration_data is not None) == (req.precision == "int8")
        with np.load(req.inference_inputs) as inputs:
            assert list(inputs.files) == list(comp.inputs)
            for k, v in comp.inputs.items():
                assert np.array_equal(inputs[k], v)
        assert req.output_names == list(comp.output_names)
    ids = requests[0].input_specs["ids"]
    assert ids == [[1, CFG.model.text.max_length], "int32"]


def test_component_without_verified_onnx_gets_no_job(prepared, tmp_path):
    _, comps, onnx_results, _, _, _ = prepared
    bad = [ArtifactResult(component=r.component, group=r.group, backend="onnx", precision="fp32", status="failed",
                          message="out of tolerance") if r.component == "context_adapter" else r for r in onnx_results]
    requests, skipped = qnn.prepare_requests(list(comps.values()), bad, tmp_path)
    assert {r.component for r in requests} == {"distil_t5", "light_decoder_step"}
    assert [(s.component, s.status) for s in skipped] == [("context_adapter", "not_converted")]
    assert "no verified ONNX artifact" in skipped[0].message


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="unknown AI Hub precision 'int4'"):
        qnn.compile_options("int4")


# ---- submission logic, against a fake client -------------------------------------------------------------------


class FakeJob:
    def __init__(self, job_id, target=None, profile=None, outputs=None):
        self.job_id, self._target, self._profile, self._outputs = job_id, target, profile, outputs

    def get_target_model(self):
        return self._target

    def get_status(self):
        return type("Status", (), {"message": "compile failed: op X unsupported"})()

    def download_profile(self):
        return self._profile

    def download_output_data(self):
        return self._outputs


class FakeModel:
    def download(self, filename):
        Path(filename).write_bytes(b"context binary")
        return filename


def test_submit_flow_with_fake_client(prepared, tmp_path, monkeypatch):
    """compile -> download -> profile + inference -> compared with the mirror; one failing compile reported."""
    _, comps, _, requests, _, _ = prepared
    calls = []

    class FakeClient:
        def __init__(self, config=None):
            self.config = config

        def submit_compile_job(self, model, device, name, input_specs, options, calibration_data=None):
            calls.append(("compile", name, options, calibration_data is not None))
            return FakeJob("c1", target=None if "context_adapter" in name else FakeModel())

        def submit_profile_job(self, model, device, name, options):
            calls.append(("profile", name))
            return FakeJob("p1", profile={"execution_summary": {"estimated_inference_time": 1500,
                                                                "estimated_inference_peak_memory": 3 * 2**20}})

        def submit_inference_job(self, model, device, inputs, name):
            calls.append(("inference", name))
            comp = comps[name.split("-")[1]]
            assert set(inputs) == set(comp.inputs)
            # the "device" returns the mirror's outputs plus float16-sized noise
            noisy = {f"output_{i}": [v + 1e-3] for i, v in enumerate(comp.expected().values())}
            return FakeJob("i1", outputs=noisy)

    monkeypatch.setattr(qai_hub, "Client", FakeClient)
    monkeypatch.setattr(qnn, "check_reachable", lambda url, timeout=5.0: None)
    config = qnn.HubConfig("tok", "https://hub.example", "https://hub.example", "test")
    fp16 = [r for r in requests if r.precision == "fp16"]
    results = qnn.submit(fp16, tmp_path, comps, config=config, log=lambda *_: None)
    by = {r.component: r for r in results}
    assert by["context_adapter"].status == "failed" and "op X unsupported" in by["context_adapter"].message
    for name in ("distil_t5", "light_decoder_step"):
        r = by[name]
        assert r.status == "ok", r.message
        assert r.latency_ms == 1.5 and r.extra["peak_memory_bytes"] == 3 * 2**20
        assert Path(r.path).read_bytes() == b"context binary"
        assert 0.9e-3 < r.max_abs_error < 1.1e-3
    assert [c[0] for c in calls].count("compile") == 3 and [c[0] for c in calls].count("inference") == 2
    table = qnn.device_table(results, qnn.DEFAULT_DEVICE)
    assert "| `distil_t5` | fp16 | ok |" in table and "1.50" in table and "3.0 MB" in table
