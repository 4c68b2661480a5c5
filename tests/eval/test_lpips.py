"""LPIPS from user-supplied weights: the converter on a small random VGG16-layout network written as a
torchvision-style ``.pth`` (plus LPIPS linear heads), against a PyTorch reference of the LPIPS computation;
refused inputs; the distance's basic properties."""

import numpy as np
import pytest
from flax import nnx

from neodragon_jax.eval.lpips import LPIPS, SCALE, SHIFT, VGG16_BLOCKS, lpips_widths
from train.weights import assign, load_weights

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.needs_torch

WIDTHS = (4, 6, 8, 8, 8)  # a small VGG16: the real layout (13 convs, 4 pools) at tiny widths


def _torch_vgg(seed=0):
    """A torchvision-layout ``features`` Sequential (conv, ReLU, ..., max pools) and its state dict."""
    g = torch.Generator().manual_seed(seed)
    layers, cin, sd = [], 3, {}
    idx = 0
    for b, (block, width) in enumerate(zip(VGG16_BLOCKS, WIDTHS)):
        if b:
            layers.append(torch.nn.MaxPool2d(2, 2))
            idx += 1
        for conv_idx in block:
            assert conv_idx == idx
            conv = torch.nn.Conv2d(cin, width, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (9 * cin)) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            layers += [conv, torch.nn.ReLU()]
            sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"] = conv.weight.detach(), conv.bias.detach()
            idx += 2
            cin = width
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # ignored, as in a real torchvision checkpoint
    return torch.nn.Sequential(*layers), sd


def _torch_lpips(features, lins, x, y):
    """The LPIPS package's forward (scaling layer, taps after relu1_2..relu5_3, unit-normalise, lin, mean)."""
    shift = torch.tensor(SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(SCALE).view(1, 3, 1, 1)
    taps = (3, 8, 15, 22, 29)

    def feats(v):
        out, h = [], (v - shift) / scale
        for i, layer in enumerate(features):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (torch.sqrt(torch.sum(a * a, 1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b * b, 1, keepdim=True)) + 1e-10)
        d = (a - b) ** 2
        total = total + torch.nn.functional.conv2d(d, lins[k].view(1, -1, 1, 1)).mean((2, 3))[:, 0]
    return total


def test_converter_on_a_small_random_vgg_matches_the_torch_reference(tmp_path):
    from neodragon_jax.convert.lpips import LPIPSConvertError, convert_lpips

    features, sd = _torch_vgg()
    torch.save(sd, tmp_path / "vgg16.pth")
    g = torch.Generator().manual_seed(1)
    lins = [torch.rand(w, generator=g) for w in WIDTHS]
    torch.save({f"lin{k}.model.1.weight": w.view(1, -1, 1, 1) for k, w in enumerate(lins)}, tmp_path / "lin.pth")

    shapes = convert_lpips(tmp_path / "vgg16.pth", tmp_path / "lpips.npz", lin=tmp_path / "lin.pth")
    assert shapes["features.0.kernel"] == (3, 3, 3, 4) and shapes["lin.4"] == (8,)
    assert lpips_widths(tmp_path / "lpips.npz") == WIDTHS
    model = LPIPS(WIDTHS, rngs=nnx.Rngs(0))
    assign(model, load_weights(f"npz:{tmp_path / 'lpips.npz'}", model))  # strict: every parameter filled

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    got = np.asarray(model(x, y))
    ref = _torch_lpips(features, lins, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert got.shape == (3,) and (got > 0).all()
    np.testing.assert_allclose(np.asarray(model(x, x)), 0.0, atol=1e-7)

    # Without the linear heads every channel weighs 1 (LPIPS' uncalibrated baseline).
    convert_lpips(tmp_path / "vgg16.pth", tmp_path / "base.npz")
    base = LPIPS(WIDTHS, rngs=nnx.Rngs(0))
    assign(base, load_weights(f"npz:{tmp_path / 'base.npz'}", base))
    ones = [torch.ones(w) for w in WIDTHS]
    ref = _torch_lpips(features, ones, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(base(x, y)), ref.detach().numpy(), rtol=1e-4, atol=1e-6)

    # Refused inputs: one line each.
    del sd["features.28.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(LPIPSConvertError, match=r"not a torchvision VGG16 checkpoint: it lacks features.28"):
        convert_lpips(tmp_path / "broken.pth", tmp_path / "x.npz")
    with pytest.raises(LPIPSConvertError, match="no such file"):
        convert_lpips(tmp_path / "absent.pth", tmp_path / "x.npz")
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "badlin.pth")
    with pytest.raises(LPIPSConvertError, match="lin0 has 3 channels but the VGG16 block 0 has 4"):
        convert_lpips(tmp_path / "vgg16.pth", tmp_path / "x.npz", lin=tmp_path / "badlin.pth")
