"""Held-out evaluation of a text-to-video pipeline on the synthetic domain: generate, score, chance level.

The prompts are the captions of scenes whose (colour, shape, motion) triple never occurs in training
(``captions.split_combinations``), exactly the captions of the held-out videos ``write_dataset(...,
held_out=True, seed=seed)`` renders (item ``i`` of both is ``synthetic.dataset_item(i, seed=seed, ...)``), so
a demo's held-out folder, a release's record and a distillation report all score the same prompts. Every
accuracy comes with its chance level: the same videos scored against deranged captions
(``scorer.chance_level``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from neodragon_jax.eval.scorer import ScoreReport, chance_level, score_pairs

if TYPE_CHECKING:
    from neodragon_jax.eval.video_cache import VideoCache

#: The held-out prompts' seed (the demo's ``eval_seed``).
HELDOUT_SEED = 1


def heldout_prompts(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """The first ``n`` held-out prompts (one object each, triples never seen in training)."""
    from neodragon_jax.data.captions import split_combinations
    from neodragon_jax.data.synthetic import dataset_item

    if n < 1:
        raise ValueError(f"need at least one prompt, got n={n}")
    held = split_combinations().held_out
    return [dataset_item(i, seed=seed, combinations=held, num_objects=1)[1] for i in range(n)]


@dataclasses.dataclass
class HeldoutResult:
    """One pipeline x schedule on the held-out prompts."""

    schedule: str
    prompts: list[str]
    videos: list[np.ndarray]     # uint8 [F, H, W, 3] each
    report: ScoreReport
    chance: dict[str, float]
    nfe: int
    seconds_per_video: float
    denoise_seconds: list[float] = dataclasses.field(default_factory=list)  # per video, the first one compiles

    @property
    def denoise_ms_per_nfe(self) -> float:
        """Median denoising time per model call over the videos after the first (compile excluded)."""
        t = self.denoise_seconds[1:] or self.denoise_seconds
        return float(np.median(t)) * 1e3 / max(self.nfe, 1) if t else float("nan")

    def as_dict(self) -> dict:
        """The figures (no videos): accuracy and chance per attribute, all-correct, NFE, time per video."""
        return {"schedule": self.schedule, "videos": len(self.videos), "accuracy": self.report.accuracy,
                "chance": self.chance, "all_correct": self.report.all_correct, "nfe": self.nfe,
                "seconds_per_video": self.seconds_per_video}


def schedule_name(first: Sequence[int], later: Sequence[int], cfg_scales: Sequence[float]) -> str:
    """``"4-4-4,4-4-4 cfg 7/5"``: the steps per stage (first unit, later units) and the guidance."""
    steps = f"{'-'.join(map(str, first))},{'-'.join(map(str, later))}"
    return steps + (f" cfg {cfg_scales[0]:g}/{cfg_scales[1]:g}" if any(cfg_scales) else " no cfg")


def evaluate_heldout(pipe, prompts: Sequence[str], *, first_unit_steps: Sequence[int] | None = None,
                     later_unit_steps: Sequence[int] | None = None, cfg_scales: Sequence[float] | None = None,
                     seed: int = 0, progress: Callable[[int, int], None] | None = None,
                     cache: "VideoCache | None" = None) -> HeldoutResult:
    """Generate one video per prompt (seed ``seed + i``) with ``pipe`` (a ``TextToVideoPipeline``) and score
    them. Steps and guidance default to the pipeline config's ``sampling``. With ``cache``, a video this
    pipeline already generated for the same request is read back (its recorded timings kept)."""
    from neodragon_jax.eval.video_cache import CachedVideo
    from neodragon_jax.pipelines.text_to_video import GenerationRequest

    s = pipe.cfg.sampling
    first = tuple(first_unit_steps or s.first_unit_steps)
    later = tuple(later_unit_steps or s.later_unit_steps)
    scales = tuple(cfg_scales) if cfg_scales is not None else (s.first_unit_cfg, s.later_unit_cfg)
    videos, nfe, seconds, denoise = [], 0, 0.0, []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(prompt=prompt, seed=seed + i, first_unit_steps=first, later_unit_steps=later,
                                    cfg_scales=scales)
        key = cache.key(pipe, request) if cache is not None else None
        video = cache.get(key) if cache is not None else None
        if video is None:
            t0 = time.perf_counter()
            res = pipe.generate(request)
            video = CachedVideo(res.frames, res.nfe, time.perf_counter() - t0, res.timings["denoise"])
            if cache is not None:
                cache.put(key, video)
        videos.append(video.frames)
        denoise.append(video.denoise_seconds)
        seconds += video.seconds
        nfe = video.nfe
        if progress is not None:
            progress(i + 1, len(prompts))
    seconds /= max(len(prompts), 1)
    report = score_pairs(zip(videos, prompts))
    chance = chance_level([v.analysis for v in report.videos], list(prompts))
    return HeldoutResult(schedule_name(first, later, scales), list(prompts), videos, report, chance, nfe, seconds,
                         denoise)


__all__ = ["HELDOUT_SEED", "HeldoutResult", "evaluate_heldout", "heldout_prompts", "schedule_name"]
