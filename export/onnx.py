"""ONNX export of the static components (``torch.onnx.export``, dynamo exporter) + ONNX Runtime parity.

``<out>/<name>.onnx`` holds the weights inline (``external_data=False``: the components are small enough; a
graph over the 2 GB protobuf limit must be split, e.g. ``mmdit_split``), with the component's input and
output names, opset :data:`OPSET`. Each file is checked with ``onnx.checker`` and run in ONNX Runtime (CPU)
on the component's example inputs against the PyTorch mirror (tolerance ``TOLERANCES["fp32"]``); a failing
artifact is moved to ``failed/`` and reported as such. The same files feed the AI Hub compile jobs
(:mod:`export.qnn`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from export.components import Component
from export.report import TOLERANCES, ArtifactResult, compare, extract_op_names, judge, measure_latency

OPSET = 18
TWO_GB = 2**31


def export_onnx_file(component: Component, path: str | os.PathLike) -> Path:
    """Write ``component`` as a self-contained ONNX file (raises what the exporter raises)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            component.module.eval(), component.torch_inputs(), str(path), dynamo=True, external_data=False,
            input_names=list(component.inputs), output_names=list(component.output_names), opset_version=OPSET,
            optimize=True, verbose=False,
        )
    if path.with_suffix(".onnx.data").exists():
        raise RuntimeError(f"{path} was written with external data; the exporters expect one self-contained file")
    return path


class ORTRunner:
    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(inputs[k]) for k in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feed)))


def export_component(component: Component, out_dir: str | os.PathLike, *, latency_runs: int = 0,
                     num_threads: int | None = None) -> ArtifactResult:
    """Export, check and run one component; ``ArtifactResult(backend="onnx", precision="fp32")``."""
    import onnx

    out_dir = Path(out_dir)
    res = ArtifactResult(component=component.name, group=component.group, backend="onnx", precision="fp32",
                         status="failed", params=component.params)
    path = out_dir / f"{component.name}.onnx"
    try:
        export_onnx_file(component, path)
        onnx.checker.check_model(str(path))
    except Exception as err:  # noqa: BLE001 - reported with the op names it mentions
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        res.status, res.message, res.failed_ops = "not_converted", msg[:2000], extract_op_names(msg)
        if path.exists():
            res.path = str(_to_failed(path))
        return res
    res.path, res.size_bytes = str(path), path.stat().st_size
    try:
        runner = ORTRunner(path, num_threads)
        missing = set(runner.input_names) ^ set(component.inputs)
        if missing:
            raise RuntimeError(f"ONNX inputs {runner.input_names} differ from the component's {list(component.inputs)}")
        got = runner(component.inputs)
        judge(res, compare(got, component.expected(), component.image_outputs), TOLERANCES["fp32"])
        if latency_runs:
            res.latency_ms = measure_latency(lambda: runner(component.inputs), latency_runs)
    except Exception as err:  # noqa: BLE001
        msg = " ".join(f"ONNX Runtime failed: {type(err).__name__}: {err}".split())
        res.status, res.message, res.failed_ops = "failed", msg[:2000], extract_op_names(msg)
    if not res.ok:
        res.path = str(_to_failed(path))
    return res


def _to_failed(path: Path) -> Path:
    dest = path.parent / "failed" / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), dest)
    return dest


def export_onnx(components: Iterable[Component], out_dir: str | os.PathLike, *, latency_runs: int = 0,
                num_threads: int | None = None, log=None) -> list[ArtifactResult]:
    results = []
    for comp in components:
        r = export_component(comp, out_dir, latency_runs=latency_runs, num_threads=num_threads)
        if log:
            err = r.max_relative_error
            log(f"onnx   {r.component:<24} {r.precision:<7} {r.status:<13} "
                f"{'' if err is None else f'rel err {err:.2e}'} {r.message[:160]}")
        results.append(r)
    return results


__all__ = ["OPSET", "ORTRunner", "export_component", "export_onnx", "export_onnx_file"]
