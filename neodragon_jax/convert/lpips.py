"""LPIPS weights from local files: a torchvision VGG16 checkpoint (and optionally the LPIPS linear heads) ->
one ``.npz`` that :class:`neodragon_jax.eval.lpips.LPIPS` loads (``npz:FILE`` weight source).

Nothing is downloaded: the user supplies ``vgg16-397923af.pth`` (torchvision's ImageNet VGG16,
``features.{i}.weight [O, I, 3, 3]`` / ``.bias``; ``classifier.*`` is ignored) and, for the calibrated
metric, the LPIPS package's ``weights/v0.1/vgg.pth`` (``lin{k}.model.1.weight [1, C, 1, 1]``). Without the
latter every channel weighs 1 (LPIPS' uncalibrated "baseline" distance). Reading ``.pth`` files needs torch
(the ``torch`` extra), imported only here.

``neodragon convert lpips --vgg vgg16-397923af.pth [--lin vgg.pth] --out lpips_vgg16.npz``
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from neodragon_jax.eval.lpips import VGG16_BLOCKS


class LPIPSConvertError(ValueError):
    """An input file that is not what the converter needs (one line naming what is wrong)."""


def _load_pth(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise LPIPSConvertError(f"{str(path)!r}: no such file")
    try:
        import torch
    except ImportError:
        raise LPIPSConvertError("reading .pth files needs torch: pip install -c constraints.txt -e '.[torch]'") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise LPIPSConvertError(f"{str(path)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise LPIPSConvertError(f"{str(path)!r} holds a {type(sd).__name__}, not a state dict")
    return {str(k): v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def convert_lpips(vgg: str | os.PathLike, out: str | os.PathLike, *, lin: str | os.PathLike | None = None
                  ) -> dict[str, tuple[int, ...]]:
    """Write the ``.npz``; returns its array shapes by name. Refuses (one line) a file without every VGG16
    conv of ``features`` up to relu5_3, or LPIPS heads whose widths differ from the backbone's."""
    sd = _load_pth(Path(vgg))
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    arrays: dict[str, np.ndarray] = {}
    missing, cin = [], 3
    widths = []
    for block in VGG16_BLOCKS:
        for idx in block:
            w, b = sd.get(f"features.{idx}.weight"), sd.get(f"features.{idx}.bias")
            if w is None or b is None:
                missing.append(f"features.{idx}.weight/bias")
                continue
            if w.ndim != 4 or w.shape[1] != cin or w.shape[2:] != (3, 3) or b.shape != (w.shape[0],):
                raise LPIPSConvertError(f"{vgg}: features.{idx}.weight has shape {tuple(w.shape)}, expected "
                                        f"[out, {cin}, 3, 3] (torchvision VGG16 layout)")
            arrays[f"features.{idx}.kernel"] = np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), np.float32)
            arrays[f"features.{idx}.bias"] = np.asarray(b, np.float32)
            cin = w.shape[0]
        widths.append(cin)
    if missing:
        raise LPIPSConvertError(f"{vgg} is not a torchvision VGG16 checkpoint: it lacks {', '.join(missing)}")
    heads = _load_pth(Path(lin)) if lin is not None else {}
    for k, width in enumerate(widths):
        if lin is None:
            arrays[f"lin.{k}"] = np.ones((width,), np.float32)
            continue
        w = heads.get(f"lin{k}.model.1.weight", heads.get(f"lin{k}.model.0.weight"))
        if w is None:
            raise LPIPSConvertError(f"{lin} is not an LPIPS linear-head file: it lacks lin{k}.model.1.weight")
        if w.size != width:
            raise LPIPSConvertError(f"{lin}: lin{k} has {w.size} channels but the VGG16 block {k} has {width}")
        arrays[f"lin.{k}"] = np.asarray(w, np.float32).reshape(width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return {k: tuple(v.shape) for k, v in arrays.items()}


__all__ = ["LPIPSConvertError", "convert_lpips"]
