"""Causal video VAE: shapes, causality, latent normalisation, frame counts, and parity with a PyTorch
reference written here from the Pyramid Flow semantics (spec §5.1, §9.5-9.6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.config.schema import CausalVAEConfig
from neodragon_jax.models.vae import (
    CausalVideoVAE,
    denormalize_latents,
    latent_frames,
    normalize_latents,
    video_frames,
)


def random_model(ctor, seed: int = 0):
    """Build ``ctor()`` with O(1)-scale random weights drawn in numpy.

    Avoids one XLA compile per parameter shape (random initialisers are jitted per shape, which costs
    tens of seconds on a loaded 2-core CPU) and gives activations of order one, so that comparisons
    with an absolute tolerance are meaningful.
    """
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        shape = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)
        elif name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            v = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(v, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def vae_cfg():
    # The tiny preset's VAE with native decoder (widths 16/32/32/32, one ResBlock per block).
    return load_config("tiny").model.vae


@pytest.fixture(scope="module")
def vae(vae_cfg):
    return random_model(lambda: CausalVideoVAE(vae_cfg, decoder="native", rngs=nnx.Rngs(0)), seed=1)


@nnx.jit
def _encode(model, video):
    post = model.encode(video)
    return post.mean, post.logvar


@nnx.jit
def _decode(model, z):
    return model.decode(z)


def _video(frames, size, seed=0):
    # numpy, not jax.random: every new jax.random shape costs an XLA compile on the CPU.
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (1, 3, frames, size, size)).astype(np.float32)


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("frames,size", [(1, 16), (17, 16), (49, 16), (49, 32)])
def test_shapes(vae, frames, size):
    """Abstract evaluation (traces the real code, compiles nothing): 49 -> 7 latents -> 49 frames."""
    graphdef, state = nnx.split(vae)

    def roundtrip(state, video):
        model = nnx.merge(graphdef, state)
        post = model.encode(video)
        return post.mean, post.logvar, model.decode(post.mean)

    mean, logvar, y = jax.eval_shape(roundtrip, state, jax.ShapeDtypeStruct((2, 3, frames, size, size), jnp.float32))
    t = latent_frames(frames)
    assert mean.shape == logvar.shape == (2, 16, t, size // 8, size // 8)
    assert y.shape == (2, 3, video_frames(t), size, size)


def test_encode_decode_run(vae, vae_cfg):
    """A real 9-frame round trip: 2 latents, 9 frames, finite, logvar clamped to the config range."""
    mean, logvar = _encode(vae, _video(9, 16))
    assert mean.shape == (1, 16, 2, 2, 2)
    c = vae_cfg.causal
    assert float(logvar.min()) >= c.logvar_min and float(logvar.max()) <= c.logvar_max
    y = _decode(vae, mean)
    assert y.shape == (1, 3, 9, 16, 16) and bool(jnp.all(jnp.isfinite(y)))


def test_posterior_sample():
    from neodragon_jax.models.vae import DiagonalGaussian

    mean, logvar = _normal((1, 16, 2, 2, 2), 1), _normal((1, 16, 2, 2, 2), 2)
    post = DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
    a, b = post.sample(jax.random.key(0)), post.sample(jax.random.key(1))
    assert a.shape == mean.shape and not np.allclose(a, b)
    # Reparameterisation: (sample - mean) / exp(logvar / 2) is the standard normal draw for that key.
    eps = (np.asarray(a) - mean) / np.exp(0.5 * logvar)
    np.testing.assert_allclose(eps, jax.random.normal(jax.random.key(0), a.shape), atol=1e-4)
    assert post.mode() is post.mean


def test_encoder_is_causal(vae):
    """Latent t sees frames <= 8t only: changing frames 1.. leaves latent 0 unchanged, changes latent 1."""
    v = _video(9, 16, seed=3)
    v2 = v.copy()
    v2[:, :, 1:] = _video(9, 16, seed=4)[:, :, 1:]
    m1, _ = _encode(vae, v)
    m2, _ = _encode(vae, v2)
    np.testing.assert_array_equal(np.asarray(m1[:, :, :1]), np.asarray(m2[:, :, :1]))
    assert float(jnp.max(jnp.abs(m1[:, :, 1] - m2[:, :, 1]))) > 1e-3
    # The first frame alone encodes to the clip's first latent (how the pipeline encodes the image).
    m0, _ = _encode(vae, v[:, :, :1])
    np.testing.assert_allclose(np.asarray(m0[:, :, 0]), np.asarray(m1[:, :, 0]), atol=1e-5)


def test_native_decoder_is_causal(vae):
    z = _normal((1, 16, 2, 2, 2), 5)
    full = _decode(vae, z)
    first = _decode(vae, z[:, :, :1])
    assert first.shape == (1, 3, 1, 16, 16)
    np.testing.assert_allclose(np.asarray(first), np.asarray(full[:, :, :1]), atol=1e-5)


def test_input_errors(vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(jnp.zeros((1, 3, 1, 12, 16)))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        vae.encode(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        vae.decode(jnp.zeros((1, 32, 1, 2, 2)))


# ---- latent normalisation and frame counts ---------------------------------------------------------------


def test_normalisation_constants_and_roundtrip():
    cfg = CausalVAEConfig()
    z = _normal((2, 16, 7, 4, 6)) * 2.0
    zn = normalize_latents(z, cfg)
    # Spec §1.3 step 4 / 7: frame 0 (z - 0.1490) * 0.5430; later frames (z + 0.2343) * 0.3031.
    np.testing.assert_allclose(zn[:, :, 0], (z[:, :, 0] - 0.1490) * 0.5430, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zn[:, :, 1:], (z[:, :, 1:] + 0.2343) * 0.3031, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(denormalize_latents(zn, cfg), z, atol=1e-5)
    # A clip that does not start at frame 0 of its video uses the video constants throughout.
    zv = normalize_latents(z, cfg, first_frame_is_image=False)
    np.testing.assert_allclose(zv, (z + 0.2343) * 0.3031, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(denormalize_latents(zv, cfg, first_frame_is_image=False), z, atol=1e-5)
    # The Pyramid Flow scale is a config change, not a code change.
    pf = dataclasses.replace(cfg, video_scale=1 / 3.0986)
    np.testing.assert_allclose(normalize_latents(z, pf)[:, :, 3], (z[:, :, 3] + 0.2343) / 3.0986, rtol=1e-6, atol=1e-6)


def test_frame_counts():
    assert latent_frames(49) == 7 and latent_frames(1) == 1 and latent_frames(17) == 3
    assert video_frames(7) == 49 and video_frames(1) == 1
    for n in (1, 9, 17, 49, 121):
        assert video_frames(latent_frames(n)) == n
    for bad in (0, 48, 50, 16, -7, 2.0):
        with pytest.raises(ValueError, match=r"1 \+ 8k"):
            latent_frames(bad)
    with pytest.raises(ValueError, match="positive"):
        video_frames(0)


# ---- parity with a PyTorch reference ------------------------------------------------------------------------


def _torch_reference(cfg: CausalVAEConfig):
    """PF causal VAE (encoder, quant convs, native decoder) from the spec, with the official module names."""
    import torch
    import torch.nn.functional as F
    from einops import rearrange
    from torch import nn

    class CausalConv3d(nn.Module):
        def __init__(self, cin, cout, k, stride=1):
            super().__init__()
            self.k = k
            self.conv = nn.Conv3d(cin, cout, k, stride=stride)

        def forward(self, x):
            p = self.k // 2
            return self.conv(F.pad(x, (p, p, p, p, self.k - 1, 0)))

    class CausalGroupNorm(nn.GroupNorm):
        def forward(self, x):
            t = x.shape[2]
            y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
            return rearrange(y, "(b t) c h w -> b c t h w", t=t)

    def gn(c):
        return CausalGroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)

    class Res(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.norm1, self.conv1 = gn(cin), CausalConv3d(cin, cout, 3)
            self.norm2, self.conv2 = gn(cout), CausalConv3d(cout, cout, 3)
            self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

        def forward(self, x):
            h = self.conv1(F.silu(self.norm1(x)))
            h = self.conv2(F.silu(self.norm2(h)))
            return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h

    class Wrap(nn.Module):  # downsamplers.0 / upsamplers.0 hold their CausalConv3d as `.conv`
        def __init__(self, cin, cout, stride=1, post=None):
            super().__init__()
            self.conv, self.post = CausalConv3d(cin, cout, 3, stride), post

        def forward(self, x):
            y = self.conv(x)
            return self.post(y) if self.post else y

    def d2s(y):
        return rearrange(y, "b (c p1 p2) t h w -> b c t (h p1) (w p2)", p1=2, p2=2)

    def t_up(y):
        return rearrange(y, "b (c p) t h w -> b c (t p) h w", p=2)[:, :, 1:]

    class Attn(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.group_norm = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
            self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
            self.to_out = nn.ModuleList([nn.Linear(c, c)])

        def forward(self, x):
            b, c, t, h, w = x.shape
            f = rearrange(x, "b c t h w -> (b t) c h w")
            n = rearrange(self.group_norm(f), "n c h w -> n (h w) c")
            o = F.scaled_dot_product_attention(self.to_q(n)[:, None], self.to_k(n)[:, None], self.to_v(n)[:, None])
            o = rearrange(self.to_out[0](o[:, 0]), "n (h w) c -> n c h w", h=h)
            return rearrange(f + o, "(b t) c h w -> b c t h w", t=t)

    class Mid(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.resnets = nn.ModuleList([Res(c, c), Res(c, c)])
            self.attentions = nn.ModuleList([Attn(c)])

        def forward(self, x):
            return self.resnets[1](self.attentions[0](self.resnets[0](x)))

    class Block(nn.Module):
        def __init__(self, cin, cout, n, spatial, temporal, up):
            super().__init__()
            self.resnets = nn.ModuleList([Res(cin if i == 0 else cout, cout) for i in range(n)])
            if up:
                self.upsamplers = nn.ModuleList([Wrap(cout, 4 * cout, post=d2s)]) if spatial else None
                self.temporal_upsamplers = nn.ModuleList([Wrap(cout, 2 * cout, post=t_up)]) if temporal else None
                self.stages = [self.upsamplers, self.temporal_upsamplers]
            else:
                self.downsamplers = nn.ModuleList([Wrap(cout, cout, (1, 2, 2))]) if spatial else None
                self.temporal_downsamplers = nn.ModuleList([Wrap(cout, cout, (2, 1, 1))]) if temporal else None
                self.stages = [self.downsamplers, self.temporal_downsamplers]

        def forward(self, x):
            for r in self.resnets:
                x = r(x)
            for s in self.stages:
                if s is not None:
                    x = s[0](x)
            return x

    w = cfg.block_out_channels

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = CausalConv3d(cfg.in_channels, w[0], 3)
            cins = (w[0],) + tuple(w[:-1])
            self.down_blocks = nn.ModuleList(
                Block(cins[i], w[i], cfg.encoder_layers_per_block, cfg.spatial_down[i], cfg.temporal_down[i], False)
                for i in range(len(w))
            )
            self.mid_block = Mid(w[-1])
            self.conv_norm_out = gn(w[-1])
            self.conv_out = CausalConv3d(w[-1], 2 * cfg.latent_channels, 3)

        def forward(self, x):
            x = self.conv_in(x)
            for b in self.down_blocks:
                x = b(x)
            return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            r = tuple(reversed(w))
            self.conv_in = CausalConv3d(cfg.latent_channels, r[0], 3)
            self.mid_block = Mid(r[0])
            cins = (r[0],) + r[:-1]
            self.up_blocks = nn.ModuleList(
                Block(cins[i], r[i], cfg.decoder_layers_per_block, cfg.spatial_down[i], cfg.temporal_down[i], True)
                for i in range(len(r))
            )
            self.conv_norm_out = gn(r[-1])
            self.conv_out = CausalConv3d(r[-1], cfg.in_channels, 3)

        def forward(self, z):
            x = self.mid_block(self.conv_in(z))
            for b in self.up_blocks:
                x = b(x)
            return self.conv_out(F.silu(self.conv_norm_out(x)))

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), Decoder()
            self.quant_conv = CausalConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
            self.post_quant_conv = CausalConv3d(cfg.latent_channels, cfg.latent_channels, 1)

        def encode(self, x):
            mean, logvar = torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)
            return mean, torch.clamp(logvar, cfg.logvar_min, cfg.logvar_max)

        def decode(self, z):
            return self.decoder(self.post_quant_conv(z))

    return VAE()


@pytest.mark.parity
@pytest.mark.needs_torch
def test_parity_with_torch_reference(vae, vae_cfg):
    """Encoder moments and native decode vs a PyTorch reference fed the weights through the production key
    map (fp32). Tolerance: max abs 1e-5 on O(1) activations (measured <= 7e-7)."""
    torch = pytest.importorskip("torch")
    from neodragon_jax.convert.io import export_state_dict
    from neodragon_jax.convert.vae import pf_vae_keymap

    ref = _torch_reference(vae_cfg.causal)
    sd = export_state_dict(vae, pf_vae_keymap(vae_cfg))
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)

    video = _video(9, 16, seed=7)
    z = _normal((1, 16, 2, 2, 2), 8)
    mean, logvar = _encode(vae, video)
    y = _decode(vae, z)
    with torch.no_grad():
        tm, tl = ref.encode(torch.from_numpy(video))
        ty = ref.decode(torch.from_numpy(z))
    assert float(np.abs(tm.numpy()).max()) > 0.1  # activations are O(1), so the tolerance is meaningful
    for ours, theirs in ((mean, tm), (logvar, tl), (y, ty)):
        assert ours.shape == tuple(theirs.shape)
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5, rtol=0)


def test_affine_only_norm_keeps_the_parameters_and_skips_the_statistics():
    from neodragon_jax.layers.causal_conv import CausalGroupNorm

    kw = dict(eps=1e-6, rngs=nnx.Rngs(0))
    gn, affine = CausalGroupNorm(8, num_groups=2, **kw), CausalGroupNorm(8, num_groups=0, **kw)
    assert {k for k, _ in nnx.iter_graph(gn) if k} == {k for k, _ in nnx.iter_graph(affine) if k}
    affine.scale[...] = jnp.arange(1.0, 9.0)
    affine.bias[...] = jnp.full((8,), 0.5)
    x = 3.0 + _normal((2, 3, 4, 4, 8))  # a large mean: a GroupNorm would remove it
    np.testing.assert_allclose(affine(x), x * jnp.arange(1.0, 9.0) + 0.5, rtol=1e-6)
    assert abs(float(gn(x).mean())) < 1e-3
    with pytest.raises(ValueError, match="num_groups must be >= 0"):
        CausalGroupNorm(8, num_groups=-1, **kw)
