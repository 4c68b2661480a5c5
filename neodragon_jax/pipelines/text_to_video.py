"""Text -> latents -> video: tokenise, condition, pyramidal sampling, denormalise, decode (spec §1.3).

Used by ``neodragon generate``, by evaluation and by export parity. The pipeline holds its models and one
:class:`PyramidSampler`, so a second video with the same shapes reuses every compiled step.

Weights come from one of:
- :meth:`TextToVideoPipeline.random` - random weights (tests, smoke runs; the result says so loudly);
- :meth:`TextToVideoPipeline.from_official` - a folder in the official Neodragon / Pyramid Flow layout;
- a training checkpoint (the training engine restores the modules and hands them to the constructor).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.layers.core import as_dtype
from neodragon_jax.models.build import init_jit
from neodragon_jax.models.mmdit import PyramidMMDiT, init_mmdit
from neodragon_jax.models.text.conditioner import TextConditioner
from neodragon_jax.models.text.tokenizers import TextTokenizers
from neodragon_jax.models.vae import CausalVideoVAE
from neodragon_jax.models.vae.normalize import denormalize_latents, latent_frames
from neodragon_jax.pyramid.loss import TextCondition
from neodragon_jax.pyramid.sampler import PyramidSampler, count_nfe
from neodragon_jax.pyramid.scheduler import make_schedule


class ScheduleError(ValueError):
    """A sampling schedule string or frame count that the pipeline cannot run."""


def parse_schedule(text: str, num_stages: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``"20-20-20"`` (all units) or ``"20-20-20,10-10-10"`` (first unit, later units) -> step tuples."""
    parts = [p.strip() for p in str(text).split(",")]
    if not 1 <= len(parts) <= 2 or any(not p for p in parts):
        raise ScheduleError(
            f"bad schedule {text!r}: expected steps per stage like '1-1-1' or 'FIRST,LATER' like "
            f"'20-20-20,10-10-10' ({num_stages} stages)"
        )
    out = []
    for p in parts:
        if not re.fullmatch(r"\d+(-\d+)*", p):
            raise ScheduleError(f"bad schedule {text!r}: {p!r} is not dash-separated step counts like '10-10-10'")
        steps = tuple(int(n) for n in p.split("-"))
        if len(steps) != num_stages:
            raise ScheduleError(f"bad schedule {text!r}: {p!r} gives {len(steps)} stages, the model has {num_stages}")
        if any(n < 1 for n in steps):
            raise ScheduleError(f"bad schedule {text!r}: every stage needs at least 1 step")
        out.append(steps)
    return out[0], out[-1]


def parse_cfg_scales(text: str | float | None, default: tuple[float, float]) -> tuple[float, float]:
    """``"7,5"`` -> (7.0, 5.0); ``"0"`` -> no guidance; None -> ``default``."""
    if text is None:
        return default
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ScheduleError(f"bad CFG scales {text!r}: expected a number or 'FIRST,LATER' like '7,5'") from None
    if len(values) not in (1, 2) or any(v < 0 for v in values):
        raise ScheduleError(f"bad CFG scales {text!r}: one or two non-negative numbers")
    return values[0], values[-1]


def latent_shape(cfg: Config, num_frames: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a ``num_frames`` video under ``cfg``; raises
    :class:`ScheduleError` for a frame count or resolution the VAE and pyramid cannot take. Needs no model,
    so callers check a request before building one."""
    c = cfg.model.vae.causal
    h, w = cfg.video.height, cfg.video.width
    f = c.spatial_factor
    if h % (f * 2 ** cfg.pyramid.num_stages) or w % (f * 2 ** cfg.pyramid.num_stages):
        raise ScheduleError(
            f"video {h}x{w} must be a multiple of {f * 2 ** cfg.pyramid.num_stages} (VAE factor {f} x "
            f"2^{cfg.pyramid.num_stages} pyramid stages x patch) in both dimensions"
        )
    try:
        t = latent_frames(num_frames, c.temporal_factor)
    except ValueError as e:
        raise ScheduleError(str(e)) from None
    return t, h // f, w // f


@dataclass
class GenerationRequest:
    prompt: str
    seed: int = 0
    num_frames: int | None = None  # None: the config's video.num_frames
    first_unit_steps: tuple[int, ...] | None = None
    later_unit_steps: tuple[int, ...] | None = None
    cfg_scales: tuple[float, float] | None = None
    negative_prompt: str | None = None


@dataclass
class GeneratedVideo:
    prompt: str
    full_prompt: str
    seed: int
    frames: np.ndarray  # uint8 [F, H, W, 3]
    latents: np.ndarray  # normalised [C, T, h, w]
    nfe: int
    timings: dict[str, float]
    schedule: dict
    random_weights: bool


@dataclass
class TextToVideoPipeline:
    cfg: Config
    tokenizers: TextTokenizers
    text: TextConditioner
    mmdit: PyramidMMDiT
    vae: CausalVideoVAE
    random_weights: bool = False
    source: str = ""
    _sampler: PyramidSampler | None = field(default=None, repr=False)
    _jitted: dict = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def random(cls, cfg: Config, seed: int = 0) -> "TextToVideoPipeline":
        """All models with random weights (one compiled init program each)."""
        kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))
        text = init_jit(lambda: TextConditioner(cfg.model.text, rngs=nnx.Rngs(seed), **kw))
        mmdit = init_mmdit(cfg.model.mmdit, seed=seed + 1, **kw)
        vae = init_jit(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(seed + 2), **kw))
        return cls(cfg, TextTokenizers.for_config(cfg.model.text), text, mmdit, vae, random_weights=True,
                   source=f"random init (seed {seed})")

    @classmethod
    def from_official(cls, folder: str | Path, cfg: Config, *, transformer: str | None = None) -> "TextToVideoPipeline":
        from neodragon_jax.pipelines.official import load_official

        return load_official(cls, Path(folder), cfg, transformer=transformer)

    # ------------------------------------------------------------------------------------ pieces
    @property
    def sampler(self) -> PyramidSampler:
        if self._sampler is None:
            self._sampler = PyramidSampler(
                self.mmdit, make_schedule(self.cfg.pyramid), model_dtype=as_dtype(self.cfg.precision.dtype)
            )
        return self._sampler

    def _jit(self, name: str, fn: Callable, module: nnx.Module):
        """Cache one jitted function per module (weights are arguments, never baked in)."""
        if name not in self._jitted:
            graphdef, _ = nnx.split(module)
            self._jitted[name] = (graphdef, jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a)))
        _, f = self._jitted[name]
        return lambda *a: f(nnx.state(module), *a)

    def full_prompt(self, prompt: str) -> str:
        return prompt + self.cfg.model.text.prompt_modifier if prompt else prompt

    def encode_text(self, prompts: Sequence[str]) -> TextCondition:
        tok = self.tokenizers(list(prompts))
        enc = self._jit("text", lambda m, *a: m(*a), self.text)
        tokens, mask, pooled = enc(*(jnp.asarray(a) for a in (tok.t5_ids, tok.t5_mask, tok.clip_l_ids, tok.clip_g_ids)))
        return TextCondition(tokens, mask, pooled)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents [B, C, T, h, w] -> video [B, 3, F, H, W] (raw decoder output, not clipped)."""
        z = denormalize_latents(latents, self.cfg.model.vae)
        return self._jit("decode", lambda m, x: m.decode(x), self.vae)(z)

    def latent_shape(self, num_frames: int) -> tuple[int, int, int]:
        return latent_shape(self.cfg, num_frames)

    # ---------------------------------------------------------------------------------- generate
    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: Callable[[int, int, int], None] | None = None,
        first_frame_latent: jax.Array | None = None,
    ) -> GeneratedVideo:
        cfg = self.cfg
        s = cfg.sampling
        num_frames = cfg.video.num_frames if request.num_frames is None else request.num_frames  # 0 is refused
        t_lat, h_lat, w_lat = self.latent_shape(num_frames)
        first = request.first_unit_steps or s.first_unit_steps
        later = request.later_unit_steps or s.later_unit_steps
        w_first, w_later = request.cfg_scales or (s.first_unit_cfg, s.later_unit_cfg)
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        full = self.full_prompt(request.prompt)
        cond = self.encode_text([full])
        uncond = None
        if w_first > 0 or w_later > 0:
            neg = s.negative_prompt if request.negative_prompt is None else request.negative_prompt
            uncond = self.encode_text([neg])
        jax.block_until_ready(cond.tokens)
        timings["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        out = self.sampler.sample(
            cond,
            num_frames=t_lat,
            height=h_lat,
            width=w_lat,
            key=jax.random.key(request.seed),
            first_unit_steps=first,
            later_unit_steps=later,
            first_unit_cfg=w_first,
            later_unit_cfg=w_later,
            uncond=uncond,
            first_frame=first_frame_latent,
            channels=cfg.model.mmdit.in_channels,
            progress=progress,
        )
        latents = jax.block_until_ready(out.latents)
        timings["denoise"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        video = np.asarray(jax.device_get(self.decode(latents)))[0]
        timings["decode"] = time.perf_counter() - t0

        from neodragon_jax.data.video_io import to_uint8_frames

        return GeneratedVideo(
            prompt=request.prompt,
            full_prompt=full,
            seed=request.seed,
            frames=to_uint8_frames(video),
            latents=np.asarray(latents)[0],
            nfe=out.nfe,
            timings=timings,
            schedule={
                "first_unit_steps": list(first),
                "later_unit_steps": list(later),
                "cfg": [w_first, w_later],
                "latent_frames": t_lat,
                "nfe_expected": count_nfe(
                    t_lat, first_unit_steps=first, later_unit_steps=later, first_unit_cfg=w_first,
                    later_unit_cfg=w_later, frames_per_unit=cfg.pyramid.frames_per_unit,
                    first_frame_given=first_frame_latent is not None,
                ),
            },
            random_weights=self.random_weights,
        )

    def replace(self, **changes) -> "TextToVideoPipeline":
        return dataclasses.replace(self, _sampler=None, _jitted={}, **changes)
