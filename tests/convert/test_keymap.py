"""The generic key-map machinery: layouts, strictness, aliases, derived buffers, round trip."""

import numpy as np
import pytest
from flax import nnx

from neodragon_jax.convert import CheckpointMismatchError, Entry, KeyMap, load_state_dict, read_safetensors, write_safetensors
from neodragon_jax.convert.io import CheckpointNotFoundError, export_state_dict, param_arrays
from neodragon_jax.convert.keymap import to_jax_layout, to_torch_layout
from neodragon_jax.layers.core import conv, dense


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.proj = dense(3, 5, axes=("embed", "mlp"), rngs=rngs)
        self.patch = conv(2, 4, (2, 2), rngs=rngs)


def tiny_map():
    return KeyMap(
        "tiny",
        (
            Entry("proj.weight", "proj.kernel", "linear"),
            Entry("proj.bias", "proj.bias"),
            Entry("patch.weight", "patch.kernel", "conv2d", aliases=("patch_tied.weight",)),
            Entry("patch.bias", "patch.bias"),
            Entry("table", None, derive=lambda: np.arange(6, dtype=np.float32).reshape(2, 3)),
        ),
    )


def torch_like_state(rng):
    w = rng.normal(size=(4, 2, 2, 2)).astype(np.float32)
    return {
        "proj.weight": rng.normal(size=(5, 3)).astype(np.float32),
        "proj.bias": rng.normal(size=(5,)).astype(np.float32),
        "patch.weight": w,
        "patch_tied.weight": w.copy(),
        "patch.bias": rng.normal(size=(4,)).astype(np.float32),
        "table": np.arange(6, dtype=np.float32).reshape(2, 3),
    }


@pytest.mark.parametrize("shape,layout", [((5, 3), "linear"), ((4, 2, 3, 3), "conv2d"), ((4, 2, 3, 3, 3), "conv3d")])
def test_layouts_invert(shape, layout):
    x = np.random.default_rng(0).normal(size=shape)
    assert np.array_equal(to_torch_layout(to_jax_layout(x, layout), layout), x)


def test_import_then_export_is_bit_identical():
    rng = np.random.default_rng(0)
    sd = torch_like_state(rng)
    model = Tiny(nnx.Rngs(0))
    load_state_dict(model, sd, tiny_map())
    assert np.array_equal(param_arrays(model)["proj.kernel"], sd["proj.weight"].T)
    back = export_state_dict(model, tiny_map())
    assert set(back) == set(sd)
    for k in sd:
        assert np.array_equal(back[k], sd[k]), k


def test_strict_errors_name_every_problem():
    rng = np.random.default_rng(0)
    sd = torch_like_state(rng)
    del sd["proj.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["patch.bias"] = np.zeros(7, np.float32)
    sd["table"] = sd["table"] + 1.0
    with pytest.raises(CheckpointMismatchError) as e:
        load_state_dict(Tiny(nnx.Rngs(0)), sd, tiny_map())
    msg = str(e.value)
    assert "proj.bias" in msg and "extra.weight" in msg and "patch.bias" in msg and "table" in msg
    assert "(7,)" in msg and "(4,)" in msg


def test_tied_tensors_must_agree():
    sd = torch_like_state(np.random.default_rng(0))
    sd["patch_tied.weight"] = sd["patch_tied.weight"] + 1
    with pytest.raises(CheckpointMismatchError, match="patch_tied.weight differs"):
        load_state_dict(Tiny(nnx.Rngs(0)), sd, tiny_map())


def test_incomplete_map_reports_unfilled_parameters():
    partial = KeyMap("tiny", tiny_map().entries[:2])
    sd = {k: v for k, v in torch_like_state(np.random.default_rng(0)).items() if k.startswith("proj")}
    with pytest.raises(CheckpointMismatchError, match="patch.kernel"):
        load_state_dict(Tiny(nnx.Rngs(0)), sd, partial)


def test_half_precision_storage_converts_to_param_dtype(tmp_path):
    import ml_dtypes

    sd = torch_like_state(np.random.default_rng(0))
    sd16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    write_safetensors(sd16, tmp_path / "model.safetensors")
    loaded = read_safetensors(tmp_path)
    assert loaded["proj.weight"].dtype == ml_dtypes.bfloat16
    model = Tiny(nnx.Rngs(0))
    load_state_dict(model, loaded, tiny_map())
    assert model.proj.kernel[...].dtype == np.float32


def test_missing_checkpoint_names_path_and_layout(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        read_safetensors(tmp_path / "nowhere")
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        read_safetensors(tmp_path)
