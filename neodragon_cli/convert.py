"""`neodragon convert lpips`: weights the user supplies -> the files this project loads (nothing is downloaded).

``neodragon convert lpips --vgg vgg16-397923af.pth [--lin vgg.pth] --out lpips_vgg16.npz`` turns a local
torchvision VGG16 checkpoint (and optionally the LPIPS package's linear heads) into the ``.npz`` that
``--set stages.decoder.lpips=lpips_vgg16.npz`` trains with (``neodragon_jax.convert.lpips``; needs torch).
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("what", choices=["lpips"], help="lpips: a torchvision VGG16 .pth (+ LPIPS heads) -> LPIPS .npz")
    p.add_argument("--vgg", required=True, help="torchvision VGG16 checkpoint (vgg16-397923af.pth), a local file")
    p.add_argument("--lin", default=None,
                   help="the LPIPS package's linear heads (weights/v0.1/vgg.pth); without them every channel "
                        "weighs 1 (uncalibrated LPIPS)")
    p.add_argument("--out", required=True, help="the .npz to write")


def run(args) -> int:
    from neodragon_jax.convert.lpips import LPIPSConvertError, convert_lpips

    try:
        shapes = convert_lpips(args.vgg, args.out, lin=args.lin)
    except LPIPSConvertError as e:
        print(f"neodragon convert: {e}", file=sys.stderr)
        return 2
    widths = [shapes[f"lin.{k}"][0] for k in range(5)]
    print(f"wrote {args.out}: VGG16 widths {widths}, "
          + ("calibrated LPIPS heads" if args.lin else "uncalibrated (all-ones) heads")
          + f"; train with --set stages.decoder.lpips={args.out}")
    return 0


__all__ = ["add_arguments", "run"]
