"""PyTorch mirror of Neodragon's light decoder: TAEHV-style, 8x temporal up-sampling (spec §5.2, §9.5).

``blocks`` is an ``nn.Sequential`` with the official indices (default config)::

    0 Clamp  1 conv 16->256  2 ReLU  3-5 MemBlock(256)  6 Upsample  7 TGrow(256, 2)  8 conv 256->128 (no bias)
    9-11 MemBlock(128)  12 Upsample  13 TGrow(128, 2)  14 conv 128->64 (no bias)
    15-17 MemBlock(64)  18 Upsample  19 TGrow(64, 2)  20 conv 64->64 (no bias)  21 ReLU  22 conv 64->3

so its ``state_dict()`` (under the VAE's ``decoder.``) is ``decoder.blocks.{i}...`` as in the checkpoint.
``forward(z [B, L, T, h, w]) -> [B, 3, 8T - 7, 8h, 8w]`` runs in TAEHV's parallel mode: all frames at once,
each MemBlock's memory is its own input shifted one frame later (zeros before frame 0), TGrow turns channel
group ``j`` of frame ``t`` into frame ``s*t + j``; the first 7 raw frames are dropped. Not clipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_jax.config.schema import LightDecoderConfig


def _conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class Clamp(nn.Module):
    def __init__(self, c: float = 3.0):
        super().__init__()
        self.c = c

    def forward(self, x):
        return torch.tanh(x / self.c) * self.c


class MemBlock(nn.Module):
    """``relu(conv([x_t, x_{t-1}]) chain + x_t)``; ``conv = Sequential(conv 2C->C, ReLU, conv, ReLU, conv)``."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TGrow(nn.Module):
    """1x1 conv ``C -> s*C`` (no bias); reshaping ``[N*T, s*C, H, W] -> [N*T*s, C, H, W]`` orders frames ``s*t + j``."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = _conv(c, c * stride, 1, bias=False)

    def forward(self, x):
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class LightDecoder(nn.Module):
    def __init__(self, cfg: LightDecoderConfig):
        super().__init__()
        if len(cfg.temporal_upscale) != len(cfg.channels):
            raise ValueError("LightDecoderConfig: one temporal_upscale flag per stage of channels")
        if len(cfg.spatial_upscale) != len(cfg.channels):
            raise ValueError("LightDecoderConfig: one spatial_upscale flag per stage of channels")
        self.cfg = cfg
        ch = tuple(cfg.channels) + (cfg.channels[-1],)
        layers: list[nn.Module] = [Clamp(cfg.clamp), _conv(cfg.latent_channels, ch[0]), nn.ReLU()]
        for i, (up_t, up_s) in enumerate(zip(cfg.temporal_upscale, cfg.spatial_upscale)):
            layers += [MemBlock(ch[i]) for _ in range(cfg.blocks_per_stage)]
            layers += [nn.Upsample(scale_factor=2) if up_s else nn.Identity(), TGrow(ch[i], 2 if up_t else 1), _conv(ch[i], ch[i + 1], bias=False)]
        layers += [nn.ReLU(), _conv(ch[-1], cfg.out_channels)]
        self.blocks = nn.Sequential(*layers)
        self.frames_to_trim = 2 ** sum(bool(u) for u in cfg.temporal_upscale) - 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"LightDecoder expects [B, {self.cfg.latent_channels}, T, h, w], got {tuple(z.shape)}")
        n, c, t = z.shape[:3]
        x = z.permute(0, 2, 1, 3, 4).reshape(n * t, c, *z.shape[3:])
        for blk in self.blocks:
            if isinstance(blk, MemBlock):
                nt, cc, h, w = x.shape
                seq = x.reshape(n, nt // n, cc, h, w)
                past = F.pad(seq, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1].reshape(x.shape)
                x = blk(x, past)
            else:
                x = blk(x)
        nt, cc, h, w = x.shape
        x = x.reshape(n, nt // n, cc, h, w)[:, self.frames_to_trim :]
        return x.permute(0, 2, 1, 3, 4)


__all__ = ["LightDecoder", "MemBlock", "TGrow"]
