"""The `decoder` stage (asymmetric decoder distillation): loss terms on known inputs, the spec §5.1 latent
renormalisation, roles and update order (PatchGAN on and off), refused settings, and one short run on a small
random VAE written in the official layout: the reconstruction error falls, the frozen encoder keeps exactly
the file's weights and never reaches a checkpoint, and an interrupted run resumes bit-exactly."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.convert.io import write_safetensors
from neodragon_jax.convert.vae import pf_vae_keymap
from neodragon_jax.models.build import init_jit
from neodragon_jax.models.vae import DiagonalGaussian
from neodragon_jax.sharding import activate, make_mesh
from train.checkpoint import Checkpointer, flat_shapes
from train.data import DataIterator, make_source, to_global
from train.decoder import DecoderStage, ms_ssim_frames, renormalise, ssim_frames
from train.loop import checkpoint_dir, run
from train.roles import plan_roles
from train.state import build_setup
from train.step import batch_sharding_tree, jit_train_step
from train.vae import VAEStage
from train.weights import flatten

# The tiny teacher's VAE layout (4x spatial, no temporal compression, light decoder 4x / 1x) at test size.
SMALL = ["model.vae.causal.latent_channels=4", "model.vae.causal.block_out_channels=[8,8]",
         "model.vae.causal.spatial_down=[true,true]", "model.vae.causal.temporal_down=[false,false]",
         "model.vae.causal.norm_groups=0", 'model.vae.decoder="native"', "model.vae.light_decoder.latent_channels=4",
         "model.vae.light_decoder.channels=[8,8]", "model.vae.light_decoder.blocks_per_stage=1",
         "model.vae.light_decoder.spatial_upscale=[true,true]",
         "model.vae.light_decoder.temporal_upscale=[false,false]",
         "video.height=16", "video.width=16", "video.num_frames=3"]


def _cfg(tmp_path, *extra):
    return load_config("tiny", SMALL + [
        "train.stage=decoder", "train.steps=6", "train.global_batch=8", "train.log_every=1", "train.peak_flops=1e9",
        "train.tensorboard=false", "checkpoint.every_steps=3", "checkpoint.keep_latest=5", "data.num_synthetic=8",
        "optim.lr=3e-3", "optim.warmup_steps=0", f'train.output_dir="{tmp_path}"', 'stages.decoder.vae="random"',
        *extra])


def test_loss_terms_on_known_inputs(tmp_path):
    stage = DecoderStage(_cfg(tmp_path))
    x = jax.random.uniform(jax.random.key(0), (2, 3, 3, 16, 16), minval=-0.8, maxval=0.8)
    total, m = stage.loss_terms(None, x, x)
    assert float(total) == pytest.approx(0.0, abs=1e-6) and float(m["ssim"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["psnr"]) == pytest.approx(100.0)
    total, m = stage.loss_terms(None, x, x + 0.1)  # MSE 0.01 on a value range of 2: 10 log10(4 / 0.01) dB
    assert float(m["mse"]) == pytest.approx(0.01, rel=1e-4)
    assert float(m["psnr"]) == pytest.approx(10 * np.log10(400.0), abs=1e-3)
    assert float(total) == pytest.approx(0.01 + 0.2 * (1 - float(m["ssim"])), rel=1e-5)

    # dm-pix SSIM and the MS-SSIM built on it: 1 for equal frames, symmetric, falling with the noise.
    a = (x.transpose(0, 2, 3, 4, 1).reshape(6, 16, 16, 3) + 1) / 2
    noisy = [jnp.clip(a + s * jax.random.normal(jax.random.key(1), a.shape), 0, 1) for s in (0.02, 0.1, 0.4)]
    for fn in (ssim_frames, lambda p, q: ms_ssim_frames(p, q, scales=3)):
        assert np.allclose(fn(a, a), 1.0, atol=1e-5)
        s = [float(jnp.mean(fn(n, a))) for n in noisy]
        assert s[0] > s[1] > s[2] and s[0] < 1.0
        assert float(jnp.mean(fn(noisy[1], a))) == pytest.approx(float(jnp.mean(fn(a, noisy[1]))), abs=1e-5)
    with pytest.raises(ValueError, match="at least 16 pixels"):
        ms_ssim_frames(a[:, :8, :8], a[:, :8, :8], scales=5)

    # The chroma term sees a colour error (red channel only: chroma error (2/3, -1/3, -1/3) * 0.1) and not a
    # grey one (every channel the same).
    chroma_stage = DecoderStage(_cfg(tmp_path, "stages.decoder.chroma_weight=2.0", 'stages.decoder.perceptual="none"',
                                     "stages.decoder.chroma_relative=false"))
    _, m = chroma_stage.loss_terms(None, x, x + 0.1)
    assert float(m["chroma_mse"]) == pytest.approx(0.0, abs=1e-10)
    red = x.at[:, 0].add(0.1)
    total, m = chroma_stage.loss_terms(None, x, red)
    want = 0.01 * (4 / 9 + 1 / 9 + 1 / 9) / 3
    assert float(m["chroma_mse"]) == pytest.approx(want, rel=1e-4)
    assert float(total) == pytest.approx(0.01 / 3 + 2.0 * want, rel=1e-4)
    assert "chroma_mse" not in stage.loss_terms(None, x, red)[1]  # off by default
    # Relative (the default): the same error over the target's chroma energy, whatever the object's size.
    rel_stage = DecoderStage(_cfg(tmp_path, "stages.decoder.chroma_weight=2.0", 'stages.decoder.perceptual="none"'))
    total, m = rel_stage.loss_terms(None, x, red)
    energy = float(jnp.mean(jnp.square(x - jnp.mean(x, axis=1, keepdims=True))))
    assert float(m["chroma_rel"]) == pytest.approx(want / energy, rel=1e-3)
    assert float(total) == pytest.approx(0.01 / 3 + 2.0 * want / energy, rel=1e-3)


def test_latent_renormalisation_follows_spec_5_1(tmp_path):
    # The DiT normalised later frames with Pyramid Flow's 1/3.0986 = 0.3227; the pipeline decodes with the
    # config's 0.3031: frame 0 (image constants) is untouched, later frames come back scaled about the shift.
    cfg = _cfg(tmp_path, "model.vae.causal.video_scale=0.3031", "model.vae.causal.video_shift=-0.2343")
    c = cfg.model.vae.causal
    z = jax.random.normal(jax.random.key(0), (1, 4, 3, 2, 2))
    np.testing.assert_array_equal(np.asarray(renormalise(z, c, 0.0)), np.asarray(z))
    got = np.asarray(renormalise(z, c, 0.3227))
    np.testing.assert_allclose(got[:, :, 0], np.asarray(z)[:, :, 0], atol=1e-6)
    want = (np.asarray(z)[:, :, 1:] + 0.2343) * 0.3227 / 0.3031 - 0.2343
    np.testing.assert_allclose(got[:, :, 1:], want, rtol=1e-5, atol=1e-6)


def test_gan_terms_and_update_order_on_known_logits(tmp_path):
    cfg = _cfg(tmp_path, "stages.decoder.gan_weight=0.5", "stages.decoder.perceptual=\"none\"")
    stage = DecoderStage(cfg)
    plan = plan_roles(stage, cfg)
    assert plan.trained == ["decoder", "discriminator"] and plan.frozen == ["encoder"]
    assert [u.label for u in plan.updates] == ["disc", "decoder"]
    assert [u.label for u in plan_roles(DecoderStage(_cfg(tmp_path)), _cfg(tmp_path)).updates] == ["decoder"]

    x = jnp.zeros((1, 3, 3, 16, 16))
    z = jnp.zeros((1, 4, 3, 4, 4))
    fake = SimpleNamespace(
        encoder=SimpleNamespace(encode=lambda v: DiagonalGaussian(z, jnp.full(z.shape, -30.0))),
        decoder=SimpleNamespace(decode=lambda lat: jnp.full((1, 3, 3, 16, 16), 0.1)),
        discriminator=lambda f: jnp.where(jnp.mean(f) > 0.05, -2.0, 0.5) * jnp.ones((f.shape[0], 2, 2)),
    )
    # Real frames (0) get logit 0.5, fakes (0.1) -2: hinge relu(1 - 0.5) + relu(1 - 2) = 0.5.
    loss, m = stage.discriminator_loss(fake, {"video": x}, jax.random.key(0))
    assert float(loss) == pytest.approx(0.5) and float(m["real"]) == pytest.approx(0.5)
    loss, m = stage.decoder_loss(fake, {"video": x}, jax.random.key(0))  # MSE 0.01 + 0.5 * -(mean D(fake))
    assert float(m["gan_g"]) == pytest.approx(2.0) and float(loss) == pytest.approx(0.01 + 1.0, rel=1e-5)


def test_bad_settings_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="family must be one of light, native"):
        DecoderStage(_cfg(tmp_path, 'stages.decoder.family="tiny"'))
    with pytest.raises(ValueError, match=r"no release named 'nope'.*official:DIR"):
        DecoderStage(_cfg(tmp_path, 'stages.decoder.vae="release:nope"'))
    with pytest.raises(ValueError, match=r"vae='official:/nowhere/vae': no such file or folder"):
        DecoderStage(_cfg(tmp_path, 'stages.decoder.vae="official:/nowhere/vae"'))
    with pytest.raises(ValueError, match="up-samples 2x in space and 1x in time but the encoder compresses 4x"):
        DecoderStage(_cfg(tmp_path, "model.vae.light_decoder.spatial_upscale=[false,true]"))
    with pytest.raises(ValueError, match="stages.decoder.lpips: .*no such file"):
        DecoderStage(_cfg(tmp_path, f'stages.decoder.lpips="{tmp_path / "missing.npz"}"'))


def _official_vae(folder, cfg) -> dict:
    """A random VAE with informative latents (the vae stage's fan-in init, near-deterministic posterior)
    written as an official causal_video_vae folder; returns its parameters by dotted name."""
    vae = init_jit(lambda: VAEStage(cfg)._vae(cfg, nnx.Rngs(5)))
    flat = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(vae, nnx.Param))).items()}
    (folder / "causal_video_vae").mkdir(parents=True)
    write_safetensors(pf_vae_keymap(cfg.model.vae).to_torch(flat),
                      folder / "causal_video_vae" / "diffusion_pytorch_model.safetensors")
    return flat


def test_short_run_lowers_error_keeps_the_encoder_and_resumes_bit_exact(tmp_path):
    base = _cfg(tmp_path / "x")
    flat = _official_vae(tmp_path / "vae", base)
    src = [f'stages.decoder.vae="official:{tmp_path / "vae"}"']

    # Six steps by hand with the engine's pieces (the loop's data, step and shardings).
    cfg = _cfg(tmp_path / "full", *src)
    stage = DecoderStage(cfg)
    mesh = make_mesh(cfg.mesh)
    setup = build_setup(stage, cfg, mesh)
    assert set(setup.trainable) == {"decoder"} and set(setup.frozen) == {"encoder"}
    state, frozen = setup.init_state(), setup.init_frozen()
    _, batch_sh = batch_sharding_tree(setup)
    data = DataIterator(make_source(stage, cfg), ["video"], 8, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    losses = []
    with activate(mesh, setup.rules):
        step = jit_train_step(setup)
        for _ in range(6):
            state, metrics = step(state, frozen, to_global(next(data), batch_sh, 8))
            losses.append(float(metrics["mse"]))
    data.close()
    # Every batch holds all 8 clips: the reconstruction error falls step after step.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.98 * losses[0], losses

    # The frozen encoder is exactly the file's encoder (+ quant_conv), still, after the steps.
    enc = {k: np.asarray(v) for k, v in flatten(jax.device_get(frozen["encoder"]["params"])).items()}
    assert set(enc) == {k for k in flat if k.startswith(("encoder.", "quant_conv."))}
    for k, v in enc.items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)

    # The loop, interrupted after 3 steps and resumed, lands on the same state; no encoder in checkpoints.
    split = _cfg(tmp_path / "split", *src)
    first = run(split, console=False, stop_after=3)
    second = run(split, console=False, keep_state=True)
    assert first.end_step == 3 and second.resumed_from == 3 and second.end_step == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(second.state))
    ck = Checkpointer(checkpoint_dir(split), split.checkpoint, read_only=True)
    meta = ck.manager.item_metadata(6)["state"]
    keys = flat_shapes(getattr(meta, "tree", meta))
    assert any(k.startswith("params/decoder/decoder/") for k in keys)
    assert not any(k.startswith(("params/encoder", "opt_state/encoder")) or "/encoder/" in k for k in keys)


def test_tiny_teacher_decoder_preset_fits_the_tiny_vae_and_is_20x_smaller(tmp_path):
    # The preset's light decoder undoes the tiny teacher's 4x / 1x VAE and keeps Neodragon's size ratio
    # (spec §5.2: 22.8x) at the tiny scale; built abstractly, the way the stage builds both families.
    from train.decoder import DecoderStage

    cfg = load_config("tiny-teacher-decoder", ['stages.decoder.vae="random"', f'train.output_dir="{tmp_path}"'])
    sizes = {}
    for family in ("light", "native"):
        c = load_config("tiny-teacher-decoder", ['stages.decoder.vae="random"', f'stages.decoder.family="{family}"',
                                                 f'train.output_dir="{tmp_path}"'])
        dec = nnx.eval_shape(lambda c=c: DecoderStage(c).build_decoder(c, nnx.Rngs(0)))
        sizes[family] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(dec, nnx.Param)))
    assert sizes["native"] >= 20 * sizes["light"], sizes
    enc = nnx.eval_shape(lambda: DecoderStage(cfg).build_encoder(cfg, nnx.Rngs(0)))
    dec = nnx.eval_shape(lambda: DecoderStage(cfg).build_decoder(cfg, nnx.Rngs(0)))
    v = cfg.video
    (ge, se), (gd, sd) = nnx.split(enc), nnx.split(dec)
    x = jax.ShapeDtypeStruct((1, 3, v.num_frames, v.height, v.width), jnp.float32)
    z = jax.eval_shape(lambda s, x: nnx.merge(ge, s).encode(x).mean, se, x)
    assert jax.eval_shape(lambda s, z: nnx.merge(gd, s).decode(z), sd, z).shape == x.shape


def test_plan_defaults_for_the_decoder_stage():
    # `neodragon plan --stage decoder` reads no weights (random encoder) and runs pure data parallelism
    # unless told otherwise; --set mesh.rules still wins.
    from neodragon_cli.train import plan_config

    cfg, shape = plan_config("tiny-teacher-decoder", [], "data=2,fsdp=4", "decoder", None)
    assert cfg.mesh.rules == "dp" and cfg.stages.get_settings("decoder").vae == "random"
    assert cfg.train.global_batch == 32 and shape["fsdp"] == 4
    cfg, _ = plan_config("tiny-teacher-decoder", ["mesh.rules=fsdp"], "data=2,fsdp=4", "decoder", None)
    assert cfg.mesh.rules == "fsdp"
    assert plan_config("tiny", [], "data=2,fsdp=4", "flow", None)[0].mesh.rules == "fsdp"
