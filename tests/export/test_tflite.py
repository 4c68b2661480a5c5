"""TFLite / LiteRT export of every static component of the tiny Neodragon stack, checked in the interpreter.

Each component is converted once (module fixture) at fp32 and quantised to fp16 weights; every artifact runs
in ``ai_edge_litert`` on the component's example inputs and is compared with the PyTorch mirror.

Tolerances (max abs error / max(1, max |mirror output|), ``export.report.TOLERANCES``): fp32 <= 1e-4
(measured <= 2.2e-6), fp16 weights <= 2e-2 (measured <= 3.5e-3, DistilT5), int8 weight-only <= 1e-1
(measured <= 5e-2). Also here, in PyTorch (no conversion): the static graphs equal the mirror they wrap
(padded MMDiT history, streaming light decoder), and failures are reported, never kept as good artifacts.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# Not importorskip: importing litert_torch turns on jax_enable_x64 process-wide (export/tflite.py scopes it).
if importlib.util.find_spec("litert_torch") is None:
    pytest.skip("litert_torch not installed", allow_module_level=True)
pytest.importorskip("ai_edge_litert")

from export.components import (  # noqa: E402
    Component, ExportOptions, LightDecoderStepGraph, MMDiTGraph, block_ranges, build_components, component_names,
    load_jax_models, neodragon_variant, stage_grids,
)
from export.convert import to_mirror  # noqa: E402
from export.report import TOLERANCES, markdown_report  # noqa: E402
from export.tflite import LiteRTRunner, export_component  # noqa: E402
from neodragon_jax.config import load_config  # noqa: E402

pytestmark = [pytest.mark.export, pytest.mark.needs_torch]

# The tiny preset's Neodragon stack with a 2-block MMDiT (a regular block + the context_pre_only last block):
# conversion time grows with the block count and the three stage graphs dominate this file's run time.
CFG = neodragon_variant(load_config("tiny", ["model.mmdit.num_layers=2"]))
NAMES = component_names(CFG)


@pytest.fixture(scope="module")
def built():
    cfg, models = load_jax_models(CFG, seed=0)
    return cfg, models, {c.name: c for c in build_components(cfg, models)}


@pytest.fixture(scope="module")
def converted(built, tmp_path_factory):
    """Every component at fp32 and fp16, converted once."""
    out = tmp_path_factory.mktemp("tflite")
    comps = built[2]
    return out, {name: {r.precision: r for r in export_component(c, out, ("fp32", "fp16"))}
                 for name, c in comps.items()}


def test_component_set():
    assert NAMES == ["clip_l", "clip_g", "distil_t5", "context_adapter", "mmdit_stage0", "mmdit_stage1",
                     "mmdit_stage2", "vae_encoder", "light_decoder", "light_decoder_step"]


@pytest.mark.parametrize("name", NAMES)
def test_every_component_converts_and_meets_tolerance(converted, built, name):
    out, results = converted
    comp = built[2][name]
    fp32, fp16 = results[name]["fp32"], results[name]["fp16"]
    for r in (fp32, fp16):
        assert r.status == "ok", r.message
        assert r.tolerance == TOLERANCES[r.precision]
        assert Path(r.path).is_file() and Path(r.path).parent == out
        assert set(r.errors) == set(comp.output_names)
    assert fp32.max_relative_error <= TOLERANCES["fp32"]
    assert fp16.max_relative_error <= TOLERANCES["fp16"]
    # fp16 weights really are float16: a visible but small error, and a smaller file (CONV_3D weights, the
    # whole VAE encoder, are not covered by ai-edge-quantizer's float casting).
    assert fp16.max_abs_error > fp32.max_abs_error
    if name != "vae_encoder":
        assert fp16.size_bytes < 0.8 * fp32.size_bytes
    spec = json.loads((out / f"{name}.io.json").read_text())
    assert [i["name"] for i in spec["inputs"]] == list(comp.inputs)
    assert [o["name"] for o in spec["outputs"]] == list(comp.output_names)


def test_decoded_frames_psnr(converted):
    _, results = converted
    for name in ("light_decoder", "light_decoder_step"):
        key = "video" if name == "light_decoder" else "frames"
        assert results[name]["fp32"].errors[key].psnr_db > 100.0
        assert results[name]["fp16"].errors[key].psnr_db > 50.0


def test_artifact_reruns_from_disk(converted, built):
    """The written file alone (fresh interpreter) reproduces the mirror (MMDiT stage 2, padded history)."""
    _, results = converted
    comp = built[2]["mmdit_stage2"]
    got = LiteRTRunner(results["mmdit_stage2"]["fp32"].path)(list(comp.inputs.values()))[0]
    assert np.abs(got - comp.expected()["velocity"]).max() <= 1e-4


def test_report_table(converted, built):
    _, results = converted
    rows = [{"name": c.name, "group": c.group, "params": c.params} for c in built[2].values()]
    text = markdown_report([r for rs in results.values() for r in rs.values()], rows, precisions=("fp32", "fp16"))
    assert "| `mmdit_stage2` |" in text and "MMDiT graphs per pyramid stage" in text
    assert "None: every artifact converted" in text


# ---- the static graphs are the mirror (PyTorch only) -----------------------------------------------------------


def test_padded_mmdit_graph_equals_unpadded_mirror(built):
    """An earlier unit in the last-unit graph (oldest slot padded + masked) == the mirror on its real clips."""
    cfg, models, comps = built
    comp = comps["mmdit_stage2"]
    ins = {k: torch.from_numpy(v) for k, v in comp.inputs.items()}
    assert comp.inputs["history_valid"].tolist() == [[0.0, 1.0]] and not comp.inputs["clip_0"].any()
    mirror = to_mirror(models["mmdit"])
    with torch.no_grad():
        want = mirror([ins["clip_1"], ins["current"]], ins["text_tokens"], ins["text_mask"] > 0.5, ins["pooled"],
                      ins["timestep"])
        padded_mirror = mirror([ins["clip_0"], ins["clip_1"], ins["current"]], ins["text_tokens"],
                               ins["text_mask"] > 0.5, ins["pooled"], ins["timestep"],
                               history_valid=ins["history_valid"] > 0.5)
        # garbage in the padded slot changes nothing
        other = dict(ins, clip_0=torch.randn_like(ins["clip_0"]) * 5)
        garbage = comp.module(*other.values())
    got = comp.expected()["velocity"]
    assert np.abs(got - want.numpy()).max() <= 1e-5
    assert np.abs(got - padded_mirror.numpy()).max() <= 1e-5
    assert np.abs(garbage.numpy() - got).max() <= 1e-5
    assert stage_grids(cfg, 2) == [(2, 2), (4, 4), (4, 4)]  # frame 0 at stage 1, frame 1 at stage 2, current


def test_mmdit_split_graphs_chain_to_the_whole(built):
    cfg, models, _ = built
    mirror = to_mirror(models["mmdit"])
    grids = stage_grids(cfg, 1)
    whole = MMDiTGraph(mirror, grids, 0, 2)
    parts = [MMDiTGraph(mirror, grids, a, b) for a, b in block_ranges(2, 2)]
    comps = build_components(cfg, models, ExportOptions(mmdit_split=2, components=("mmdit_stage1",)))
    assert [c.name for c in comps] == ["mmdit_stage1_part1of2", "mmdit_stage1_part2of2"]
    assert block_ranges(2, 2) == [(0, 1), (1, 2)]
    assert sum(c.params for c in comps) == whole_params(mirror)
    first = comps[0]
    args = first.torch_inputs()
    with torch.no_grad():
        x, c, temb = parts[0](*args)
        n = len(grids)
        hv, mask = args[n], args[n + 2]
        got = parts[1](x, c, temb, mask, hv)
        want = whole(*args)
    assert torch.equal(got, want)
    assert np.allclose(comps[1].inputs["x"], x.numpy())


def whole_params(mirror) -> int:
    return sum(p.numel() for p in mirror.parameters())


def test_streaming_decoder_equals_whole_clip(built):
    """TAEHV streaming with carried MemBlock memories == the parallel whole-clip decode (drop 2^k - 1 frames)."""
    _, _, comps = built
    clip, step = comps["light_decoder"], comps["light_decoder_step"]
    z = torch.from_numpy(clip.inputs["latents"])
    assert isinstance(step.module, LightDecoderStepGraph)
    mems = [torch.zeros(s) for s in step.module.memory_shapes(1, z.shape[3], z.shape[4])]
    frames = []
    with torch.no_grad():
        for t in range(z.shape[2]):
            out = step.module(z[:, :, t : t + 1], *mems)
            frames.append(out[0])
            mems = list(out[1:])
    video = torch.cat(frames, 2)[:, :, 7:]
    want = clip.expected()["video"]
    assert video.shape == want.shape == (1, 3, 17, 64, 64)
    assert np.abs(video.numpy() - want).max() <= 1e-5
    # the step component's example = the last latent frame with the real carried memories
    assert np.abs(step.expected()["frames"] - torch.cat(frames, 2)[:, :, -8:].numpy()).max() <= 1e-5


# ---- failures are reported, not kept ------------------------------------------------------------------------------


def _tiny_component(module, shape, name="bad"):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return Component(name, name, module.eval(), {"x": x}, ("y",))


def test_interpreter_failure_is_reported_by_op_and_moved(tmp_path):
    # ConvTranspose3d converts but the interpreter has no kernel for it (DEPENDENCIES.md)
    comp = _tiny_component(torch.nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 4, 4), "convt3d")
    (r,) = export_component(comp, tmp_path, ["fp32"])
    assert r.status == "failed" and r.failed_ops == ["STABLEHLO_CONVOLUTION"]
    assert Path(r.path).parent == tmp_path / "failed" and not (tmp_path / "convt3d.fp32.tflite").exists()


def test_conversion_failure_names_the_op(tmp_path):
    class SVD(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]

    results = export_component(_tiny_component(SVD(), (3, 3), "svd"), tmp_path, ["fp32", "fp16"])
    assert [r.status for r in results] == ["not_converted"] * 2
    assert results[0].failed_ops == ["aten._linalg_svd.default"]
    assert not list(tmp_path.glob("*.tflite"))


def test_out_of_tolerance_artifact_is_failed(built, tmp_path):
    comp = built[2]["context_adapter"]
    fp32, fp16 = export_component(comp, tmp_path, ["fp32", "fp16"], tolerances={"fp16": 1e-7})
    assert fp32.ok and fp16.status == "failed" and "out of tolerance" in fp16.message
    assert (tmp_path / "context_adapter.fp32.tflite").is_file()
    assert not (tmp_path / "context_adapter.fp16.tflite").exists()
    assert (tmp_path / "failed" / "context_adapter.fp16.tflite").is_file()
    text = markdown_report([fp32, fp16], [{"name": comp.name, "group": comp.group, "params": comp.params}],
                           precisions=("fp32", "fp16"))
    assert "**FAILED**" in text and "`context_adapter` tflite fp16: failed" in text
