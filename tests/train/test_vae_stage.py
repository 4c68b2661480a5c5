"""The `vae` training stage: loss decreases on a fixed batch, metrics, data sources and crops, latent
normalisation, clear errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.models.build import init_jit
from neodragon_jax.models.vae.normalize import normalize_latents
from train.stages import get_stage
from train.vae import ClipCache, VAEStage, _moments, latent_normalisation, psnr, reconstruct, ssim

# A 3-block VAE (still 8x spatial / 8x temporal) with 8 channels: compiles in seconds.
SMALL_VAE = ["model.vae.causal.block_out_channels=[8,8,8]", "model.vae.causal.spatial_down=[true,true,true]",
             "model.vae.causal.temporal_down=[true,true,true]", 'model.vae.decoder="native"']


def _cfg(tmp_path, *extra):
    return load_config("tiny", SMALL_VAE + [f'train.output_dir="{tmp_path / "run"}"', "data.num_synthetic=4",
                                            *extra])


def test_metrics_ssim_and_psnr():
    x = jax.random.uniform(jax.random.key(0), (2, 3, 2, 16, 16), minval=-1, maxval=1)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(psnr(x, x)) == pytest.approx(100.0)
    # A constant offset of 0.1 on a value range of 2: MSE 0.01 -> 10 log10(4 / 0.01) dB.
    assert float(psnr(x + 0.1, x)) == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-3)
    noisy = [x + s * jax.random.normal(jax.random.key(1), x.shape) for s in (0.05, 0.2, 0.8)]
    scores = [float(ssim(n, x)) for n in noisy]
    assert scores[0] > scores[1] > scores[2] and scores[0] < 1.0
    assert float(ssim(noisy[1], x)) == pytest.approx(float(ssim(x, noisy[1])), abs=1e-6)  # symmetric
    per = ssim(jnp.concatenate([x[:1], noisy[2][1:]]), x, reduce=False)
    assert per.shape == (2,) and float(per[0]) > 0.99 > float(per[1])


def test_registered_and_rendered_examples_are_deterministic_crops(tmp_path):
    cfg = _cfg(tmp_path)
    stage = get_stage("vae", cfg)
    assert isinstance(stage, VAEStage)
    assert stage.num_examples(cfg) == 4  # whole clips: one example per clip
    a, b = stage.make_example(cfg, 1)["video"], stage.make_example(cfg, 1)["video"]
    assert a.shape == (3, cfg.video.num_frames, 64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert -1.0 <= a.min() and a.max() <= 1.0

    crops = VAEStage(cfg, clip_frames=9, crop=16, crops_per_clip=3)
    assert crops.num_examples(cfg) == 12
    assert crops.example_batch(cfg, 2)["video"].shape == (2, 3, 9, 16, 16)
    ex = [crops.make_example(cfg, i)["video"] for i in (0, 4, 8)]  # three crops of clip 0
    assert all(e.shape == (3, 9, 16, 16) for e in ex)
    assert not np.array_equal(ex[0], ex[1]) or not np.array_equal(ex[1], ex[2])


@pytest.mark.parametrize("kw,message", [
    (dict(clip_frames=10), r"1 \+ 8k frames"),
    (dict(clip_frames=25), "longer than the clips"),
    (dict(crop=12), "multiple of the VAE's spatial factor"),
])
def test_bad_clip_geometry_is_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        VAEStage(_cfg(tmp_path), **kw)


def test_video_folder_is_decoded_once_and_bad_files_are_skipped(tmp_path):
    from neodragon_jax.data.synthetic import write_dataset

    folder = write_dataset(tmp_path / "data", n=3, seed=0, num_frames=17, progress=False)
    (folder / "videos" / "000001.mp4").write_bytes(b"not a video")
    cfg = _cfg(tmp_path, f'data.path="{folder}"')
    stage = VAEStage(cfg, clip_frames=9, crop=32, crops_per_clip=2, progress=False)
    assert stage.num_examples(cfg) == 4  # 2 readable clips x 2 crops
    cache = stage.clips(cfg)
    assert cache.meta["count"] == 2 and cache.meta["stats"]["data/videos_corrupt"] == 1
    assert stage.make_example(cfg, 3)["video"].shape == (3, 9, 32, 32)
    # A second stage (a resumed run) maps the same cache file instead of decoding again.
    again = ClipCache(folder, cfg, stage.cache_dir, progress=False)
    assert again.path == cache.path and len(again) == 2
    np.testing.assert_array_equal(again[1], cache[1])
    assert json.loads(cache.path.with_suffix(".json").read_text())["entries"] == 3


def test_processes_decoding_the_same_folder_at_once_leave_one_whole_cache(tmp_path):
    """Each host of a multi-process run builds the clip cache of a shared folder; concurrent writers replace
    both files atomically, so every reader maps a whole cache and no temporary file is left behind."""
    import subprocess
    import sys
    from pathlib import Path

    from neodragon_jax.config import to_json
    from neodragon_jax.data.synthetic import write_dataset

    folder = write_dataset(tmp_path / "data", n=4, seed=0, num_frames=9, progress=False)
    cfg = _cfg(tmp_path, f'data.path="{folder}"', "video.num_frames=9")
    (tmp_path / "cfg.json").write_text(to_json(cfg))
    cache_dir = tmp_path / "shared_cache"
    code = ("import sys; from neodragon_jax.config import from_json; from train.vae import ClipCache; "
            "from pathlib import Path; c = ClipCache(sys.argv[1], from_json(Path(sys.argv[2]).read_text()), "
            "sys.argv[3], progress=False); print(len(c))")
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(tmp_path / "cfg.json"), str(cache_dir)],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["4", "4", "4"]
    names = sorted(f.name for f in cache_dir.iterdir())
    assert len(names) == 2 and not any(n.startswith(".") for n in names), names
    cache = ClipCache(folder, cfg, cache_dir, progress=False)
    assert cache.meta["count"] == 4 and cache.clips.shape[0] == 4


def test_loss_decreases_on_a_fixed_batch_and_posterior_starts_near_deterministic(tmp_path):
    cfg = _cfg(tmp_path)
    stage = VAEStage(cfg, clip_frames=9, crop=16, crops_per_clip=2)
    batch = {"video": jnp.asarray(np.stack([stage.make_example(cfg, i)["video"] for i in range(2)]))}
    vae = init_jit(lambda: stage.build_trainable(cfg, nnx.Rngs(0))["vae"])
    # The logvar_init bias: the posterior starts nearly deterministic (log-variance = bias + ~0.03 terms).
    assert np.all(np.asarray(vae.quant_conv.conv.bias[...])[16:] == -16.0)

    opt = nnx.Optimizer(vae, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(vae, opt, key):
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: stage.loss({"vae": m}, {}, batch, key), has_aux=True)(vae)
        opt.update(vae, grads)
        return loss, metrics

    history = [step(vae, opt, jax.random.key(i)) for i in range(6)]
    losses = [float(loss) for loss, _ in history]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
    metrics = history[-1][1]
    assert set(metrics) == {"mse", "ssim", "kl", "chroma_mse", "psnr"}
    assert float(metrics["psnr"]) > float(history[0][1]["psnr"])


def test_chroma_term_weighs_only_colour_differences(tmp_path):
    """``stages.vae.chroma_weight``: the MSE of RGB minus its per-pixel channel mean, added to the loss."""
    from train.vae import chroma

    grey = jnp.broadcast_to(jnp.linspace(-1, 1, 16)[None, None, None, None], (1, 3, 1, 4, 16))
    assert float(jnp.abs(chroma(grey)).max()) < 1e-6  # a luminance error carries no chroma
    red = jnp.zeros((1, 3, 1, 2, 2)).at[:, 0].set(0.9)
    np.testing.assert_allclose(np.asarray(chroma(red)[0, :, 0, 0, 0]), [0.6, -0.3, -0.3], atol=1e-6)

    cfg = _cfg(tmp_path, "stages.vae.chroma_weight=2.5")
    stage = VAEStage(cfg, clip_frames=9, crop=16)
    batch = {"video": jnp.asarray(stage.make_example(cfg, 0)["video"])[None]}
    vae = init_jit(lambda: stage.build_trainable(cfg, nnx.Rngs(0))["vae"])
    total, m = stage.loss({"vae": vae}, {}, batch, jax.random.key(0))
    assert float(m["chroma_mse"]) > 0
    want = m["mse"] + 0.2 * (1 - m["ssim"]) + 1e-6 * m["kl"] + 2.5 * m["chroma_mse"]
    np.testing.assert_allclose(float(total), float(want), rtol=1e-5)


def test_latent_normalisation_gives_unit_latents(tmp_path):
    cfg = _cfg(tmp_path)
    stage = VAEStage(cfg, clip_frames=9, crop=32)
    vae = init_jit(lambda: stage.build_trainable(cfg, nnx.Rngs(0))["vae"])
    videos = np.stack([stage.make_example(cfg, i)["video"] for i in range(4)])
    norm = latent_normalisation(vae, videos, batch_size=2)
    assert set(norm) == {"image_shift", "image_scale", "video_shift", "video_scale"}
    causal = dataclasses.replace(cfg.model.vae.causal, **norm)
    graphdef, state = nnx.split(vae)
    z = normalize_latents(jnp.concatenate([_moments(graphdef, state, jnp.asarray(videos[i:i + 2]))
                                           for i in (0, 2)]), causal)
    for part in (z[:, :, :1], z[:, :, 1:]):
        assert float(jnp.mean(part)) == pytest.approx(0.0, abs=1e-3)
        assert float(jnp.std(part)) == pytest.approx(1.0, abs=1e-3)
    rec, p, s = reconstruct(vae, videos[:3], batch_size=2)  # a padded last batch
    assert rec.shape == videos[:3].shape and p.shape == s.shape == (3,)
    assert np.all(np.abs(rec) <= 1.0)


def test_inflated_init_keeps_the_first_frame_alive_and_blocks_start_as_identity(tmp_path):
    cfg = _cfg(tmp_path)
    videos = jax.random.uniform(jax.random.key(3), (4, 3, 17, 32, 32), minval=-1, maxval=1)

    def first_frame_sensitivity(**kw):
        vae = VAEStage(cfg, clip_frames=17, crop=32, **kw).build_trainable(cfg, nnx.Rngs(0))["vae"]
        z = np.asarray(vae.encode(videos).mean)  # [4, 16, 3, 4, 4]
        across = z.std(axis=0).mean(axis=(0, 2, 3))  # per latent frame: how much it depends on the video
        return vae, across[0] / across[1:].mean()

    vae, inflated = first_frame_sensitivity(kernel_init="inflated", zero_init_residual=True)
    _, lecun = first_frame_sensitivity(kernel_init="lecun", zero_init_residual=False)
    # A fan-in init spread over the 3 time taps shrinks the first frame (two zero padding frames in front)
    # by ~sqrt(3) per convolution; the inflated init treats every frame alike.
    assert inflated > 0.8 and lecun < 0.7, (inflated, lecun)  # measured: 1.05 and 0.59
    for path, var in nnx.iter_graph(vae):
        if isinstance(var, nnx.Param) and path and path[-1] == "kernel":
            if "conv2" in path or "to_out" in path:
                assert not np.any(np.asarray(var[...])), path  # residual branches start at zero
            elif var.ndim == 5 and var.shape[0] == 3:
                k = np.asarray(var[...])
                assert not np.any(k[:2]) and np.any(k[2]), path  # only the current-frame tap
    with pytest.raises(ValueError, match="kernel_init must be one of"):
        VAEStage(cfg, kernel_init="xavier")
