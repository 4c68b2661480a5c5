"""`neodragon convert lpips`: a local torchvision-layout VGG16 .pth (tiny widths) becomes the .npz the decoder
stage's LPIPS role loads; bad files are one line with exit status 2. (The conversion's numbers against a
PyTorch LPIPS are tests/eval/test_lpips.py's.)"""

import numpy as np
import pytest

from neodragon_cli.main import main
from neodragon_jax.eval.lpips import VGG16_BLOCKS, lpips_widths

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.needs_torch

WIDTHS = (4, 6, 8, 8, 8)


def _vgg_state_dict():
    g = torch.Generator().manual_seed(0)
    sd, cin = {}, 3
    for block, width in zip(VGG16_BLOCKS, WIDTHS):
        for idx in block:
            sd[f"features.{idx}.weight"] = torch.randn((width, cin, 3, 3), generator=g) * 0.1
            sd[f"features.{idx}.bias"] = torch.zeros(width)
            cin = width
    return sd


def test_convert_lpips(tmp_path, capsys):
    torch.save(_vgg_state_dict(), tmp_path / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": torch.full((1, w, 1, 1), 0.5) for k, w in enumerate(WIDTHS)},
               tmp_path / "lin.pth")
    out = tmp_path / "lpips.npz"
    assert main(["convert", "lpips", "--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "lin.pth"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "VGG16 widths [4, 6, 8, 8, 8]" in printed and "calibrated" in printed
    assert f"stages.decoder.lpips={out}" in printed
    assert lpips_widths(out) == WIDTHS
    with np.load(out) as z:
        np.testing.assert_array_equal(z["lin.2"], np.full(8, 0.5, np.float32))

    for argv, want in [
        (["--vgg", str(tmp_path / "missing.pth")], "no such file"),
        (["--vgg", str(tmp_path / "lin.pth")], "is not a torchvision VGG16 checkpoint"),
        (["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg16.pth")], "not an LPIPS linear-head"),
    ]:
        assert main(["convert", "lpips", *argv, "--out", str(tmp_path / "x.npz")]) == 2, argv
        err = capsys.readouterr().err
        assert want in err and len(err.strip().splitlines()) == 1, (argv, err)
