"""TFLite / LiteRT export of the static components, checked in the LiteRT interpreter at every precision.

Per component (:mod:`export.components`):

1. ``litert_torch.convert(module, sample_args)`` (litert-torch's default converter; ``use_v2`` needs
   tf-nightly and its output did not run here) -> ``<name>.fp32.tflite``;
2. post-training weight quantisation of that float model with ai-edge-quantizer: ``fp16`` (weights cast to
   float16, ``FLOAT_CASTING``; it covers FULLY_CONNECTED / CONV_2D / DEPTHWISE / TRANSPOSE_CONV /
   EMBEDDING_LOOKUP, so CONV_3D weights stay float32), ``int8`` (weight-only, channel-wise, dequantised to
   float32 compute) and ``int8dyn`` (dynamic range: int8 weights, activations quantised on the fly);
3. every artifact runs in ``ai_edge_litert.interpreter`` on the component's example inputs and is compared
   with the PyTorch mirror (:func:`export.report.compare`); out of tolerance -> status ``failed`` and the file
   is moved to ``failed/`` (never left beside the good artifacts). A conversion error -> ``not_converted``
   with the op names the error mentions.

Files: ``<out>/<name>.<precision>.tflite`` and ``<out>/<name>.io.json`` (signature order, names, shapes and
dtypes of inputs and outputs: LiteRT names them ``args_i`` / ``output_i``). int64 inputs do not exist (ids
are int32) because litert-torch narrows 64-bit I/O to 32 bits.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from export.components import Component
from export.report import TOLERANCES, ArtifactResult, compare, extract_op_names, judge, measure_latency, write_json

PRECISIONS = ("fp32", "fp16", "int8", "int8dyn")

os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")


def check_precisions(precisions: Iterable[str]) -> list[str]:
    out = list(dict.fromkeys(precisions))
    bad = [p for p in out if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown TFLite precision(s) {bad}: choose from {', '.join(PRECISIONS)}")
    return out


@contextlib.contextmanager
def jax_x64_scope():
    """Run litert-torch with JAX's 64-bit mode on, as it expects, and give the caller's setting back after.

    litert-torch's JAX bridge sets ``jax_enable_x64=True`` process-wide when it is imported. Left on, every
    later JAX computation in the process (an export run converts JAX weights and compares JAX outputs; a test
    session runs everything) silently switches its default dtypes to float64 and draws different random
    numbers.
    """
    import jax

    before = bool(jax.config.jax_enable_x64)
    try:
        jax.config.update("jax_enable_x64", True)
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def convert_float(component: Component) -> bytes:
    """The float32 ``.tflite`` flatbuffer of ``component`` (raises what litert-torch raises)."""
    with jax_x64_scope():
        import litert_torch

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation, raised while exporting
            model = litert_torch.convert(component.module.eval(), component.torch_inputs())
    return bytes(model.model_content())


def quantize(float_model: bytes, precision: str) -> bytes:
    """``float_model`` with its weights quantised to ``precision`` (``fp16`` / ``int8`` / ``int8dyn``)."""
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    qt = quantizer.Quantizer(bytearray(float_model))
    if precision == "fp16":
        qt.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                  algorithm_key=AlgorithmName.FLOAT_CASTING)
    elif precision == "int8":
        qt.load_quantization_recipe(recipe.weight_only_wi8_afp32())
    elif precision == "int8dyn":
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        raise ValueError(f"quantize: unknown precision {precision!r}")
    with contextlib.redirect_stderr(io.StringIO()):
        result = qt.quantize(enable_progress_bar=False, enable_progress_report=False)
    return bytes(result.quantized_model)


class LiteRTRunner:
    """A ``.tflite`` file in the LiteRT interpreter, fed by input name (signature order = component order)."""

    def __init__(self, path: str | os.PathLike | None = None, *, content: bytes | None = None,
                 num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=None if path is None else str(path), model_content=content,
                                       num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner()

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = self.runner(**{f"args_{i}": np.ascontiguousarray(a) for i, a in enumerate(inputs)})
        return [out[f"output_{i}"] for i in range(len(out))]


def io_spec(component: Component) -> dict:
    expected = component.expected()
    return {
        "component": component.name,
        "description": component.description,
        "inputs": [{"name": k, "tflite_name": f"args_{i}", "shape": list(v.shape), "dtype": str(v.dtype)}
                   for i, (k, v) in enumerate(component.inputs.items())],
        "outputs": [{"name": k, "tflite_name": f"output_{i}", "shape": list(v.shape), "dtype": str(v.dtype)}
                    for i, (k, v) in enumerate(expected.items())],
    }


def _fail_path(path: Path) -> Path:
    dest = path.parent / "failed" / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), dest)
    return dest


def export_component(component: Component, out_dir: str | os.PathLike, precisions: Iterable[str] = ("fp32",), *,
                     latency_runs: int = 0, num_threads: int | None = None,
                     tolerances: dict[str, float] | None = None) -> list[ArtifactResult]:
    """Convert, quantise, run and check one component; one :class:`ArtifactResult` per precision."""
    precisions = check_precisions(precisions)
    tolerances = {**TOLERANCES, **(tolerances or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = dict(component=component.name, group=component.group, backend="tflite", params=component.params)
    try:
        float_model = convert_float(component)
    except Exception as err:  # noqa: BLE001 - every converter failure is reported, by op name where possible
        msg = f"{type(err).__name__}: {err}"
        return [ArtifactResult(**base, precision=p, status="not_converted", failed_ops=extract_op_names(msg),
                               message=_short(msg)) for p in precisions]
    write_json(out_dir / f"{component.name}.io.json", io_spec(component))
    expected = component.expected()
    inputs = list(component.inputs.values())
    results = []
    for prec in precisions:
        res = ArtifactResult(**base, precision=prec, status="failed")
        path = out_dir / f"{component.name}.{prec}.tflite"
        try:
            content = float_model if prec == "fp32" else quantize(float_model, prec)
        except Exception as err:  # noqa: BLE001
            msg = f"quantisation failed: {type(err).__name__}: {err}"
            res.status, res.message, res.failed_ops = "not_converted", _short(msg), extract_op_names(msg)
            results.append(res)
            continue
        path.write_bytes(content)
        res.path, res.size_bytes = str(path), len(content)
        try:
            runner = LiteRTRunner(path, num_threads=num_threads)
            got = dict(zip(component.output_names, runner(inputs)))
            judge(res, compare(got, expected, component.image_outputs), tolerances[prec])
            if latency_runs:
                res.latency_ms = measure_latency(lambda: runner(inputs), latency_runs)
        except Exception as err:  # noqa: BLE001 - e.g. an op the interpreter cannot prepare
            msg = f"LiteRT interpreter failed: {type(err).__name__}: {err}"
            res.status, res.message, res.failed_ops = "failed", _short(msg), extract_op_names(msg)
        if not res.ok:
            res.path = str(_fail_path(path))
        results.append(res)
    return results


def export_tflite(components: Iterable[Component], out_dir: str | os.PathLike, precisions: Iterable[str] = ("fp32",),
                  *, latency_runs: int = 0, num_threads: int | None = None, log=None) -> list[ArtifactResult]:
    """:func:`export_component` for every component into ``out_dir``."""
    results = []
    for comp in components:
        rs = export_component(comp, out_dir, precisions, latency_runs=latency_runs, num_threads=num_threads)
        if log:
            for r in rs:
                err = r.max_relative_error
                log(f"tflite {r.component:<24} {r.precision:<7} {r.status:<13} "
                    f"{'' if err is None else f'rel err {err:.2e}'} {r.message[:160]}")
        results.extend(rs)
    return results


def _short(msg: str, limit: int = 2000) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


__all__ = ["LiteRTRunner", "PRECISIONS", "check_precisions", "convert_float", "export_component", "export_tflite",
           "io_spec", "quantize"]
