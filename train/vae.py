"""The ``vae`` training stage: reconstruction training of the causal video VAE (encoder + native decoder).

``neodragon train vae --config tiny`` (random init; ``train.init_checkpoint`` is not read: official VAE
weights are imported with ``neodragon_jax.convert.vae``). Models: trained ``{"vae": CausalVideoVAE(cfg.model.vae,
decoder="native")}``, frozen ``{}``.

Loss per batch of clips ``video [B, 3, f, h, w]`` in [-1, 1] (posterior sample ``z ~ q(z | video)`` with the
step's key, decoded back):

    mse_weight * MSE + ssim_weight * (1 - SSIM) + kl_weight * KL(q || N(0, I)) + chroma_weight * MSE(chroma)

with the MSE and KL as means over elements, SSIM per frame and channel (Gaussian window 11, sigma 1.5, the
usual Wang et al. constants for a value range of 2). Defaults: ``mse_weight=1``, ``ssim_weight=0.2``,
``kl_weight=1e-6``. Pyramid Flow trains its VAE with ``10 MSE + 1 LPIPS + 1e-12 KL`` (spec §5.1); LPIPS needs
pretrained VGG weights that cannot be fetched here, so SSIM is the structural term. The KL weight is a small
value rather than PF's 1e-12 so the posterior variances stay meaningful; the latent scale is not
constrained by it, which is why :func:`latent_normalisation` measures the shift / scale to normalise with.
Metrics: ``mse``, ``ssim``, ``kl``, ``psnr`` (dB, per clip on the clipped reconstruction, averaged).

Data (the stage's own example source, ``data.source = "synthetic"``):

* ``data.path`` = a video folder (``captions.jsonl`` + videos, read with
  :class:`~neodragon_jax.data.video_folder.VideoFolder` at ``cfg.video``): every readable clip is decoded once
  into a uint8 ``.npy`` cache (memory-mapped afterwards, so resumed runs start at once); unreadable clips are
  skipped and counted;
* ``data.path`` empty: clips of the synthetic domain rendered on the fly (``cfg.data.num_synthetic`` of them,
  deterministic by ``cfg.data.seed``).

Initialisation (from scratch; see :meth:`VAEStage.build_trainable`), instead of the official N(0, 0.02)
(``kernel_init="official"`` keeps those):

* ``kernel_init="lecun"`` (default): fan-in scaled (LeCun normal) kernels;
* ``kernel_init="inflated"``: every causal 3-D kernel starts as a per-frame 2-D convolution: its
  last time tap (the current frame) fan-in scaled over ``kh * kw * c_in``, the earlier taps zero. A fan-in
  init spread over the three taps (``"lecun"``) gives the first frame, which sees two zero padding frames at
  every layer, a third of the variance per convolution, and after ~20 of them its latent barely depends on
  the input (the first frame then decodes to one blob whatever the clip);
* ``zero_init_residual=True``: the second convolution of every ResNet block and the attention output
  projections start at zero, so every block starts as the identity and the network as the short stack of
  convolutions on its skip path;
* measured with the demo VAE on the demo data (batch 4, 17x32x32 crops): ``inflated`` + ``zero_init_residual``
  trains faster early (train MSE 0.100 against 0.126 at step 600, and the first frame follows the clip) but
  ends no better: 18.45 dB held-out PSNR after 1500 steps against 19.23 dB with ``lecun`` (one seed each),
  so ``lecun`` stays the default;
* the posterior log-variance bias at ``logvar_init`` (default -16): the posterior starts nearly deterministic.

Optional random crops (``clip_frames`` consecutive frames, ``crop x crop`` pixels): the VAE is convolutional
(its attention and group norms are per frame), so training on crops is much cheaper and transfers to whole
clips as long as a crop is not much smaller than a frame (32x32 crops of 64x64 frames transfer; 16x16 do
not: the per-frame statistics and the mid-block attention then see too little of the frame). With crops
each clip yields ``crops_per_clip`` examples (distinct crops, deterministic by ``(data.seed, example)``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.layers.core import as_dtype
from neodragon_jax.models.vae import CausalVideoVAE
from train.roles import RoleStage, Trained

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- metrics
def _gaussian(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r**2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def ssim(a: jax.Array, b: jax.Array, *, max_val: float = 2.0, size: int = 11, sigma: float = 1.5,
         reduce: bool = True) -> jax.Array:
    """Structural similarity of videos ``[B, C, F, H, W]`` (per frame and channel, Gaussian window,
    'valid' filtering, K1 = 0.01, K2 = 0.03). ``reduce``: the mean (float32 scalar), else per video ``[B]``.

    ``max_val`` is the value range (2 for [-1, 1] pixels). The window shrinks to the frame for frames
    smaller than ``size``.
    """
    if a.shape != b.shape or a.ndim != 5:
        raise ValueError(f"ssim expects two videos [B, C, F, H, W] of one shape, got {a.shape} and {b.shape}")
    bsz, c, f, h, w = a.shape
    size = min(size, h, w)
    g = jnp.asarray(_gaussian(size, sigma))
    dn = ("NHWC", "HWIO", "NHWC")

    def blur(x):
        x = x.reshape(-1, h, w, 1)
        x = jax.lax.conv_general_dilated(x, g.reshape(size, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dn)
        return jax.lax.conv_general_dilated(x, g.reshape(1, size, 1, 1), (1, 1), "VALID", dimension_numbers=dn)

    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    per_video = jnp.mean(s.reshape(bsz, -1), axis=1)
    return jnp.mean(per_video) if reduce else per_video


def psnr(a: jax.Array, b: jax.Array, *, max_val: float = 2.0, reduce: bool = True) -> jax.Array:
    """PSNR in dB per video ``[B, ...]`` (``max_val`` = value range, 2 for [-1, 1]); mean over videos if
    ``reduce``. A perfect reconstruction is capped at 100 dB."""
    err = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)).reshape(a.shape[0], -1), axis=1)
    per_video = jnp.minimum(10.0 * jnp.log10(max_val**2 / jnp.maximum(err, 1e-30)), 100.0)
    return jnp.mean(per_video) if reduce else per_video


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Mean over elements of ``KL(N(mean, exp(logvar)) || N(0, 1))``."""
    m, lv = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.mean(jnp.square(m) + jnp.exp(lv) - 1.0 - lv)


# ------------------------------------------------------------------------------------------------ data
def _check_clip_geometry(cfg: Config, frames: int, crop: int | None) -> None:
    c = cfg.model.vae.causal
    v = cfg.video
    tf, sf = c.temporal_factor, c.spatial_factor
    if frames < 1 or (frames - 1) % tf:
        raise ValueError(f"VAE training clips need 1 + {tf}k frames (1, {1 + tf}, {1 + 2 * tf}, ...), got {frames}")
    if frames > v.num_frames:
        raise ValueError(f"clip_frames={frames} is longer than the clips (video.num_frames={v.num_frames})")
    if crop is not None:
        if crop < sf or crop % sf:
            raise ValueError(f"crop={crop} must be a positive multiple of the VAE's spatial factor {sf}")
        if crop > min(v.height, v.width):
            raise ValueError(f"crop={crop} is larger than the frames ({v.height}x{v.width})")
    elif v.height % sf or v.width % sf:
        raise ValueError(f"video {v.height}x{v.width} must be a multiple of the VAE's spatial factor {sf}")


class ClipCache:
    """uint8 clips ``[N, F, H, W, 3]`` of a video folder, decoded once into ``cache_dir`` and memory-mapped.

    The cache is keyed by the folder's ``captions.jsonl`` contents and the clip geometry (a changed folder
    or resolution decodes again). Only readable clips are stored; ``stats`` counts the rest.
    """

    def __init__(self, root: str | os.PathLike, cfg: Config, cache_dir: str | os.PathLike, *, progress: bool = True):
        from neodragon_jax.data.video_folder import CAPTIONS_FILE, VideoFolder

        self.root = Path(root)
        folder = VideoFolder.from_config(self.root, cfg)
        v = cfg.video
        key = hashlib.sha256(
            (self.root / CAPTIONS_FILE).read_bytes() + json.dumps([v.num_frames, v.height, v.width, v.fps]).encode()
        ).hexdigest()[:16]
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = cache_dir / f"clips-{v.num_frames}x{v.height}x{v.width}-{key}.npy"
        meta_path = self.path.with_suffix(".json")
        if not (self.path.is_file() and meta_path.is_file()):
            self._decode(folder, meta_path, progress)
        self.meta = json.loads(meta_path.read_text())
        self.clips = np.load(self.path, mmap_mode="r")[: self.meta["count"]]
        if len(self.clips) == 0:
            from neodragon_jax.data.video_folder import DatasetError

            raise DatasetError(f"no readable clip in {self.root} ({self.meta['stats']})")

    def _decode(self, folder, meta_path: Path, progress: bool) -> None:
        from tqdm.auto import tqdm

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        shape = (len(folder), folder.num_frames, folder.height, folder.width, 3)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        n = 0
        try:
            for i in tqdm(range(len(folder)), desc="decoding clips", unit="clip", disable=not progress,
                          dynamic_ncols=True):
                item = folder.get(i)
                if item is None:
                    continue
                out[n] = np.clip(np.rint((np.transpose(item["video"], (1, 2, 3, 0)) + 1.0) * 127.5), 0, 255)
                n += 1
            out.flush()
            del out
            # Both files are replaced atomically, the metadata first: several processes (one per host of a
            # multi-process run) may decode the same folder at once, and a reader takes the cache only when
            # both exist, so it never sees a partial file (each writer's content is the same).
            meta = {"source": str(self.root.resolve()), "count": n, "entries": len(folder),
                    "stats": folder.stats.as_dict()}
            meta_tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
            meta_tmp.write_text(json.dumps(meta, indent=1) + "\n")
            os.replace(meta_tmp, meta_path)
            os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")):
                if leftover.exists():
                    leftover.unlink()
        if n < len(folder):
            log.warning("%d of %d clips in %s are unreadable and left out", len(folder) - n, len(folder), self.root)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.clips[i])


class RenderedClips:
    """Clips of the synthetic domain rendered on demand: item ``i`` = ``dataset_item(i, seed)`` at ``cfg.video``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.n = int(cfg.data.num_synthetic)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        from neodragon_jax.data.synthetic import dataset_item, render_scene

        v = self.cfg.video
        scene, _, render_seed = dataset_item(int(i), seed=self.cfg.data.seed)
        return render_scene(scene, height=v.height, width=v.width, num_frames=v.num_frames, seed=render_seed)


def to_model_video(clip_u8: np.ndarray) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` -> float32 ``[3, F, H, W]`` in [-1, 1]."""
    return np.ascontiguousarray(np.transpose(clip_u8.astype(np.float32) / 127.5 - 1.0, (3, 0, 1, 2)))


# ----------------------------------------------------------------------------------------------- stage
#: ``VAEStage(kernel_init=...)``: see the module docstring.
KERNEL_INITS = ("inflated", "lecun", "official")


def chroma(video: jax.Array) -> jax.Array:
    """Colour difference of ``[B, 3, F, H, W]`` pixels: RGB minus the per-pixel channel mean."""
    return video - jnp.mean(video, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class VAELossWeights:
    mse: float = 1.0
    ssim: float = 0.2
    kl: float = 1e-6
    chroma: float = 0.0


@dataclasses.dataclass(frozen=True)
class VAESettings:
    """``cfg.stages.vae`` (``--set stages.vae.crop=32``); :class:`VAEStage`'s keyword arguments win over them."""

    clip_frames: int = 0           # frames of a training clip; 0 = video.num_frames
    crop: int = 0                  # square crop side in pixels; 0 = whole frames
    crops_per_clip: int = 16       # distinct crops per clip (with crops)
    mse_weight: float = 1.0
    ssim_weight: float = 0.2
    kl_weight: float = 1e-6
    # MSE of the chroma (RGB minus the per-pixel channel mean). A tiny autoencoder learns luminance first and
    # colour only after a long plateau; measured on the tiny teacher's VAE (32x32 frames, batch 32, lr 4e-3,
    # 600 steps): held-out colour 0.79 without, 0.92 with weight 1 (strict scorer, 48 videos).
    chroma_weight: float = 0.0
    logvar_init: float | None = -16.0  # posterior log-variance bias at init; none = the official init
    kernel_init: str = "lecun"     # "inflated", "lecun" or "official" (module docstring)
    zero_init_residual: bool = False


_UNSET = object()


class VAEStage(RoleStage):
    """Reconstruction training of ``CausalVideoVAE`` with the native decoder (see the module docstring).

    ``clip_frames`` (default ``cfg.video.num_frames``) and ``crop`` (square crop side; default: whole
    frames) set the training clip; ``cache_dir`` holds the decoded-clip cache of a video folder (default
    ``<train.output_dir>/clip_cache``). Every option defaults to ``cfg.stages.vae`` (:class:`VAESettings`);
    ``self.settings`` holds the ones in force (recorded in the run's config and checkpoints).
    """

    name = "vae"
    settings_class = VAESettings

    def __init__(self, cfg: Config, *, clip_frames: int | None = None, crop: int | None = None,
                 crops_per_clip: int | None = None, weights: VAELossWeights | None = None,
                 logvar_init: float | None = _UNSET, kernel_init: str | None = None,
                 zero_init_residual: bool | None = None, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True):
        s = cfg.stages.get_settings(self.name)
        given = {"clip_frames": clip_frames, "crop": crop, "crops_per_clip": crops_per_clip,
                 "kernel_init": kernel_init, "zero_init_residual": zero_init_residual}
        if weights is not None:
            given.update(mse_weight=weights.mse, ssim_weight=weights.ssim, kl_weight=weights.kl,
                         chroma_weight=weights.chroma)
        if logvar_init is not _UNSET:
            s = dataclasses.replace(s, logvar_init=logvar_init)
        s = dataclasses.replace(s, **{k: v for k, v in given.items() if v is not None})
        self.settings = s
        clip_frames, crop, crops_per_clip = s.clip_frames or None, s.crop or None, s.crops_per_clip
        self.clip_frames = int(clip_frames or cfg.video.num_frames)
        self.crop = None if crop is None or (crop >= cfg.video.height and crop >= cfg.video.width) else int(crop)
        if self.crop is None and self.clip_frames == cfg.video.num_frames:
            crops_per_clip = 1  # nothing to vary
        _check_clip_geometry(cfg, self.clip_frames, self.crop)
        if crops_per_clip < 1:
            raise ValueError(f"crops_per_clip must be >= 1, got {crops_per_clip}")
        self.crops_per_clip = int(crops_per_clip)
        self.weights = VAELossWeights(s.mse_weight, s.ssim_weight, s.kl_weight, s.chroma_weight)
        self.logvar_init = s.logvar_init
        if s.kernel_init not in KERNEL_INITS:
            raise ValueError(f"kernel_init must be one of {', '.join(map(repr, KERNEL_INITS))}, got {s.kernel_init!r}")
        self.kernel_init = s.kernel_init
        self.zero_init_residual = bool(s.zero_init_residual)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(cfg.train.output_dir) / "clip_cache"
        self.progress = progress
        self._clips = None
        self._lock = threading.Lock()

    # -- models ------------------------------------------------------------------------------------------
    def roles(self, cfg: Config):
        return {"vae": Trained(self._vae)}

    def _vae(self, cfg: Config, rngs: nnx.Rngs) -> CausalVideoVAE:
        vae = CausalVideoVAE(cfg.model.vae, decoder="native", dtype=as_dtype(cfg.precision.dtype),
                             param_dtype=as_dtype(cfg.precision.param_dtype), rngs=rngs)
        if self.kernel_init != "official":
            # The official N(0, 0.02) kernels shrink a signal ~2x per layer at these widths: trained from
            # scratch, the decoder learns the mean clip from its biases long before the latents' tiny signal
            # reaches it, and the encoder never learns (the autoencoder collapses to a constant output).
            # Fan-in scaled kernels keep the latent path alive from step 0.
            init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            key = rngs.params()
            for i, (path, var) in enumerate(nnx.iter_graph(vae)):
                if not (isinstance(var, nnx.Param) and path and path[-1] == "kernel"):
                    continue
                k = jax.random.fold_in(key, i)
                if self.kernel_init == "inflated" and var.ndim == 5 and var.shape[0] > 1:
                    # [kt, kh, kw, in, out]: only the current-frame tap (the last one; causal padding is
                    # in front) is non-zero, fan-in scaled over one frame.
                    var[...] = jnp.zeros(var.shape, var.dtype).at[-1].set(init(k, var.shape[1:], var.dtype))
                else:
                    var[...] = init(k, var.shape, var.dtype)
        if self.zero_init_residual:
            for path, var in nnx.iter_graph(vae):
                if isinstance(var, nnx.Param) and path and path[-1] == "kernel" and (
                        "conv2" in path or "to_out" in path):
                    var[...] = jnp.zeros(var.shape, var.dtype)
        if self.logvar_init is not None:
            # With the official N(0, 0.02) init the encoder's means start at ~0.03: a posterior of unit
            # variance (log-variance ~0 at init) would bury them in sampling noise and the autoencoder would
            # not start learning for hundreds of steps. A nearly deterministic posterior trains at once (the
            # KL term may raise the variances later). Part of the init, so the engine's jitted init does it.
            bias = vae.quant_conv.conv.bias
            half = bias.shape[0] // 2  # quant_conv output channels = mean || logvar
            bias[...] = bias[...].at[half:].set(self.logvar_init)
        return vae

    # -- loss --------------------------------------------------------------------------------------------
    def loss(self, trainable, frozen, batch, rng):
        vae = trainable["vae"]
        x = batch["video"].astype(jnp.float32)
        post = vae.encode(x)
        rec = vae.decode(post.sample(rng)).astype(jnp.float32)
        mse = jnp.mean(jnp.square(rec - x))
        s = ssim(rec, x)
        kl = kl_to_standard_normal(post.mean, post.logvar)
        w = self.weights
        chroma_mse = jnp.mean(jnp.square(chroma(rec) - chroma(x)))
        total = w.mse * mse + w.ssim * (1.0 - s) + w.kl * kl + w.chroma * chroma_mse
        metrics = {"mse": mse, "ssim": s, "kl": kl, "chroma_mse": chroma_mse, "psnr": psnr(jnp.clip(rec, -1.0, 1.0), x)}
        return total, jax.lax.stop_gradient(metrics)

    # -- data --------------------------------------------------------------------------------------------
    def clip_shape(self, cfg: Config) -> tuple[int, int, int, int]:
        h = self.crop or cfg.video.height
        w = self.crop or cfg.video.width
        return (3, self.clip_frames, h, w)

    def example_batch(self, cfg: Config, global_batch: int):
        return {"video": jax.ShapeDtypeStruct((global_batch,) + self.clip_shape(cfg), jnp.float32)}

    def batch_logical_axes(self, cfg: Config):
        return {"video": ("batch", None, None, None, None)}

    def clips(self, cfg: Config):
        """The clip source (decoded / rendered lazily, once, thread-safe: the data iterator prefetches)."""
        with self._lock:
            if self._clips is None:
                if cfg.data.source != "synthetic":
                    raise ValueError(
                        "the vae stage reads videos itself: leave data.source='synthetic' and point data.path at a "
                        "video folder (captions.jsonl + videos), or leave data.path empty for rendered clips"
                    )
                if cfg.data.path:
                    self._clips = ClipCache(cfg.data.path, cfg, self.cache_dir, progress=self.progress)
                else:
                    self._clips = RenderedClips(cfg)
            return self._clips

    def num_examples(self, cfg: Config) -> int:
        return len(self.clips(cfg)) * self.crops_per_clip

    def data_description(self, cfg: Config) -> str:
        """What the run trains on, for the banner (data.source stays 'synthetic' for a video folder)."""
        return f"video folder {cfg.data.path}" if cfg.data.path else "rendered synthetic clips"

    def make_example(self, cfg: Config, index: int) -> dict[str, np.ndarray]:
        clips = self.clips(cfg)
        clip = clips[int(index) % len(clips)]
        _, f, h, w = self.clip_shape(cfg)
        rng = np.random.default_rng([cfg.data.seed, int(index), 7])
        t0 = int(rng.integers(0, clip.shape[0] - f + 1))
        y0 = int(rng.integers(0, clip.shape[1] - h + 1))
        x0 = int(rng.integers(0, clip.shape[2] - w + 1))
        return {"video": to_model_video(clip[t0:t0 + f, y0:y0 + h, x0:x0 + w])}



# ------------------------------------------------------------------------------------ after training
@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef, state, video):
    vae = nnx.merge(graphdef, state)
    post = vae.encode(video)
    rec = jnp.clip(vae.decode(post.mode()).astype(jnp.float32), -1.0, 1.0)
    return rec, psnr(rec, video, reduce=False), ssim(rec, video, reduce=False)


def reconstruct(vae: CausalVideoVAE, videos: np.ndarray, *, batch_size: int = 4):
    """Posterior-mean reconstructions of float videos ``[N, 3, F, H, W]`` in [-1, 1] -> ``(recon [N, 3, F,
    H, W] clipped to [-1, 1], psnr [N] dB, ssim [N])``, in batches (the last one padded)."""
    graphdef, state = nnx.split(vae)
    videos = np.asarray(videos, np.float32)
    recs, ps, ss = [], [], []
    for i in range(0, len(videos), batch_size):
        chunk = videos[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
        r, p, s = _reconstruct(graphdef, state, jnp.asarray(chunk))
        recs.append(np.asarray(r)[:n])
        ps.append(np.asarray(p)[:n])
        ss.append(np.asarray(s)[:n])
    return np.concatenate(recs), np.concatenate(ps), np.concatenate(ss)


@functools.partial(jax.jit, static_argnums=0)
def _moments(graphdef, state, video):
    return nnx.merge(graphdef, state).encode(video).mean.astype(jnp.float32)


def latent_normalisation(vae: CausalVideoVAE, videos: np.ndarray, *, batch_size: int = 4) -> dict[str, float]:
    """Shift / scale that make this VAE's posterior means zero-mean, unit-variance for the DiT.

    Returns ``{"image_shift", "image_scale", "video_shift", "video_scale"}`` (the ``model.vae.causal`` fields
    ``normalize_latents`` reads: frame 0 and later latent frames separately, as the official constants),
    measured over ``videos [N, 3, F, H, W]``. A freshly trained VAE has its own latent statistics, so the
    official constants (made for the released VAE) do not apply to it.
    """
    graphdef, state = nnx.split(vae)
    firsts, laters = [], []
    videos = np.asarray(videos, np.float32)
    for i in range(0, len(videos), batch_size):
        chunk = videos[i:i + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        z = np.asarray(_moments(graphdef, state, jnp.asarray(chunk)))[: len(videos[i:i + batch_size])]
        firsts.append(z[:, :, 0].ravel())
        if z.shape[2] > 1:
            laters.append(z[:, :, 1:].ravel())
    first = np.concatenate(firsts).astype(np.float64)
    later = np.concatenate(laters).astype(np.float64) if laters else first
    return {"image_shift": float(first.mean()), "image_scale": float(1.0 / max(first.std(), 1e-6)),
            "video_shift": float(later.mean()), "video_scale": float(1.0 / max(later.std(), 1e-6))}


__all__ = [
    "ClipCache", "RenderedClips", "VAELossWeights", "VAESettings", "VAEStage", "kl_to_standard_normal", "latent_normalisation",
    "psnr", "reconstruct", "ssim", "to_model_video",
]
