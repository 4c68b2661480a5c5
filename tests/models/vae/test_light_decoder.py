"""Light (TAEHV-style) decoder: frame counts, streaming == whole clip, causality, parity with a PyTorch
reference written here from spec §5.2 (official ``decoder.blocks.{i}`` names)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.config.schema import LightDecoderConfig
from neodragon_jax.models.vae import LightDecoder


def random_model(ctor, seed: int = 0):
    """``ctor()`` with O(1)-scale numpy random weights (no per-shape XLA compile of jax initialisers)."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if name == "kernel":
            v = rng.standard_normal(leaf.shape) * np.sqrt(1.0 / np.prod(leaf.shape[:-1]))
        else:
            v = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(v, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def cfg() -> LightDecoderConfig:
    return load_config("tiny").model.vae.light_decoder  # widths 32/16/16, one MemBlock per stage


@pytest.fixture(scope="module")
def dec(cfg):
    return random_model(lambda: LightDecoder(cfg, rngs=nnx.Rngs(0)), seed=2)


@nnx.jit
def _whole(model, z):
    return model(z)


@nnx.jit
def _raw(model, z):
    """Untrimmed whole-clip output: the raw frames the stream emits."""
    b, _, _, h, w = z.shape
    y, _ = model._run(jnp.transpose(z, (0, 2, 3, 4, 1)), model.init_state(b, h, w))
    return jnp.transpose(y, (0, 4, 1, 2, 3))


@nnx.jit(static_argnames="first")
def _step(model, state, zt, first=False):
    return model.step(state, zt, first=first)


def test_block_layout_full_size():
    """Default config reproduces the official Sequential indices (spec §9.5)."""
    d = nnx.eval_shape(lambda: LightDecoder(LightDecoderConfig(), rngs=nnx.Rngs(0)))
    kinds = [type(b).__name__ for b in d.blocks]
    assert len(kinds) == 23
    assert [i for i, k in enumerate(kinds) if k == "MemBlock"] == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    assert [i for i, k in enumerate(kinds) if k == "TGrow"] == [7, 13, 19]
    assert [i for i, k in enumerate(kinds) if k == "Upsample2x"] == [6, 12, 18]
    assert kinds[0] == "Clamp" and kinds[2] == kinds[21] == "ReLU"
    assert d.temporal_factor == 8 and d.frames_to_trim == 7


def test_frame_counts(dec):
    """7 latents -> 56 raw frames -> drop 7 -> 49; one latent -> one frame (abstract evaluation)."""
    graphdef, state = nnx.split(dec)
    for t, f in ((7, 49), (1, 1), (3, 17)):
        z = jax.ShapeDtypeStruct((2, 16, t, 3, 5), jnp.float32)
        out = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s)(z), state, z)
        assert out.shape == (2, 3, f, 24, 40)


def test_streaming_equals_whole_clip(dec):
    """Frame-by-frame decoding with carried memories reproduces the whole-clip decode (max abs <= 1e-5)."""
    z = _normal((2, 16, 4, 3, 4), seed=1) * 2.0
    whole = np.asarray(_whole(dec, z))
    assert whole.shape == (2, 3, 25, 24, 32)
    assert float(np.abs(whole).max()) > 0.1  # O(1) activations: the tolerance is meaningful

    state = dec.init_state(2, 3, 4)
    chunks = []
    for t in range(z.shape[2]):
        state, frames = _step(dec, state, z[:, :, t], first=(t == 0))
        assert frames.shape[2] == (1 if t == 0 else 8)
        chunks.append(np.asarray(frames))
    np.testing.assert_allclose(np.concatenate(chunks, axis=2), whole, atol=1e-5, rtol=0)

    # Without the start-up drop, the streamed frames are exactly the raw (untrimmed) clip output.
    state = dec.init_state(2, 3, 4)
    raw = [np.asarray(_step(dec, state, z[:, :, 0])[1])]
    np.testing.assert_allclose(raw[0], np.asarray(_raw(dec, z))[:, :, :8], atol=1e-5, rtol=0)


def test_decoder_is_causal(dec):
    """Frames decoded from the first k latents equal the first frames of the full decode."""
    z = _normal((2, 16, 4, 3, 4), seed=1) * 2.0
    whole = np.asarray(_whole(dec, z))
    part = np.asarray(_whole(dec, z[:, :, :2]))
    assert part.shape[2] == 9
    np.testing.assert_allclose(part, whole[:, :, :9], atol=1e-5, rtol=0)


def test_input_errors(dec):
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        dec(jnp.zeros((1, 8, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"one latent frame \[B, 16, h, w\]"):
        dec.step(dec.init_state(1, 3, 3), jnp.zeros((1, 16, 1, 3, 3)))
    with pytest.raises(ValueError, match="one flag per stage"):
        LightDecoder(LightDecoderConfig(channels=(8, 8), temporal_upscale=(True,)), rngs=nnx.Rngs(0))


def _torch_reference(cfg: LightDecoderConfig):
    """TAEHV-style decoder from spec §5.2 as an ``nn.Sequential`` named like the official ``blocks``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv(cin, cout, bias=True):
        return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / cfg.clamp) * cfg.clamp

    class MemBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Sequential(conv(2 * c, c), nn.ReLU(), conv(c, c), nn.ReLU(), conv(c, c))

        def forward(self, x, past):
            return F.relu(self.conv(torch.cat([x, past], 1)) + x)

    class TGrow(nn.Module):
        def __init__(self, c, stride):
            super().__init__()
            self.stride = stride
            self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

        def forward(self, x):
            _, c, h, w = x.shape
            return self.conv(x).reshape(-1, c, h, w)  # channel group j of frame t -> frame s*t + j

    ch = tuple(cfg.channels) + (cfg.channels[-1],)
    layers = [Clamp(), conv(cfg.latent_channels, ch[0]), nn.ReLU()]
    for i, up in enumerate(cfg.temporal_upscale):
        layers += [MemBlock(ch[i]) for _ in range(cfg.blocks_per_stage)]
        layers += [nn.Upsample(scale_factor=2), TGrow(ch[i], 2 if up else 1), conv(ch[i], ch[i + 1], bias=False)]
    layers += [nn.ReLU(), conv(ch[-1], cfg.out_channels)]

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*layers)
            self.trim = 2 ** sum(cfg.temporal_upscale) - 1

        def forward(self, z):  # [B, C, T, h, w]; parallel mode: memory = input shifted by one frame
            n = z.shape[0]
            x = z.transpose(1, 2).flatten(0, 1)
            for b in self.blocks:
                if isinstance(b, MemBlock):
                    xt = x.reshape(n, -1, *x.shape[1:])
                    past = F.pad(xt, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1].reshape(x.shape)
                    x = b(x, past)
                else:
                    x = b(x)
            x = x.reshape(n, -1, *x.shape[1:])[:, self.trim:]
            return x.transpose(1, 2)

    return Decoder()


@pytest.mark.parity
@pytest.mark.needs_torch
def test_parity_with_torch_reference(dec, cfg):
    """Whole-clip decode vs the PyTorch reference loaded through the production key map (fp32).
    Tolerance: max abs 1e-5 on O(1) outputs."""
    torch = pytest.importorskip("torch")
    from neodragon_jax.convert.io import export_state_dict
    from neodragon_jax.convert.vae import light_decoder_keymap

    ref = _torch_reference(cfg)
    sd = export_state_dict(dec, light_decoder_keymap(cfg))
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)

    z = _normal((2, 16, 4, 3, 4), seed=1) * 2.0
    ours = np.asarray(_whole(dec, z))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(z)).numpy()
    assert ours.shape == theirs.shape == (2, 3, 25, 24, 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
