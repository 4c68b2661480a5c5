"""Qualcomm AI Hub: compile the ONNX components for a Snapdragon device (QNN context binaries), profile them and
run them on the device against the PyTorch mirror.

Flow (``neodragon export qnn --device "Snapdragon 8 Elite QRD"``):

1. the components are exported to ONNX and checked in ONNX Runtime first (:mod:`export.onnx`; AI Hub compile
   jobs take ONNX or ``torch.export`` programs, and the ONNX files are what we already verify locally);
2. one :class:`JobRequest` per (component, precision): model file, device, ``input_specs`` (names, static
   shapes, dtypes of the ONNX inputs), compile ``options`` (``--target_runtime qnn_context_binary``, plus
   ``--quantize_full_type float16`` / ``w8a16`` (with calibration data = the example inputs) per precision),
   the profile options and the example inputs for the inference job;
3. ``dry_run=True`` writes ``requests.json`` (+ the inputs as ``.npz``) and touches no network;
4. otherwise the configuration is checked UP FRONT (:func:`check_configuration`: ``~/.qai_hub/client.ini``,
   ``QAIHUB_CLIENT_INI`` or ``QAIHUB_API_TOKEN``, then a TCP connection to the API host with a short timeout),
   because an unconfigured client fails only at the first call and an offline one retries for minutes; then
   compile -> download the context binary -> profile (latency, peak memory) + inference (on-device outputs
   compared with the mirror) per request, and a latency / memory table.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

import numpy as np

from export.components import Component
from export.report import ArtifactResult, compare, judge, write_json

DEFAULT_DEVICE = "Snapdragon 8 Elite QRD"
TARGET_RUNTIME = "qnn_context_binary"
# AI Hub compile options per precision (HTP runs float16 or integer; "fp32" leaves the choice to AI Hub).
PRECISION_OPTIONS = {"fp32": "", "fp16": "--quantize_full_type float16", "int8": "--quantize_full_type w8a16"}
NEEDS_CALIBRATION = {"int8"}
# Tolerances of the on-device outputs (max abs / max(1, max |mirror|)): HTP computes in float16 or lower.
DEVICE_TOLERANCES = {"fp32": 2e-2, "fp16": 2e-2, "int8": 1e-1}
TOKEN_ENV = "QAIHUB_API_TOKEN"
CONFIGURE_HELP = (
    "configure it with `qai-hub configure --api_token YOUR_API_TOKEN` (the token is on the Account page of "
    "https://workbench.aihub.qualcomm.com), or point QAIHUB_CLIENT_INI at a client.ini, or set "
    f"{TOKEN_ENV}; or run with --dry-run to write the job requests without touching the network"
)
HUB_DTYPES = ("float32", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16")


class HubConfigError(RuntimeError):
    """AI Hub is not configured or not reachable (message says how to fix it)."""


@dataclasses.dataclass
class HubConfig:
    api_token: str
    api_url: str
    web_url: str
    source: str  # where the token came from

    def client_config(self):
        import qai_hub

        return qai_hub.ClientConfig(api_token=self.api_token, api_url=self.api_url, web_url=self.web_url)


def config_path() -> Path:
    """The client.ini qai_hub reads: ``$QAIHUB_CLIENT_INI`` or ``~/.qai_hub/client.ini``."""
    return Path(os.path.expanduser(os.environ.get("QAIHUB_CLIENT_INI", "~/.qai_hub/client.ini")))


def check_configuration() -> HubConfig:
    """The AI Hub credentials, without any network access; :class:`HubConfigError` if there are none."""
    from qai_hub.public_rest_api import DEFAULT_HUB_API_URL, DEFAULT_HUB_WEB_URL

    path = config_path()
    if path.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
            api = parser["api"]
            token = api.get("api_token", "").strip()
        except (configparser.Error, KeyError) as err:
            raise HubConfigError(f"AI Hub config {path} is unreadable or has no [api] section ({err}); "
                                 f"{CONFIGURE_HELP}") from None
        if not token:
            raise HubConfigError(f"AI Hub config {path} has no api_token; {CONFIGURE_HELP}")
        return HubConfig(token, api.get("api_url", DEFAULT_HUB_API_URL), api.get("web_url", DEFAULT_HUB_WEB_URL),
                         str(path))
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return HubConfig(token, DEFAULT_HUB_API_URL, DEFAULT_HUB_WEB_URL, f"${TOKEN_ENV}")
    where = f"$QAIHUB_CLIENT_INI={os.environ['QAIHUB_CLIENT_INI']}" if "QAIHUB_CLIENT_INI" in os.environ else str(path)
    raise HubConfigError(f"Qualcomm AI Hub is not configured: {where} does not exist and {TOKEN_ENV} is not "
                         f"set; {CONFIGURE_HELP}")


def check_reachable(api_url: str, timeout: float = 5.0) -> None:
    """Fail fast (:class:`HubConfigError`) when the API host does not accept a TCP connection in ``timeout``."""
    u = urlparse(api_url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    if not host:
        raise HubConfigError(f"AI Hub api_url {api_url!r} has no host; {CONFIGURE_HELP}")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise HubConfigError(f"cannot reach Qualcomm AI Hub at {host}:{port} ({err}); check the network or "
                             f"proxy, or run with --dry-run") from None


# ---- requests ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class JobRequest:
    """Everything one compile + profile + inference round needs, in JSON-able form."""

    component: str
    group: str
    precision: str
    model: str  # the ONNX file
    model_sha256: str
    device: dict[str, Any]
    name: str
    input_specs: dict[str, list]  # name -> [shape, dtype]
    options: str
    profile_options: str
    inference_inputs: str  # .npz with the example inputs (one sample per input)
    calibration_data: str | None
    output_names: list[str]
    params: int

    def hub_input_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(v[0]), v[1]) for k, v in self.input_specs.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_input_specs(path: str | os.PathLike) -> dict[str, list]:
    """``{name: [shape, dtype]}`` read from the ONNX file's graph inputs (static shapes required)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if any(d is None or d <= 0 for d in dims):
            raise ValueError(f"{path}: input {inp.name!r} has a dynamic shape {dims}; AI Hub needs static shapes")
        out[inp.name] = [dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name]
    return out


def compile_options(precision: str, extra: str = "") -> str:
    if precision not in PRECISION_OPTIONS:
        raise ValueError(f"unknown AI Hub precision {precision!r}: choose from {', '.join(PRECISION_OPTIONS)}")
    return " ".join(x for x in (f"--target_runtime {TARGET_RUNTIME}", PRECISION_OPTIONS[precision], extra) if x)


def prepare_requests(
    components: Iterable[Component], onnx_results: Iterable[ArtifactResult], out_dir: str | os.PathLike, *,
    device: str = DEFAULT_DEVICE, precisions: Iterable[str] = ("fp16",), extra_options: str = "",
) -> tuple[list[JobRequest], list[ArtifactResult]]:
    """One request per (component with a good ONNX file, precision), with its inputs saved beside it.

    Components whose ONNX export failed get a ``not_converted`` result instead (no job for a graph we could
    not verify locally). Writes ``<out>/inputs/<component>.npz``.
    """
    out_dir = Path(out_dir)
    onnx_by = {r.component: r for r in onnx_results}
    precisions = list(dict.fromkeys(precisions))
    for p in precisions:
        compile_options(p)  # validates
    requests, skipped = [], []
    for comp in components:
        r = onnx_by.get(comp.name)
        if r is None or not r.ok or not r.path:
            for p in precisions:
                skipped.append(ArtifactResult(
                    component=comp.name, group=comp.group, backend="qnn", precision=p, status="not_converted",
                    params=comp.params, failed_ops=list(getattr(r, "failed_ops", [])),
                    message="no verified ONNX artifact to compile" + (f" ({r.status}: {r.message[:300]})" if r else ""),
                ))
            continue
        specs = onnx_input_specs(r.path)
        if list(specs) != list(comp.inputs):
            raise RuntimeError(f"{r.path}: ONNX inputs {list(specs)} differ from the component's {list(comp.inputs)}")
        bad = {k: v[1] for k, v in specs.items() if v[1] not in HUB_DTYPES}
        if bad:
            raise RuntimeError(f"{comp.name}: input dtypes {bad} are not accepted by AI Hub ({', '.join(HUB_DTYPES)})")
        inputs_path = out_dir / "inputs" / f"{comp.name}.npz"
        inputs_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(inputs_path, **comp.inputs)
        sha = _sha256(Path(r.path))
        for p in precisions:
            requests.append(JobRequest(
                component=comp.name, group=comp.group, precision=p, model=str(Path(r.path).resolve()),
                model_sha256=sha, device={"name": device, "os": "", "attributes": []},
                name=f"neodragon-{comp.name}-{p}", input_specs=specs, options=compile_options(p, extra_options),
                profile_options="", inference_inputs=str(inputs_path.resolve()),
                calibration_data=str(inputs_path.resolve()) if p in NEEDS_CALIBRATION else None,
                output_names=list(comp.output_names), params=comp.params,
            ))
    return requests, skipped


def write_requests(requests: list[JobRequest], path: str | os.PathLike, *, device: str) -> Path:
    path = Path(path)
    write_json(path, {
        "device": device,
        "target_runtime": TARGET_RUNTIME,
        "note": "dry run: nothing was submitted. Each entry maps onto qai_hub.submit_compile_job(model, device, "
                "name, input_specs, options[, calibration_data]), then submit_profile_job(target_model, device, "
                "options=profile_options) and submit_inference_job(target_model, device, inputs).",
        "jobs": [dataclasses.asdict(r) for r in requests],
    })
    return path


# ---- submission ---------------------------------------------------------------------------------------------------


def _dataset(npz_path: str) -> dict[str, list[np.ndarray]]:
    with np.load(npz_path) as data:
        return {k: [data[k]] for k in data.files}


def submit(requests: list[JobRequest], out_dir: str | os.PathLike, components: Mapping[str, Component], *,
           config: HubConfig | None = None, log=print) -> list[ArtifactResult]:
    """Compile, download, profile and run every request on the device (blocking until the jobs finish)."""
    import qai_hub

    config = config or check_configuration()
    check_reachable(config.api_url)
    client = qai_hub.Client(config=config.client_config())
    out_dir = Path(out_dir)
    results = []
    for req in requests:
        comp = components[req.component]
        res = ArtifactResult(component=req.component, group=req.group, backend="qnn", precision=req.precision,
                             status="failed", params=req.params)
        try:
            device = qai_hub.Device(req.device["name"], req.device.get("os", ""), req.device.get("attributes", []))
            cjob = client.submit_compile_job(
                model=req.model, device=device, name=req.name, input_specs=req.hub_input_specs(),
                options=req.options,
                calibration_data=_dataset(req.calibration_data) if req.calibration_data else None,
            )
            log(f"qnn    {req.component:<24} {req.precision:<7} compile job {cjob.job_id}")
            target = cjob.get_target_model()
            if target is None:
                status = cjob.get_status()
                res.message = f"compile job {cjob.job_id} failed: {getattr(status, 'message', status)}"
                res.extra["compile_job"] = cjob.job_id
                results.append(res)
                continue
            binary = out_dir / f"{req.component}.{req.precision}.bin"
            target.download(str(binary))
            res.path, res.size_bytes = str(binary), binary.stat().st_size
            pjob = client.submit_profile_job(model=target, device=device, name=req.name, options=req.profile_options)
            ijob = client.submit_inference_job(model=target, device=device, inputs=_dataset(req.inference_inputs),
                                               name=req.name)
            res.extra.update(compile_job=cjob.job_id, profile_job=pjob.job_id, inference_job=ijob.job_id)
            summary = (pjob.download_profile() or {}).get("execution_summary", {})
            if "estimated_inference_time" in summary:
                res.latency_ms = summary["estimated_inference_time"] / 1000.0  # microseconds
            if "estimated_inference_peak_memory" in summary:
                res.extra["peak_memory_bytes"] = summary["estimated_inference_peak_memory"]
            outputs = ijob.download_output_data() or {}
            values = list(outputs.values())
            got = {n: np.asarray(outputs[n][0] if n in outputs else values[i][0])
                   for i, n in enumerate(comp.output_names)}
            judge(res, compare(got, comp.expected(), comp.image_outputs), DEVICE_TOLERANCES[req.precision])
        except Exception as err:  # noqa: BLE001 - one failing component must not hide the others
            res.message = f"{type(err).__name__}: {err}"[:2000]
        results.append(res)
    return results


def device_table(results: list[ArtifactResult], device: str) -> str:
    """Markdown latency / memory table of the AI Hub results (error relative, as the device tolerances)."""
    lines = [f"## Qualcomm AI Hub: {device}", "",
             "| component | precision | status | context binary | latency (ms) | peak memory | rel err |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        mem = r.extra.get("peak_memory_bytes")
        lines.append(
            f"| `{r.component}` | {r.precision} | {r.status} | "
            f"{'—' if r.size_bytes is None else f'{r.size_bytes / 1024:.0f} KB'} | "
            f"{'—' if r.latency_ms is None else f'{r.latency_ms:.2f}'} | "
            f"{'—' if mem is None else f'{mem / 2**20:.1f} MB'} | "
            f"{'—' if r.max_relative_error is None else f'{r.max_relative_error:.1e}'} |")
    return "\n".join(lines) + "\n"


def load_requests(path: str | os.PathLike) -> list[JobRequest]:
    data = json.loads(Path(path).read_text())
    return [JobRequest(**j) for j in data["jobs"]]


__all__ = [
    "DEFAULT_DEVICE", "DEVICE_TOLERANCES", "HubConfig", "HubConfigError", "JobRequest", "PRECISION_OPTIONS",
    "TARGET_RUNTIME", "check_configuration", "check_reachable", "compile_options", "device_table",
    "load_requests", "onnx_input_specs", "prepare_requests", "submit", "write_requests",
]
