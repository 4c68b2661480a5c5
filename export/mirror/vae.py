"""PyTorch mirror of the causal video VAEs (spec §5, §9.5, §9.6), plain ``torch.nn`` written from the spec.

- :class:`CausalVAEEncoder` (Pyramid Flow encoder, no ``quant_conv``) and :class:`CausalVAEDecoder` (native
  decoder, no ``post_quant_conv``) with the official names (``conv_in.conv``, ``down_blocks.{i}.resnets.{j}``,
  ``downsamplers.0.conv.conv``, ``mid_block.attentions.0.to_out.0``, ...).
- :class:`CausalVideoVAE`: ``encoder`` + ``quant_conv`` + ``post_quant_conv`` + a decoder: the native one
  (Pyramid Flow ``causal_video_vae``, 260 tensors) or the light decoder (Neodragon ``causal_video_vae``,
  180 tensors, :mod:`export.mirror.light_decoder`).

Tensors are channels-first ``[B, C, F, H, W]``. Non-chunked semantics of the official code
(``is_init_image=True, temporal_chunk=False``): causal convs pad ``k-1`` zero frames at the front only and
``k//2`` zeros spatially; temporal down-sampling maps ``F -> floor((F-1)/2) + 1``; temporal up-sampling maps
``T -> 2T - 1`` ('b (c p) t h w -> b c (t p) h w', first frame dropped); spatial up-sampling is a conv to
``4C`` then depth-to-space ('b (c p1 p2) t h w -> b c t (h p1) (w p2)').
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_jax.config.schema import CausalVAEConfig, VAEConfig


class CausalConv3d(nn.Module):
    """``Conv3d`` (in ``self.conv``) with front-only zero time padding and symmetric zero space padding."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride=1):
        super().__init__()
        self.k = k
        self.conv = nn.Conv3d(cin, cout, k, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.k // 2
        return self.conv(F.pad(x, (p, p, p, p, self.k - 1, 0)))


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame separately (statistics in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).float()
        y = F.group_norm(y, self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4).to(x.dtype)


class ChannelAffine(nn.Module):
    """``norm_groups=0``: the GroupNorm's per-channel affine without its statistics (not official)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x.float() * self.weight.float().view(shape) + self.bias.float().view(shape)).to(x.dtype)


def _norm(c: int, cfg: CausalVAEConfig) -> nn.Module:
    if cfg.norm_groups == 0:
        return ChannelAffine(c)
    return CausalGroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)


class CausalResnetBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: CausalVAEConfig):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, cfg), CausalConv3d(cin, cout, 3)
        self.norm2, self.conv2 = _norm(cout, cfg), CausalConv3d(cout, cout, 3)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _ConvHolder(nn.Module):
    """``<name>.conv.conv.*``: a resampler whose only parameters are one causal conv."""

    def __init__(self, cin: int, cout: int, stride=1):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, 3, stride=stride)


class CausalDownsample2x(_ConvHolder):
    def __init__(self, c: int):
        super().__init__(c, c, stride=(1, 2, 2))

    def forward(self, x):
        return self.conv(x)


class CausalTemporalDownsample2x(_ConvHolder):
    def __init__(self, c: int):
        super().__init__(c, c, stride=(2, 1, 1))

    def forward(self, x):
        return self.conv(x)


class CausalUpsample2x(_ConvHolder):
    def __init__(self, c: int):
        super().__init__(c, 4 * c)

    def forward(self, x):
        y = self.conv(x)
        b, c4, t, h, w = y.shape
        y = y.reshape(b, c4 // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)  # b c t h p1 w p2
        return y.reshape(b, c4 // 4, t, 2 * h, 2 * w)


class CausalTemporalUpsample2x(_ConvHolder):
    def __init__(self, c: int):
        super().__init__(c, 2 * c)

    def forward(self, x):
        y = self.conv(x)
        b, c2, t, h, w = y.shape
        y = y.reshape(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return y[:, :, 1:]


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over each frame's ``H*W`` positions; GN in, residual out."""

    def __init__(self, c: int, cfg: CausalVAEConfig):
        super().__init__()
        self.group_norm = _norm(c, cfg)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.group_norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        attn = torch.softmax((q.float() @ k.float().transpose(1, 2)) / math.sqrt(c), dim=-1).to(v.dtype)
        o = self.to_out[1](self.to_out[0](attn @ v))
        return x + o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3).to(x.dtype)


class CausalUNetMidBlock(nn.Module):
    def __init__(self, c: int, cfg: CausalVAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([CausalResnetBlock3D(c, c, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, cfg)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlockCausal3D(nn.Module):
    def __init__(self, cin, cout, cfg: CausalVAEConfig, spatial: bool, temporal: bool):
        super().__init__()
        n = cfg.encoder_layers_per_block
        self.resnets = nn.ModuleList([CausalResnetBlock3D(cin if j == 0 else cout, cout, cfg) for j in range(n)])
        self.downsamplers = nn.ModuleList([CausalDownsample2x(cout)]) if spatial else None
        self.temporal_downsamplers = nn.ModuleList([CausalTemporalDownsample2x(cout)]) if temporal else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for group in (self.downsamplers, self.temporal_downsamplers):
            if group is not None:
                x = group[0](x)
        return x


class UpDecoderBlockCausal3D(nn.Module):
    def __init__(self, cin, cout, cfg: CausalVAEConfig, spatial: bool, temporal: bool):
        super().__init__()
        n = cfg.decoder_layers_per_block
        self.resnets = nn.ModuleList([CausalResnetBlock3D(cin if j == 0 else cout, cout, cfg) for j in range(n)])
        self.upsamplers = nn.ModuleList([CausalUpsample2x(cout)]) if spatial else None
        self.temporal_upsamplers = nn.ModuleList([CausalTemporalUpsample2x(cout)]) if temporal else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for group in (self.upsamplers, self.temporal_upsamplers):
            if group is not None:
                x = group[0](x)
        return x


class CausalVAEEncoder(nn.Module):
    """``[B, 3, F, H, W]`` in [-1, 1] -> moments ``[B, 2L, T, H/8, W/8]`` (before ``quant_conv``)."""

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        w = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, w[0], 3)
        blocks, cin = [], w[0]
        for i, cout in enumerate(w):
            blocks.append(DownEncoderBlockCausal3D(cin, cout, cfg, cfg.spatial_down[i], cfg.temporal_down[i]))
            cin = cout
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = CausalUNetMidBlock(w[-1], cfg)
        self.conv_norm_out = _norm(w[-1], cfg)
        self.conv_out = CausalConv3d(w[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class CausalVAEDecoder(nn.Module):
    """Native decoder: ``[B, L, T, h, w]`` (after ``post_quant_conv``) -> ``[B, 3, 1 + 8(T-1), 8h, 8w]``."""

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        rev = tuple(reversed(cfg.block_out_channels))
        self.conv_in = CausalConv3d(cfg.latent_channels, rev[0], 3)
        self.mid_block = CausalUNetMidBlock(rev[0], cfg)
        blocks, cin = [], rev[0]
        for i, cout in enumerate(rev):
            blocks.append(UpDecoderBlockCausal3D(cin, cout, cfg, cfg.spatial_down[i], cfg.temporal_down[i]))
            cin = cout
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = _norm(rev[-1], cfg)
        self.conv_out = CausalConv3d(rev[-1], cfg.in_channels, 3)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class CausalVideoVAE(nn.Module):
    """Encoder + ``quant_conv`` + ``post_quant_conv`` + decoder (``'native'`` or ``'light'``, default ``cfg.decoder``).

    ``encode(video) -> (mean, logvar)`` (logvar clamped), ``decode(z) -> video`` (raw latents, not clipped).
    """

    def __init__(self, cfg: VAEConfig, decoder: str | None = None):
        super().__init__()
        from export.mirror.light_decoder import LightDecoder

        kind = decoder or cfg.decoder
        if kind not in ("native", "light"):
            raise ValueError(f"decoder must be 'native' or 'light', got {kind!r}")
        c = cfg.causal
        self.cfg, self.decoder_kind = cfg, kind
        self.encoder = CausalVAEEncoder(c)
        self.quant_conv = CausalConv3d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = CausalConv3d(c.latent_channels, c.latent_channels, 1)
        self.decoder = CausalVAEDecoder(c) if kind == "native" else LightDecoder(cfg.light_decoder)

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg.causal
        moments = self.quant_conv(self.encoder(video))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(c.logvar_min, c.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior mean."""
        return self.decode(self.encode(video)[0])


__all__ = ["CausalVAEDecoder", "CausalVAEEncoder", "CausalVideoVAE"]
