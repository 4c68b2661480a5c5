"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") on a
VGG16 backbone, in Flax NNX, from weights the user supplies (nothing is downloaded).

``LPIPS(x, y)`` for images ``[N, H, W, 3]`` in [-1, 1] -> ``[N]`` distances:

1. scale both inputs with the LPIPS constants (``(x - shift) / scale``, shift ``[-.030, -.088, -.188]``,
   scale ``[.458, .448, .450]``);
2. VGG16 ``features`` up to ``relu5_3``; the outputs of ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3`` are
   the five taps (torchvision indices 3, 8, 15, 22, 29; 2x2 max pools between the blocks);
3. each tap unit-normalised over channels (``x / (sqrt(sum x^2) + 1e-10)``), squared difference, a 1x1
   non-negative linear layer to one channel (``lin{k}`` of the LPIPS release; all ones when only the VGG16
   backbone is given: the "baseline" variant, a plain channel sum), mean over space, sum over the taps.

Weights: :func:`neodragon_jax.convert.lpips.convert_lpips` turns a torchvision VGG16 checkpoint (``vgg16-*.pth``,
``features.{i}.weight/bias``), plus optionally the LPIPS linear layers (``vgg.pth`` of the ``lpips`` package,
``lin{k}.model.1.weight``), into one ``.npz`` with this module's parameter names. Widths follow the file, so a
smaller VGG of the same layout works too (the tests use one).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

#: torchvision VGG16 ``features``: convs per block, and the conv indices (ReLU at index + 1; max pools at 4,
#: 9, 16, 23 before blocks 2..5).
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_WIDTHS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nnx.Module):
    """VGG16 taps + LPIPS linear heads (``widths``: the five blocks' channels; 64..512 for the real VGG16)."""

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS, *, rngs: nnx.Rngs):
        if len(widths) != len(VGG16_BLOCKS):
            raise ValueError(f"LPIPS needs one width per VGG16 block ({len(VGG16_BLOCKS)}), got {list(widths)}")
        self.widths = tuple(int(w) for w in widths)
        convs, cin = {}, 3
        for block, width in zip(VGG16_BLOCKS, self.widths):
            for idx in block:
                convs[str(idx)] = nnx.Conv(cin, width, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
                cin = width
        self.features = nnx.Dict(convs)
        self.lin = nnx.Dict({str(k): nnx.Param(jnp.ones((w,), jnp.float32)) for k, w in enumerate(self.widths)})

    def taps(self, x: jax.Array) -> list[jax.Array]:
        """The five ReLU outputs for images ``[N, H, W, 3]`` in [-1, 1] (after the LPIPS input scaling)."""
        x = (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        out = []
        for b, block in enumerate(VGG16_BLOCKS):
            if b:
                n, h, w, c = x.shape
                x = x[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            for idx in block:
                x = nnx.relu(self.features[str(idx)](x))
            out.append(x)
        return out

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS compares two image batches [N, H, W, 3] of one shape, got {x.shape}, {y.shape}")
        n = x.shape[0]
        total = jnp.zeros((n,), jnp.float32)
        for k, f in enumerate(self.taps(jnp.concatenate([x, y]))):
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
            d = jnp.square(f[:n] - f[n:])
            total = total + jnp.mean(jnp.sum(d * self.lin[str(k)][...], axis=-1), axis=(1, 2))
        return total


def lpips_widths(path: str | os.PathLike) -> tuple[int, ...]:
    """The block widths of a converted LPIPS ``.npz`` (read from its array shapes, no array loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights {str(path)!r}: no such file (make it with `neodragon convert lpips "
                                f"--vgg vgg16-397923af.pth --out {path.name}` from a local torchvision VGG16 file)")
    with np.load(path) as z:
        missing = [f"features.{b[0]}.kernel" for b in VGG16_BLOCKS if f"features.{b[0]}.kernel" not in z.files]
        if missing:
            raise ValueError(f"{path} is not a converted LPIPS file: it lacks {', '.join(missing)}")
        return tuple(int(z[f"features.{b[0]}.kernel"].shape[-1]) for b in VGG16_BLOCKS)


__all__ = ["LPIPS", "SCALE", "SHIFT", "VGG16_BLOCKS", "VGG16_WIDTHS", "lpips_widths"]
