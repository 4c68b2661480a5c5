"""PyTorch mirrors of the causal VAE encoder, the native decoder and Neodragon's light decoder: official
state-dict keys/shapes at full size (meta device), parity with the JAX models on the tiny preset with random
non-zero weights, and the bit-identical JAX -> PyTorch -> JAX round trip.

Tolerance: max abs error <= 1e-5 in float32 (outputs of magnitude ~1-3).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from export.convert import from_mirror, keymap_for, random_weights, to_mirror  # noqa: E402
from export.mirror.light_decoder import LightDecoder as TorchLightDecoder  # noqa: E402
from export.mirror.vae import CausalVideoVAE as TorchVAE  # noqa: E402
from neodragon_jax.config import load_config  # noqa: E402
from neodragon_jax.config.schema import VAEConfig  # noqa: E402
from neodragon_jax.convert.io import param_arrays, param_shapes  # noqa: E402
from neodragon_jax.models.vae import CausalVideoVAE, LightDecoder  # noqa: E402

pytestmark = [pytest.mark.needs_torch]

TOL = 1e-5  # max abs error, float32
TINY = load_config("tiny").model.vae  # widths 16/32/32/32, 1 resnet per block, 4 groups; light 32/16/16


def make_pair(kind: str, seed: int = 0, cfg: VAEConfig = TINY):
    model = random_weights(nnx.eval_shape(lambda: CausalVideoVAE(cfg, decoder=kind, rngs=nnx.Rngs(0))), seed)
    return model, to_mirror(model)


@pytest.fixture(scope="module")
def pairs():
    return {kind: make_pair(kind, seed=i + 1) for i, kind in enumerate(("native", "light"))}


# ---- full size ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kind", [("asym_vae", "light"), ("pf_vae", "native")])
def test_full_size_state_dict_is_the_official_one(name, kind, official_shapes):
    with torch.device("meta"):
        mirror = TorchVAE(VAEConfig(), decoder=kind)
    got = {k: list(v.shape) for k, v in mirror.state_dict().items()}
    assert got == official_shapes[name]
    # and equals what the JAX key map writes for the abstract JAX model
    model = nnx.eval_shape(lambda: CausalVideoVAE(VAEConfig(), decoder=kind, rngs=nnx.Rngs(0)))
    assert {k: tuple(v) for k, v in got.items()} == keymap_for(model).torch_shapes(param_shapes(model))
    counts = {part: sum(p.numel() for p in getattr(mirror, part).parameters()) for part in ("encoder", "decoder")}
    assert abs(counts["encoder"] - 109.63e6) < 5e3  # spec §5.1
    if kind == "native":
        assert abs(counts["decoder"] - 225.77e6) < 5e3  # spec §5.1
    else:
        assert abs(counts["decoder"] - 9.91e6) < 5e3  # spec §5.2


# ---- parity -----------------------------------------------------------------------------------------------------


def _video(seed=0, frames=9, hw=32):
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, frames, hw, hw)).astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("frames", [9, 1])
def test_encoder_matches_jax(pairs, frames):
    model, mirror = pairs["native"]
    video = _video(frames=frames)
    post = nnx.jit(lambda m, v: m.encode(v))(model, jnp.asarray(video))
    with torch.no_grad():
        mean, logvar = mirror.encode(torch.from_numpy(video))
    assert mean.shape == (1, 16, 1 + (frames - 1) // 8, 4, 4)
    err = max(float(np.abs(np.asarray(post.mean) - mean.numpy()).max()),
              float(np.abs(np.asarray(post.logvar) - logvar.numpy()).max()))
    print(f"VAE encoder ({frames} frames): max abs err {err:.3g}, |mean| max {mean.abs().max():.3g}")
    assert mean.abs().max() > 0.3 and err <= TOL


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["native", "light"])
def test_decoders_match_jax(pairs, kind):
    model, mirror = pairs[kind]
    z = np.random.default_rng(1).standard_normal((1, 16, 3, 4, 4)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda m, x: m.decode(x))(model, jnp.asarray(z)))
    with torch.no_grad():
        want = mirror.decode(torch.from_numpy(z)).numpy()
    err = float(np.abs(got - want).max())
    print(f"VAE {kind} decoder: max abs err {err:.3g}, output max {np.abs(want).max():.3g}")
    assert want.shape == (1, 3, 17, 32, 32)  # 3 latents -> 1 + 8 * 2 frames
    assert np.abs(want).max() > 0.3 and err <= TOL


@pytest.mark.parity
def test_light_decoder_alone_matches_jax_and_is_causal():
    cfg = dataclasses.replace(TINY.light_decoder, channels=(16, 8, 8))
    model = random_weights(nnx.eval_shape(lambda: LightDecoder(cfg, rngs=nnx.Rngs(0))), 7)
    mirror = to_mirror(model)
    assert isinstance(mirror, TorchLightDecoder)
    z = np.random.default_rng(2).standard_normal((2, 16, 2, 3, 5)).astype(np.float32)
    with torch.no_grad():
        want = mirror(torch.from_numpy(z)).numpy()
        first = mirror(torch.from_numpy(z[:, :, :1])).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(z)))
    assert want.shape == (2, 3, 9, 24, 40)
    assert float(np.abs(got - want).max()) <= TOL
    # causal in time: the first latent decodes to one frame, unchanged by later latents
    assert first.shape == (2, 3, 1, 24, 40) and float(np.abs(first - want[:, :, :1]).max()) <= TOL


# ---- conversion -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["native", "light"])
def test_round_trip_is_bit_identical(pairs, kind):
    model, mirror = pairs[kind]
    back = from_mirror(mirror, lambda: CausalVideoVAE(TINY, decoder=kind, rngs=nnx.Rngs(0)))
    a, b = param_arrays(model), param_arrays(back)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_wrong_decoder_kind_is_rejected(pairs):
    from neodragon_jax.convert.keymap import CheckpointMismatchError

    _, light_mirror = pairs["light"]
    with pytest.raises(CheckpointMismatchError, match="decoder.blocks"):
        from_mirror(light_mirror, lambda: CausalVideoVAE(TINY, decoder="native", rngs=nnx.Rngs(0)))


@pytest.mark.parity
def test_affine_only_norm_without_temporal_compression_matches_jax():
    """``norm_groups=0`` (per-channel affine, no statistics) and no temporal down-sampling: the demo's VAE."""
    causal = dataclasses.replace(TINY.causal, block_out_channels=(8, 16, 16), spatial_down=(True, True, True),
                                 temporal_down=(False, False, False), norm_groups=0)
    cfg = dataclasses.replace(TINY, causal=causal, decoder="native")
    model, mirror = make_pair("native", seed=5, cfg=cfg)
    assert "encoder.down_blocks.0.resnets.0.norm1.weight" in mirror.state_dict()
    video = _video(frames=5)
    got = np.asarray(nnx.jit(lambda m, v: m.decode(m.encode(v).mean))(model, jnp.asarray(video)))
    with torch.no_grad():
        mean, _ = mirror.encode(torch.from_numpy(video))
        want = mirror.decode(mean).numpy()
    assert mean.shape[2] == 5 and want.shape == video.shape
    err = float(np.abs(got - want).max())
    print(f"affine-only VAE round trip: max abs err {err:.3g}, output max {np.abs(want).max():.3g}")
    assert np.abs(want).max() > 0.3 and err <= TOL
