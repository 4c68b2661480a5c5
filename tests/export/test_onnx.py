"""ONNX export (``torch.onnx.export``, dynamo, weights inline) + ONNX Runtime parity with the PyTorch mirror.

Tolerance: max abs error / max(1, max |mirror output|) <= 1e-4 (``TOLERANCES["fp32"]``; measured <= 1.6e-6).
Components: one of every kind of the tiny Neodragon stack (2-block MMDiT, see test_tflite.py); ``clip_g`` and
the stage-0 / stage-1 MMDiT graphs are the same code as ``clip_l`` / stage 2 at other shapes (their TFLite
artifacts are checked in test_tflite.py, and ``neodragon export onnx`` checks them all) and are left out to
keep this file fast.
"""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from export.components import ExportOptions, build_components, load_jax_models, neodragon_variant  # noqa: E402
from export.onnx import ORTRunner, export_component  # noqa: E402
from export.report import TOLERANCES  # noqa: E402
from neodragon_jax.config import load_config  # noqa: E402

pytestmark = [pytest.mark.export, pytest.mark.needs_torch]

CFG = neodragon_variant(load_config("tiny", ["model.mmdit.num_layers=2"]))
NAMES = ("clip_l", "distil_t5", "context_adapter", "mmdit_stage2", "vae_encoder", "light_decoder",
         "light_decoder_step")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    cfg, models = load_jax_models(CFG, seed=0)
    comps = {c.name: c for c in build_components(cfg, models, ExportOptions(components=NAMES))}
    return out, comps, {name: export_component(c, out) for name, c in comps.items()}


@pytest.mark.parametrize("name", NAMES)
def test_onnx_runtime_matches_mirror(exported, name):
    out, comps, results = exported
    r, comp = results[name], comps[name]
    assert r.status == "ok", r.message
    assert r.backend == "onnx" and r.tolerance == TOLERANCES["fp32"]
    assert r.max_relative_error <= TOLERANCES["fp32"]
    path = Path(r.path)
    assert path == out / f"{name}.onnx" and r.size_bytes == path.stat().st_size
    assert not path.with_suffix(".onnx.data").exists()  # weights inline
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == list(comp.inputs)
    assert [o.name for o in model.graph.output] == list(comp.output_names)
    # static shapes, no 64-bit / bool graph inputs (QNN-friendly)
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        assert dims == list(comp.inputs[i.name].shape)
        assert i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32)


def test_mmdit_graph_has_no_float64(exported):
    """The MMDiT stage graph's masking and RoPE are float32 arithmetic: no float64 tensor anywhere (HTP has
    none; the mirror's own RoPE runs in float64)."""
    _, _, results = exported
    model = onnx.load(results["mmdit_stage2"].path)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types |= {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.DOUBLE not in types


def test_rerun_from_disk_with_other_inputs(exported):
    """The file is a real graph, not a constant: other inputs give the mirror's other outputs."""
    _, comps, results = exported
    comp = comps["light_decoder_step"]
    rng = np.random.default_rng(5)
    other = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in comp.inputs.items()}
    got = ORTRunner(results["light_decoder_step"].path)(other)
    with torch.no_grad():
        want = comp.module(*(torch.from_numpy(v) for v in other.values()))
    for name, w in zip(comp.output_names, want):
        assert np.abs(got[name] - w.numpy()).max() <= 1e-4
    assert np.abs(got["frames"] - comp.expected()["frames"]).max() > 1e-2
