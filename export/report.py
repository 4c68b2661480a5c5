"""What every exporter records per artifact, the numerical checks, and the ``neodragon export`` Markdown report.

An :class:`ArtifactResult` is one (component, backend, precision): its file, size, per-output errors against
the PyTorch mirror (max abs, mean abs, PSNR for decoded frames), the tolerance it was held to, its status
(``ok`` / ``failed`` = converted but out of tolerance or not runnable / ``not_converted`` = the converter
refused it, with the op names it named) and CPU latency. :func:`markdown_report` turns a run into one table.

Tolerances (:data:`TOLERANCES`) are on the max abs error relative to the output's scale,
``max_abs <= tol * max(1, max |reference|)``; they were set from measurements on the tiny preset with
random weights (see README "Export"): float32 artifacts agree to ~1e-6 relative, fp16 weights to ~1e-3,
int8 weight-only to ~1e-2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# max abs error / max(1, max |reference|), per precision of the artifact's weights
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1, "int8dyn": 2e-1}
PSNR_PEAK = 2.0  # decoded frames live in [-1, 1]
# A quantised file larger than this fraction of its fp32 file is marked (its weights mostly stayed float32).
NOT_SMALLER = 0.8


@dataclasses.dataclass
class OutputError:
    max_abs: float
    mean_abs: float
    scale: float  # max(1, max |reference|)
    psnr_db: float | None = None  # decoded frames only

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale


@dataclasses.dataclass
class ArtifactResult:
    component: str
    group: str
    backend: str  # "tflite" | "onnx" | "qnn"
    precision: str  # "fp32" | "fp16" | "int8" | "int8dyn"
    status: str  # "ok" | "failed" | "not_converted" | "prepared" (qnn dry run)
    path: str | None = None
    size_bytes: int | None = None
    params: int | None = None
    errors: dict[str, OutputError] = dataclasses.field(default_factory=dict)
    tolerance: float | None = None
    failed_ops: list[str] = dataclasses.field(default_factory=list)
    message: str = ""
    latency_ms: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def max_relative_error(self) -> float | None:
        return max((e.relative for e in self.errors.values()), default=None)

    @property
    def max_abs_error(self) -> float | None:
        return max((e.max_abs for e in self.errors.values()), default=None)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["errors"] = {k: dataclasses.asdict(v) | {"relative": v.relative} for k, v in self.errors.items()}
        return d


def compare(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
            image_outputs: Iterable[str] = ()) -> dict[str, OutputError]:
    """Per-output errors of ``got`` against ``want`` (same names and shapes required)."""
    images = set(image_outputs)
    out = {}
    for name, ref in want.items():
        if name not in got:
            raise KeyError(f"artifact output {name!r} missing (has {sorted(got)})")
        val = np.asarray(got[name], np.float64)
        ref64 = np.asarray(ref, np.float64)
        if val.shape != ref64.shape:
            raise ValueError(f"output {name!r} has shape {val.shape}, the mirror's is {ref64.shape}")
        diff = np.abs(val - ref64)
        if not np.all(np.isfinite(val)):
            max_abs = mean_abs = math.inf
        else:
            max_abs, mean_abs = float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0
        psnr = None
        if name in images:
            mse = float(np.mean(diff**2)) if math.isfinite(max_abs) else math.inf
            psnr = math.inf if mse == 0 else (0.0 if not math.isfinite(mse) else 10 * math.log10(PSNR_PEAK**2 / mse))
        scale = max(1.0, float(np.abs(ref64).max(initial=0.0)))
        out[name] = OutputError(max_abs, mean_abs, scale, psnr)
    return out


def judge(result: ArtifactResult, errors: dict[str, OutputError], tolerance: float) -> ArtifactResult:
    """Fill errors / tolerance / status: ``failed`` if any output exceeds ``tolerance`` (relative)."""
    result.errors, result.tolerance = errors, tolerance
    bad = [f"{k} {e.relative:.3g}" for k, e in errors.items() if not e.relative <= tolerance]
    if bad:
        result.status = "failed"
        result.message = f"out of tolerance {tolerance:g} (max abs / scale): " + ", ".join(bad)
    else:
        result.status = "ok"
    return result


_OP_PATTERNS = (
    re.compile(r"\b(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)"),
    re.compile(r"\b((?:stablehlo|mhlo|tfl|tf|chlo|func|onnx)\.[A-Za-z0-9_]+)"),
    re.compile(r"\(([A-Z][A-Z0-9_]{2,})\)"),  # LiteRT interpreter: "Node number 3 (CONV_3D_TRANSPOSE) failed"
    re.compile(r"opcode '([A-Z][A-Z0-9_]+)'"),  # "Didn't find op for builtin opcode 'STABLEHLO_CONVOLUTION'"
    re.compile(r"op_type=([A-Za-z0-9_]+)"),
    re.compile(r"[Nn]ode \(?([A-Za-z0-9_]+)\)? .*(?:not supported|NOT_IMPLEMENTED)"),
    re.compile(r"[Uu]nsupported (?:operator|op(?:eration)?)[:\s]+'?([A-Za-z0-9_.:]+)"),
)
_NOT_OPS = {"TFLITE", "LITERT", "ERROR", "INFO", "WARNING", "NOTE", "FAILED", "OK", "CPU", "XNNPACK"}


def extract_op_names(message: str) -> list[str]:
    """Operator names a converter / runtime error message mentions (aten.*, stablehlo.*, tfl.*, LiteRT
    builtin codes, ONNX op types), in order of first appearance."""
    found: list[str] = []
    for pat in _OP_PATTERNS:
        for m in pat.finditer(message):
            name = m.group(1).rstrip(".:")
            if name.upper() in _NOT_OPS or name in found:
                continue
            found.append(name)
    return found


def measure_latency(fn: Callable[[], Any], runs: int, warmup: int = 1) -> float | None:
    """Best (minimum) wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup``; None if
    runs < 1. The minimum, not the median: on a shared CPU the other processes only ever add time."""
    if runs < 1:
        return None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


# ---- the report --------------------------------------------------------------------------------------------------


def _kb(n: int | None) -> str:
    return "—" if n is None else (f"{n / 1024:.0f} KB" if n < 10 * 2**20 else f"{n / 2**20:.1f} MB")


def _err(r: ArtifactResult | None) -> str:
    """The artifact's error as its tolerance is defined: max abs error / max(1, max |mirror output|)."""
    if r is None:
        return "—"
    if r.status == "not_converted":
        return "not converted"
    e = r.max_relative_error
    text = "—" if e is None else f"{e:.1e}"
    psnr = [v.psnr_db for v in r.errors.values() if v.psnr_db is not None]
    if psnr:
        text += f" ({min(psnr):.0f} dB)" if math.isfinite(min(psnr)) else " (∞ dB)"
    return text + ("" if r.ok else " **FAILED**")


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown_report(results: list[ArtifactResult], components: list[dict], *, title: str = "Export report",
                    precisions: Iterable[str] = ("fp32", "fp16", "int8"), notes: Iterable[str] = ()) -> str:
    """One table for the whole model, then the per-stage MMDiT graph sizes and every failure.

    ``components``: one dict per component with ``name``, ``group``, ``params``, ``torch_ms``, ``jax_ms``.
    """
    precisions = list(precisions)
    by = {(r.component, r.backend, r.precision): r for r in results}
    not_smaller: list[str] = []

    def size(name: str, p: str) -> str:
        """File size; marked when a quantised file is not clearly smaller than the fp32 one."""
        r, f32 = by.get((name, "tflite", p)), by.get((name, "tflite", "fp32"))
        n = getattr(r, "size_bytes", None)
        text = _kb(n)
        ref = getattr(f32, "size_bytes", None)
        if p != "fp32" and n and ref and n > NOT_SMALLER * ref:
            not_smaller.append(f"`{name}` {p}")
            text += " †"
        return text
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    head = ["component", "params"]
    head += [f"TFLite {p} size" for p in precisions]
    head += [f"TFLite {p} rel err" for p in precisions]
    head += ["ONNX rel err", "LiteRT fp32 ms", "ORT ms", "PyTorch ms", "JAX ms"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for c in components:
        name = c["name"]
        row = [f"`{name}`", f"{c['params']:,}"]
        row += [size(name, p) for p in precisions]
        row += [_err(by.get((name, "tflite", p))) for p in precisions]
        onnx = by.get((name, "onnx", "fp32"))
        lite = by.get((name, "tflite", "fp32"))
        row += [_err(onnx), _ms(getattr(lite, "latency_ms", None)), _ms(getattr(onnx, "latency_ms", None)),
                _ms(c.get("torch_ms")), _ms(c.get("jax_ms"))]
        lines.append("| " + " | ".join(row) + " |")

    groups: dict[str, list[dict]] = {}
    for c in components:
        if c["group"].startswith("mmdit_stage"):
            groups.setdefault(c["group"], []).append(c)
    if groups:
        lines += ["", "## MMDiT graphs per pyramid stage", "",
                  "| stage graph | parts | params | " + " | ".join(f"TFLite {p}" for p in precisions) + " | ONNX |",
                  "|---|---|---|" + "---|" * (len(precisions) + 1)]
        for g, parts in groups.items():
            sizes = []
            for p in precisions + ["onnx"]:
                backend, prec = ("onnx", "fp32") if p == "onnx" else ("tflite", p)
                vals = [getattr(by.get((c["name"], backend, prec)), "size_bytes", None) for c in parts]
                sizes.append("—" if any(v is None for v in vals) else _kb(sum(vals)))
            lines.append(f"| `{g}` | {len(parts)} | {sum(c['params'] for c in parts):,} | " + " | ".join(sizes) + " |")

    bad = [r for r in results if r.status in ("failed", "not_converted")]
    lines += ["", "## Failures", ""]
    if not bad:
        lines.append("None: every artifact converted, ran and met its tolerance.")
    for r in bad:
        ops = f" ops: {', '.join(r.failed_ops)}." if r.failed_ops else ""
        lines.append(f"- `{r.component}` {r.backend} {r.precision}: {r.status}.{ops} {r.message}".rstrip())
    tol = ", ".join(f"{p} {t:g}" for p, t in TOLERANCES.items())
    lines += ["", f"Errors are relative, as the tolerances: max abs error / max(1, max |mirror output|) over the "
              f"component's outputs (report.json has the absolute ones). Tolerances: {tol}; ONNX uses fp32's. "
              f"PSNR (decoded frames, peak-to-peak 2) in parentheses. Latencies: CPU, best of N runs (ms)."]
    if not_smaller:
        lines += ["", f"† Not smaller than the fp32 file ({', '.join(not_smaller)}): ai-edge-quantizer quantises "
                      f"FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV and EMBEDDING_LOOKUP weights "
                      f"only, so CONV_3D weights (the VAE encoder's causal 3-D convolutions) stay float32."]
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


__all__ = [
    "ArtifactResult", "OutputError", "PSNR_PEAK", "TOLERANCES", "compare", "extract_op_names", "judge",
    "markdown_report", "measure_latency", "write_json",
]
