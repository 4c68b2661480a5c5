"""``decoder``: asymmetric decoder distillation (spec §5.2), Neodragon's second technique.

The VAE's encoder (+ ``quant_conv``) is a frozen role taken from a trained VAE (by default the shipped
``tiny-teacher`` release's ``causal_video_vae/``); a new decoder (+ ``post_quant_conv``) is trained end to end
to reconstruct real videos from that encoder's latents. The latent space does not move, so the MMDiT trained
on it needs no retraining. ``neodragon train decoder --config tiny-teacher-decoder`` (the tiny teacher with a
light decoder whose flags undo its 4x / 1x VAE and whose size keeps the spec's ~20x ratio).

At full size the stage runs pure data parallelism (``mesh.rules=dp``; ``neodragon plan --stage decoder``
defaults to it): one 49x320x512 video per device takes 20.5 GiB (see README "Decoder distillation").

Roles:

* ``encoder`` (frozen, :class:`~neodragon_jax.models.vae.VAEEncoderPart`), from ``stages.decoder.vae``:
  ``release:NAME`` (a shipped release; default ``release:tiny-teacher``), ``official:PATH`` (an official
  ``causal_video_vae`` folder or file, or a whole official folder) or ``random`` (tests);
* ``decoder`` (trained, :class:`~neodragon_jax.models.vae.VAEDecoderPart`): ``stages.decoder.family`` picks
  ``light`` (default; the TAEHV-style decoder of ``model.vae.light_decoder``, whose ``spatial_upscale`` /
  ``temporal_upscale`` flags must undo the encoder's factors) or ``native`` (the Pyramid Flow decoder of
  ``model.vae.causal``: the baseline, trained by the same stage). ``stages.decoder.decoder_init``: ``random``
  (default), ``vae`` (the source VAE's own decoder: fine-tune it; strict, so the source must have this
  family's decoder) or any weight source. A randomly initialised ``post_quant_conv`` starts as the identity
  (the official N(0, 0.02) init would shrink the latents 30x before a freshly initialised decoder);
* ``lpips`` (frozen, only when ``stages.decoder.lpips`` names a converted ``.npz``,
  ``neodragon convert lpips``): the LPIPS VGG16 network;
* ``discriminator`` (trained, only when ``stages.decoder.gan_weight > 0``): a per-frame hinge PatchGAN,
  updated before the decoder within each step.

Loss of the decoder (fp32), on clips ``x`` in [-1, 1] and ``x_hat = decoder(renorm(z))`` with ``z`` the
encoder's posterior sample (``sample_posterior``; else its mean):

    mse_weight * MSE + chroma_weight * MSE(chroma) + perceptual_weight * (1 - SSIM or MS-SSIM)
    + lpips_weight * LPIPS + gan_weight * (-mean D(x_hat))

The chroma term compares the chroma (RGB minus its per-pixel channel mean, as the VAE stage's). Its plain
mean over pixels barely sees a small object's colour on a grey, black or white backdrop (the tiny domain's
objects cover about a tenth of a frame): a narrow decoder trained on it reaches 27 dB while turning red into
orange and violet into grey-blue. ``chroma_relative`` (default) divides the summed squared chroma error by the
batch's summed target chroma energy, so the term is the relative colour error of whatever is coloured.

SSIM is dm-pix's (``dm_pix.ssim``: Gaussian window 11, sigma 1.5, on [0, 1] frames); MS-SSIM multiplies
dm-pix's contrast-structure term at ``ms_ssim_scales - 1`` scales (2x2 mean pooling between them) with its
full SSIM at the coarsest, with the standard weights of the first scales renormalised (``perceptual =
"ms_ssim"``; 32x32 frames allow 3 scales). The discriminator's loss is the hinge
``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))``.

Latent normalisation (spec §5.1): the DiT's latents were normalised with ``(z - shift) * scale``, frame 0
with the image constants, later frames with the video ones, and the pipeline decodes
``z'/scale + shift`` with the config's ``model.vae.causal.video_scale`` (Neodragon's 0.3031). When the DiT
was trained with another video scale (Pyramid Flow's 1/3.0986 = 0.3227: ``stages.decoder.latent_video_scale
= 0.3227``) the decoder must decode what that mismatch gives it, so ``renorm`` normalises with that scale and
denormalises with the config's (frame 0 untouched); with ``latent_video_scale = 0`` (default) the two agree
and ``renorm`` is the identity.

Data: as the ``vae`` stage, whole clips at ``cfg.video``: ``data.path`` = a video folder (decoded once into
a memory-mapped cache), else synthetic-domain clips rendered on the fly. Metrics: ``mse``, ``ssim``,
``psnr`` (dB, clipped reconstruction), ``lpips`` / ``gan_g`` / ``ms_ssim`` when on, ``disc/...`` for the
discriminator's update. ``neodragon eval decoder --run DIR`` measures a finished run against the native
decoder (``train.decoder_eval``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.layers.core import as_dtype
from neodragon_jax.models.vae import VAEDecoderPart, VAEEncoderPart
from neodragon_jax.models.vae.normalize import denormalize_latents, normalize_latents
from train.roles import Frozen, RoleStage, Trained, Update
from train.vae import chroma

FAMILIES = ("light", "native")
PERCEPTUAL = ("ssim", "ms_ssim", "none")
#: Wang et al. 2003 MS-SSIM weights (5 scales); fewer scales use the first ones, renormalised.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# k1 of dm-pix's SSIM that makes its luminance factor 1 to ~1e-8 for [0, 1] frames: the contrast-structure term.
_CS_K1 = 1e4


# ---------------------------------------------------------------------------------------------- metrics
def frames01(video: jax.Array) -> jax.Array:
    """``[B, 3, F, H, W]`` in [-1, 1] -> frames ``[B * F, H, W, 3]`` in [0, 1] (float32)."""
    b, c, f, h, w = video.shape
    return (jnp.transpose(video.astype(jnp.float32), (0, 2, 3, 4, 1)).reshape(b * f, h, w, c) + 1.0) * 0.5


def ssim_frames(a: jax.Array, b: jax.Array, *, filter_size: int = 11) -> jax.Array:
    """dm-pix SSIM of frames ``[N, H, W, 3]`` in [0, 1] -> ``[N]`` (window shrunk to small frames)."""
    import dm_pix

    size = min(filter_size, a.shape[-3], a.shape[-2])
    return dm_pix.ssim(a, b, max_val=1.0, filter_size=size)


def ms_ssim_frames(a: jax.Array, b: jax.Array, *, scales: int = 3, filter_size: int = 11) -> jax.Array:
    """Multi-scale SSIM of frames ``[N, H, W, 3]`` in [0, 1] -> ``[N]`` (dm-pix's SSIM maps; see the module
    docstring). Each scale halves the frames (2x2 mean), so ``H, W >= 2 ** (scales - 1)``."""
    import dm_pix

    if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise ValueError(f"ms_ssim_scales must be in 1..{len(MS_SSIM_WEIGHTS)}, got {scales}")
    if min(a.shape[-3], a.shape[-2]) < 2 ** (scales - 1):
        raise ValueError(f"{scales} MS-SSIM scales need frames of at least {2 ** (scales - 1)} pixels, got "
                         f"{a.shape[-3]}x{a.shape[-2]}")
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    out = jnp.ones(a.shape[:-3], jnp.float32)
    for i, w in enumerate(weights):
        size = min(filter_size, a.shape[-3], a.shape[-2])
        last = i == scales - 1
        v = dm_pix.ssim(a, b, max_val=1.0, filter_size=size, k1=0.01 if last else _CS_K1)
        out = out * jnp.maximum(v, 1e-6) ** float(w)
        if not last:
            n, h, wd, c = a.shape
            pool = lambda x: x[:, : h - h % 2, : wd - wd % 2].reshape(n, h // 2, 2, wd // 2, 2, c).mean((2, 4))  # noqa: E731
            a, b = pool(a), pool(b)
    return out


def psnr_videos(a: jax.Array, b: jax.Array) -> jax.Array:
    """PSNR (dB) per video ``[B, 3, F, H, W]`` in [-1, 1] (value range 2; capped at 100 dB)."""
    err = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)).reshape(a.shape[0], -1), axis=1)
    return jnp.minimum(10.0 * jnp.log10(4.0 / jnp.maximum(err, 1e-30)), 100.0)


def renormalise(z: jax.Array, causal, latent_video_scale: float) -> jax.Array:
    """Raw latents ``[B, L, T, h, w]`` as the pipeline hands them to the decoder after a DiT trained with
    ``latent_video_scale`` (``causal``: ``model.vae.causal``; 0 = its own ``video_scale``: the identity)."""
    c = causal
    if not latent_video_scale or latent_video_scale == c.video_scale:
        return z
    trained = dataclasses.replace(c, video_scale=float(latent_video_scale))
    return denormalize_latents(normalize_latents(z, trained), c)


# ---------------------------------------------------------------------------------------- discriminator
class PatchDiscriminator(nnx.Module):
    """Per-frame PatchGAN (pix2pix ``NLayerDiscriminator`` without norms): ``layers`` stride-2 4x4 convs
    (``channels * 2^i`` wide, capped at 8x), leaky ReLU 0.2, then a 3x3 conv to one logit per patch.
    ``__call__(frames [N, H, W, 3] in [-1, 1]) -> logits [N, H / 2^layers, W / 2^layers]``."""

    def __init__(self, channels: int = 32, layers: int = 3, *, rngs: nnx.Rngs):
        convs, cin = [], 3
        for i in range(layers):
            cout = channels * min(2 ** i, 8)
            convs.append(nnx.Conv(cin, cout, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs))
            cin = cout
        self.convs = nnx.List(convs)
        self.out = nnx.Conv(cin, 1, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        for c in self.convs:
            h = nnx.leaky_relu(c(h), 0.2)
        return self.out(h)[..., 0]


# ----------------------------------------------------------------------------------------------- stage
@dataclasses.dataclass(frozen=True)
class DecoderSettings:
    """``cfg.stages.decoder`` (``--set stages.decoder.family=native``); see the module docstring."""

    vae: str = "release:tiny-teacher"  # the frozen encoder's source: release:NAME, official:PATH or random
    family: str = "light"              # the trained decoder: light (TAEHV-style) or native (the baseline)
    decoder_init: str = "random"       # random, vae (the source's own decoder) or a weight source
    mse_weight: float = 1.0
    chroma_weight: float = 0.0         # weight of the chroma term (RGB minus its per-pixel channel mean)
    chroma_relative: bool = True       # the chroma error relative to the target's chroma energy (else its mean)
    perceptual: str = "ssim"           # ssim, ms_ssim (dm-pix) or none
    perceptual_weight: float = 0.2
    ms_ssim_scales: int = 3
    lpips: str = ""                    # converted LPIPS .npz (neodragon convert lpips); empty: no LPIPS term
    lpips_weight: float = 1.0
    gan_weight: float = 0.0            # hinge PatchGAN term; 0 = off
    disc_channels: int = 32
    disc_layers: int = 3
    disc_lr: float = 0.0               # 0 = optim.lr
    sample_posterior: bool = True      # decode posterior samples (what the DiT learned) rather than means
    latent_video_scale: float = 0.0    # the video scale the DiT's latents were normalised with; 0 = the config's


def resolve_vae_source(spec: str) -> str:
    """``release:NAME`` -> ``official:<its folder>`` (its files checked against its record); other weight
    sources as they are. A missing release is one line naming what to do instead."""
    spec = str(spec).strip()
    if spec.startswith("official:"):
        # Checked here, before any compiling: the engine would only read it after building the models.
        if not Path(spec[len("official:"):]).exists():
            raise ValueError(f"stages.decoder.vae={spec!r}: no such file or folder (an official causal_video_vae "
                             f"folder or .safetensors file, or a whole official folder holding one)")
        return spec
    if not spec.startswith("release:"):
        return spec
    from neodragon_jax.releases import ReleaseError, get_release

    name = spec[len("release:"):]
    try:
        release = get_release(name)
        release.verify()
    except ReleaseError as e:
        raise ValueError(f"stages.decoder.vae={spec!r}: {e}. Point it at a trained VAE instead "
                         f"(official:DIR with a causal_video_vae/ folder), or random for a smoke run") from None
    return f"official:{release.folder}"


NORMALISATION_FIELDS = ("image_shift", "image_scale", "video_shift", "video_scale")


def source_vae_config(spec: str):
    """The ``model.vae.causal`` config a weight source's folder states in our ``config.json`` entry, or None
    when it states none (random, a bare .safetensors file, a run, an official folder)."""
    from neodragon_jax.config.schema import CausalVAEConfig
    from neodragon_jax.pipelines.official import OURS, VAE_FOLDER, _from_plain

    if not spec.startswith("official:"):
        return None
    path = Path(spec[len("official:"):])
    for cand in (path / VAE_FOLDER / "config.json", path / "config.json", path.parent / "config.json"):
        if cand.is_file():
            j = json.loads(cand.read_text())
            # The official config.json does not state the normalisation (the pipeline's constants do): only
            # the folders we write carry it.
            if OURS in j and "vae" in j[OURS]:
                return _from_plain(CausalVAEConfig, j[OURS]["vae"]["causal"])
            return None
    return None


def check_latent_normalisation(encoder_init: str, causal, given: str) -> None:
    """Refuse a config whose latent shift / scale differ from the ones the encoder's folder states: the DiT's
    latents were normalised with the folder's constants, so a decoder trained with others decodes something
    else (silently: every number would still look plausible)."""
    stated = source_vae_config(encoder_init)
    if stated is None:
        return
    wrong = [(f, getattr(causal, f), getattr(stated, f)) for f in NORMALISATION_FIELDS
             if getattr(stated, f) is not None and not np.isclose(getattr(causal, f), getattr(stated, f), rtol=1e-9)]
    if wrong:
        said = "; ".join(f"{f} is {a!r} in the config, {b!r} in the VAE's config.json" for f, a, b in wrong)
        sets = " ".join(f"--set model.vae.causal.{f}={b!r}" for f, _, b in wrong)
        raise ValueError(f"stages.decoder.vae={given!r}: the latent normalisation differs from the encoder's ({said}); "
                         f"the DiT's latents use the VAE's own constants: {sets}")


class DecoderStage(RoleStage):
    name = "decoder"
    settings_class = DecoderSettings

    def __init__(self, cfg: Config, *, cache_dir: str | os.PathLike | None = None, progress: bool = True, **kw):
        s = dataclasses.replace(cfg.stages.get_settings(self.name), **kw)
        if s.family not in FAMILIES:
            raise ValueError(f"stages.decoder.family must be one of {', '.join(FAMILIES)}, got {s.family!r}")
        if s.perceptual not in PERCEPTUAL:
            raise ValueError(f"stages.decoder.perceptual must be one of {', '.join(PERCEPTUAL)}, got {s.perceptual!r}")
        if min(s.mse_weight, s.chroma_weight, s.perceptual_weight, s.lpips_weight, s.gan_weight) < 0:
            raise ValueError("stages.decoder loss weights must be >= 0")
        self.settings = s
        v, c = cfg.video, cfg.model.vae.causal
        self.causal = c
        if v.height % c.spatial_factor or v.width % c.spatial_factor or (v.num_frames - 1) % c.temporal_factor:
            raise ValueError(f"video {v.num_frames}x{v.height}x{v.width} does not fit the VAE: frames must be 1 + "
                             f"{c.temporal_factor}k and the sides multiples of {c.spatial_factor}")
        if s.family == "light":
            from neodragon_jax.models.vae.parts import check_light_factors

            check_light_factors(cfg.model.vae)
        if s.perceptual == "ms_ssim":
            if not 1 <= s.ms_ssim_scales <= len(MS_SSIM_WEIGHTS):
                raise ValueError(f"stages.decoder.ms_ssim_scales must be in 1..{len(MS_SSIM_WEIGHTS)}")
            if min(v.height, v.width) < 2 ** (s.ms_ssim_scales - 1):
                raise ValueError(f"stages.decoder.ms_ssim_scales={s.ms_ssim_scales} needs frames of at least "
                                 f"{2 ** (s.ms_ssim_scales - 1)} pixels")
        self.encoder_init = resolve_vae_source(s.vae)
        check_latent_normalisation(self.encoder_init, c, s.vae)
        self.decoder_init = self.encoder_init if s.decoder_init == "vae" else s.decoder_init
        self.lpips_widths = None
        if s.lpips:
            from neodragon_jax.eval.lpips import lpips_widths

            try:
                self.lpips_widths = lpips_widths(s.lpips)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"stages.decoder.lpips: {e}") from None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(cfg.train.output_dir) / "clip_cache"
        self.progress = progress
        self._clips = None
        self._lock = threading.Lock()

    # -- roles ---------------------------------------------------------------------------------------------
    def _kw(self, cfg: Config) -> dict:
        return dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))

    def build_encoder(self, cfg: Config, rngs: nnx.Rngs) -> VAEEncoderPart:
        return VAEEncoderPart(cfg.model.vae, rngs=rngs, **self._kw(cfg))

    def build_decoder(self, cfg: Config, rngs: nnx.Rngs) -> VAEDecoderPart:
        dec = VAEDecoderPart(cfg.model.vae, decoder=self.settings.family, rngs=rngs, **self._kw(cfg))
        if self.settings.family == "native":
            # The official N(0, 0.02) kernels starve a decoder trained from scratch (train/vae.py): fan-in.
            init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            key = rngs.params()
            for i, (path, var) in enumerate(nnx.iter_graph(dec.decoder)):
                if isinstance(var, nnx.Param) and path and path[-1] == "kernel":
                    var[...] = init(jax.random.fold_in(key, i), var.shape, var.dtype)
        k = dec.post_quant_conv.conv.kernel
        n = k.shape[-1]
        k[...] = jnp.eye(n, dtype=k.dtype).reshape(k.shape)  # [1, 1, 1, L, L]: the identity
        return dec

    def build_lpips(self, cfg: Config, rngs: nnx.Rngs):
        from neodragon_jax.eval.lpips import LPIPS

        return LPIPS(self.lpips_widths, rngs=rngs)

    def build_discriminator(self, cfg: Config, rngs: nnx.Rngs) -> PatchDiscriminator:
        return PatchDiscriminator(self.settings.disc_channels, self.settings.disc_layers, rngs=rngs)

    def roles(self, cfg: Config):
        s = self.settings
        roles = {"encoder": Frozen(self.build_encoder, init=self.encoder_init),
                 "decoder": Trained(self.build_decoder, init=self.decoder_init)}
        if s.lpips:
            roles["lpips"] = Frozen(self.build_lpips, init=f"npz:{s.lpips}")
        if s.gan_weight > 0:
            roles["discriminator"] = Trained(self.build_discriminator, optim={"lr": s.disc_lr} if s.disc_lr else None,
                                             ema=0.0)
        return roles

    def updates(self, cfg: Config):
        ups = [Update(("decoder",), self.decoder_loss, name="decoder")]
        if self.settings.gan_weight > 0:
            ups.insert(0, Update(("discriminator",), self.discriminator_loss, name="disc"))
        return ups

    # -- losses --------------------------------------------------------------------------------------------
    def latents(self, m, video: jax.Array, rng: jax.Array) -> jax.Array:
        """The frozen encoder's latents of ``video`` as the decoder receives them (a constant of the step)."""
        post = m.encoder.encode(video)
        z = post.sample(rng) if self.settings.sample_posterior else post.mean
        return jax.lax.stop_gradient(renormalise(z, self.causal, self.settings.latent_video_scale))

    def reconstruct(self, m, video: jax.Array, rng: jax.Array) -> jax.Array:
        return m.decoder.decode(self.latents(m, video, rng)).astype(jnp.float32)

    def loss_terms(self, m, x: jax.Array, rec: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The decoder's reconstruction loss and its metrics for clips ``x`` and reconstructions ``rec``."""
        s = self.settings
        mse = jnp.mean(jnp.square(rec - x))
        a, b = frames01(rec), frames01(x)
        ssim = jnp.mean(ssim_frames(a, b))
        total = s.mse_weight * mse
        metrics = {"mse": mse, "ssim": ssim, "psnr": jnp.mean(psnr_videos(jnp.clip(rec, -1.0, 1.0), x))}
        if s.chroma_weight > 0:
            err, target = jnp.square(chroma(rec) - chroma(x)), jnp.square(chroma(x))
            metrics["chroma_mse"] = jnp.mean(err)
            metrics["chroma_rel"] = jnp.sum(err) / (jnp.sum(target) + 1e-6)
            total = total + s.chroma_weight * metrics["chroma_rel" if s.chroma_relative else "chroma_mse"]
        if s.perceptual == "ssim":
            total = total + s.perceptual_weight * (1.0 - ssim)
        elif s.perceptual == "ms_ssim":
            ms = jnp.mean(ms_ssim_frames(a, b, scales=s.ms_ssim_scales))
            metrics["ms_ssim"] = ms
            total = total + s.perceptual_weight * (1.0 - ms)
        if s.lpips:
            d = jnp.mean(m.lpips(a * 2.0 - 1.0, b * 2.0 - 1.0))
            metrics["lpips"] = d
            total = total + s.lpips_weight * d
        return total, metrics

    def decoder_loss(self, m, batch, rng):
        x = batch["video"].astype(jnp.float32)
        rec = self.reconstruct(m, x, rng)
        total, metrics = self.loss_terms(m, x, rec)
        if self.settings.gan_weight > 0:
            g = -jnp.mean(m.discriminator(frames01(rec) * 2.0 - 1.0))
            metrics["gan_g"] = g
            total = total + self.settings.gan_weight * g
        return total, jax.lax.stop_gradient(metrics)

    def loss(self, trainable, frozen, batch, rng):
        """The decoder's loss over the roles (the ``Stage`` contract; the step runs :meth:`updates`)."""
        from train.roles import Models

        return self.decoder_loss(Models({**trainable, **frozen}), batch, rng)

    def discriminator_loss(self, m, batch, rng):
        x = batch["video"].astype(jnp.float32)
        fake = jax.lax.stop_gradient(self.reconstruct(m, x, rng))
        real_logits = m.discriminator(frames01(x) * 2.0 - 1.0)
        fake_logits = m.discriminator(frames01(fake) * 2.0 - 1.0)
        loss = jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
        return loss, jax.lax.stop_gradient({"real": jnp.mean(real_logits), "fake": jnp.mean(fake_logits)})

    # -- data (the vae stage's clip sources) -----------------------------------------------------------------
    def example_batch(self, cfg: Config, global_batch: int):
        v = cfg.video
        return {"video": jax.ShapeDtypeStruct((global_batch, 3, v.num_frames, v.height, v.width), jnp.float32)}

    def batch_logical_axes(self, cfg: Config):
        return {"video": ("batch", None, None, None, None)}

    def clips(self, cfg: Config):
        from train.vae import ClipCache, RenderedClips

        with self._lock:
            if self._clips is None:
                if cfg.data.source != "synthetic":
                    raise ValueError("the decoder stage reads videos itself: leave data.source='synthetic' and point "
                                     "data.path at a video folder, or leave data.path empty for rendered clips")
                self._clips = (ClipCache(cfg.data.path, cfg, self.cache_dir, progress=self.progress)
                               if cfg.data.path else RenderedClips(cfg))
            return self._clips

    def num_examples(self, cfg: Config) -> int:
        return len(self.clips(cfg))

    def data_description(self, cfg: Config) -> str:
        return f"video folder {cfg.data.path}" if cfg.data.path else "rendered synthetic clips"

    def make_example(self, cfg: Config, index: int) -> dict[str, np.ndarray]:
        from train.vae import to_model_video

        clips = self.clips(cfg)
        return {"video": to_model_video(clips[int(index) % len(clips)])}


__all__ = ["DecoderSettings", "DecoderStage", "PatchDiscriminator", "frames01", "ms_ssim_frames", "psnr_videos",
           "renormalise", "resolve_vae_source", "ssim_frames"]
