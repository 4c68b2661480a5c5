"""MMDiT block importance for pruning (spec §6.1) and the kept-block selection rules.

For block k with input ``(z_k, t_k)`` and output ``(z_k+1, t_k+1)``:
``BI_v = 1 - E[cos(z_k, z_k+1)]`` over image tokens and ``BI_t = 1 - E[cos(t_k, t_k+1)]`` over the valid
(unpadded) text tokens, the expectation taken over tokens, a calibration set (prompts x samples), every
denoising step of the sampling schedule and both CFG branches. The statistics are gathered while the real
sampler runs: :class:`ImportanceProbe` wraps the MMDiT, computes per-block cosine sums inside the jitted
Euler step and hands them to a host :class:`ImportanceAccumulator` through ``jax.debug.callback`` (the
weights stay arguments of the compiled step, as in plain sampling).

The last block has the ``context_pre_only`` layout (no text output), so its ``BI_t`` is undefined (NaN) and
every selection rule keeps it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RULES = ("visual", "text", "combined", "explicit")


# ------------------------------------------------------------------------------------------ statistics
def _token_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine between matching tokens of ``a`` and ``b`` [B, T, D] in float32: [B, T]."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return num / jnp.maximum(den, eps)


def tap_cosine_sums(taps: Sequence[dict], text_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per block and batch row: the sum of token cosines between each block's input and output.

    ``taps``: the MMDiT's ``return_taps`` list. Returns ``(img_sum [K, B], img_tokens [B], txt_sum [K, B],
    txt_tokens [B])``; the text sums count only valid tokens of ``text_mask`` [B, S] and are 0 for a block
    without text output (the last).
    """
    valid = text_mask.astype(jnp.float32)
    img, txt = [], []
    for tap in taps:
        img.append(jnp.sum(_token_cosine(tap["img_in"], tap["img_out"]), axis=1))
        if tap["txt_out"] is None:
            txt.append(jnp.zeros_like(img[-1]))
        else:
            txt.append(jnp.sum(_token_cosine(tap["txt_in"], tap["txt_out"]) * valid, axis=1))
    rows = taps[0]["img_in"].shape[0]
    img_tokens = jnp.full((rows,), taps[0]["img_in"].shape[1], jnp.float32)
    return jnp.stack(img), img_tokens, jnp.stack(txt), jnp.sum(valid, axis=1)


class ImportanceAccumulator:
    """Host-side sums of :func:`tap_cosine_sums` per CFG branch (``cond`` / ``uncond``).

    ``batch``: the prompts per sampler call; a model call with ``2 * batch`` rows is a CFG call whose first
    half is the unconditional branch (the sampler's ``[uncond, cond]`` order).
    """

    def __init__(self, num_blocks: int, batch: int = 1):
        self.num_blocks = int(num_blocks)
        self.batch = int(batch)
        self.calls = 0
        z = lambda: np.zeros(self.num_blocks, np.float64)  # noqa: E731
        self.img_sum = {"cond": z(), "uncond": z()}
        self.txt_sum = {"cond": z(), "uncond": z()}
        self.img_tokens = {"cond": 0.0, "uncond": 0.0}
        self.txt_tokens = {"cond": 0.0, "uncond": 0.0}

    def add(self, img_sum, img_tokens, txt_sum, txt_tokens) -> None:
        img_sum, txt_sum = np.asarray(img_sum, np.float64), np.asarray(txt_sum, np.float64)
        img_tokens, txt_tokens = np.asarray(img_tokens, np.float64), np.asarray(txt_tokens, np.float64)
        rows = img_sum.shape[1]
        split = rows == 2 * self.batch
        for name, sl in (("uncond", slice(0, rows // 2)), ("cond", slice(rows // 2, rows))) if split else (
                ("cond", slice(0, rows)),):
            self.img_sum[name] += img_sum[:, sl].sum(axis=1)
            self.txt_sum[name] += txt_sum[:, sl].sum(axis=1)
            self.img_tokens[name] += float(img_tokens[sl].sum())
            self.txt_tokens[name] += float(txt_tokens[sl].sum())
        self.calls += 1

    def importance(self, branches: Sequence[str] = ("cond", "uncond")) -> tuple[np.ndarray, np.ndarray]:
        """``(BI_v [K], BI_t [K])`` over ``branches`` (BI_t NaN for the last block: it has no text output)."""
        img = sum(self.img_sum[b] for b in branches)
        txt = sum(self.txt_sum[b] for b in branches)
        n_img = sum(self.img_tokens[b] for b in branches)
        n_txt = sum(self.txt_tokens[b] for b in branches)
        if n_img == 0:
            raise ValueError("no model call was recorded: run the sampler with the probe first")
        bi_v = 1.0 - img / n_img
        bi_t = 1.0 - txt / n_txt if n_txt else np.full(self.num_blocks, np.nan)
        bi_t = bi_t.copy()
        bi_t[-1] = np.nan
        return bi_v, bi_t


class ImportanceProbe(nnx.Module):
    """The MMDiT interface (``probe(clips, tokens, mask, pooled, t) -> velocity``) that also sends each
    call's block statistics to ``accumulator``. Use it in place of the MMDiT in the sampler."""

    def __init__(self, mmdit: nnx.Module, accumulator: ImportanceAccumulator):
        self.mmdit = mmdit
        self.accumulator = accumulator

    def __call__(self, clips, text_tokens, text_mask, pooled, timestep):
        v, taps = self.mmdit(clips, text_tokens, text_mask, pooled, timestep, return_taps=True)
        mask = jnp.ones(text_tokens.shape[:2], bool) if text_mask is None else text_mask
        jax.debug.callback(self.accumulator.add, *tap_cosine_sums(taps, mask))
        return v


# ------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class Importance:
    """Block importance of one model on one calibration set."""

    teacher_indices: list[int]
    visual: list[float]
    text: list[float | None]  # None: no text output (the last block)
    by_branch: dict[str, dict[str, list[float | None]]]
    rank_correlation: float | None  # Spearman between visual and text over the blocks with both
    calibration: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Importance":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(d)
        if missing:
            raise ValueError(f"not an importance file: missing {sorted(missing)}")
        return cls(**{k: d[k] for k in fields})

    @classmethod
    def read(cls, path: str | Path) -> "Importance":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not an importance JSON file ({e})") from None

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        return path


def _nan_to_none(x: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in x]


def rank_correlation(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Spearman's rho over the entries where both are defined (None with fewer than 3 such entries)."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return None if not np.isfinite(rho) else float(rho)


def importance_from(acc: ImportanceAccumulator, teacher_indices: Sequence[int], calibration: dict) -> Importance:
    bi_v, bi_t = acc.importance()
    by_branch = {}
    for b in ("cond", "uncond"):
        if acc.img_tokens[b]:
            v, t = acc.importance((b,))
            by_branch[b] = {"visual": _nan_to_none(v), "text": _nan_to_none(t)}
    visual, text = _nan_to_none(bi_v), _nan_to_none(bi_t)
    return Importance(list(map(int, teacher_indices)), visual, text, by_branch, rank_correlation(visual, text),
                      dict(calibration, model_calls=acc.calls))


def measure_importance(pipe, prompts: Sequence[str], *, samples_per_prompt: int = 1, first_unit_steps=None,
                       later_unit_steps=None, cfg_scales=None, seed: int = 0,
                       progress: Callable[[int, int, float], None] | None = None) -> Importance:
    """Block importance of ``pipe.mmdit`` (a ``TextToVideoPipeline``) over ``prompts`` x ``samples_per_prompt``
    videos (seed ``seed + j`` for sample ``j``), every denoising step of the schedule (default: the config's
    sampling steps and CFG) and both CFG branches."""
    from neodragon_jax.pipelines.text_to_video import GenerationRequest

    if not prompts or samples_per_prompt < 1:
        raise ValueError("need at least one prompt and one sample per prompt")
    s = pipe.cfg.sampling
    first = tuple(first_unit_steps or s.first_unit_steps)
    later = tuple(later_unit_steps or s.later_unit_steps)
    scales = tuple(cfg_scales) if cfg_scales is not None else (s.first_unit_cfg, s.later_unit_cfg)
    acc = ImportanceAccumulator(len(pipe.mmdit.transformer_blocks), batch=1)
    probed = pipe.replace(mmdit=ImportanceProbe(pipe.mmdit, acc))
    total, done, t0 = len(prompts) * samples_per_prompt, 0, time.perf_counter()
    for j in range(samples_per_prompt):
        for prompt in prompts:
            probed.generate(GenerationRequest(prompt=prompt, seed=seed + j, first_unit_steps=first,
                                              later_unit_steps=later, cfg_scales=scales))
            done += 1
            if progress is not None:
                progress(done, total, time.perf_counter() - t0)
    jax.effects_barrier()
    calibration = {"prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "seed": seed,
                   "first_unit_steps": list(first), "later_unit_steps": list(later), "cfg": list(scales),
                   "branches": "cond+uncond" if any(scales) else "cond"}
    return importance_from(acc, pipe.mmdit.teacher_block_indices, calibration)


# ------------------------------------------------------------------------------------------ selection
def select_blocks(importance: Importance | None, num_blocks: int, *, remove: int = 0, rule: str = "visual",
                  text_weight: float = 0.5, explicit: Sequence[int] = ()) -> tuple[int, ...]:
    """The kept block positions (increasing), always including the last block.

    ``rule``: ``visual`` / ``text`` remove the ``remove`` blocks of lowest BI_v / BI_t; ``combined`` removes the
    lowest ``(1 - text_weight) * BI_v / max BI_v + text_weight * BI_t / max BI_t`` (each score scaled by its
    largest value so neither dominates by units); ``explicit`` keeps ``explicit`` as given.
    """
    last = num_blocks - 1
    if rule == "explicit":
        kept = sorted({int(k) for k in explicit})
        if not kept:
            raise ValueError("rule 'explicit' needs the kept block list (e.g. --keep 0,1,3,4,6,7)")
        bad = [k for k in kept if not 0 <= k < num_blocks]
        if bad:
            raise ValueError(f"kept blocks {bad} out of range: the model has blocks 0..{last}")
        if kept[-1] != last:
            raise ValueError(f"the last block ({last}) must be kept: only it has the context_pre_only layout a "
                             f"model's last block needs")
        return tuple(kept)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; rules: {', '.join(RULES)}")
    if importance is None:
        raise ValueError(f"rule {rule!r} needs an importance file (neodragon prune importance)")
    if len(importance.visual) != num_blocks:
        raise ValueError(f"the importance file scores {len(importance.visual)} blocks but the model has {num_blocks}")
    if not 0 < remove < num_blocks:
        raise ValueError(f"remove must be between 1 and {num_blocks - 1} (the last block is always kept), got {remove}")
    v = np.asarray(importance.visual, np.float64)
    t = np.asarray([np.nan if x is None else x for x in importance.text], np.float64)
    if rule == "visual":
        score = v
    elif rule == "text":
        score = t
    else:
        if not 0.0 <= text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
        score = (1 - text_weight) * v / np.nanmax(v) + text_weight * t / np.nanmax(t)
    candidates = [k for k in range(last) if np.isfinite(score[k])]
    if remove > len(candidates):
        raise ValueError(f"cannot remove {remove} blocks: only {len(candidates)} have a {rule} score")
    # Lowest score first; ties broken by the later block (keeps the early blocks that set up the stream).
    order = sorted(candidates, key=lambda k: (score[k], -k))
    removed = set(order[:remove])
    return tuple(k for k in range(num_blocks) if k not in removed)


def plot_importance(imp: Importance, path: str | Path, *, title: str = "") -> Path:
    """A PNG bar chart of BI_v and BI_t per block with their rank correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = np.arange(len(imp.visual))
    v = np.asarray(imp.visual, np.float64)
    t = np.asarray([np.nan if x is None else x for x in imp.text], np.float64)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(k) + 3), 3.6), dpi=120)
    w = 0.4
    ax.bar(k - w / 2, v, w, label="BI visual (image tokens)", color="#2b6cb0")
    ax.bar(k + w / 2, np.nan_to_num(t), w, label="BI text (valid text tokens)", color="#dd6b20")
    for i in np.flatnonzero(~np.isfinite(t)):
        ax.text(i + w / 2, 0, "n/a", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(k, [f"{i}\n(t{ti})" for i, ti in zip(k, imp.teacher_indices)])
    ax.set_xlabel("block (teacher index)")
    ax.set_ylabel("1 - E[cos(in, out)]")
    rho = "n/a" if imp.rank_correlation is None else f"{imp.rank_correlation:+.2f}"
    c = imp.calibration
    ax.set_title(title or f"block importance: {c.get('prompts')} prompts x {c.get('samples_per_prompt')} samples, "
                          f"{c.get('branches')}; Spearman rho(visual, text) = {rho}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["Importance", "ImportanceAccumulator", "ImportanceProbe", "RULES", "importance_from",
           "measure_importance", "plot_importance", "rank_correlation", "select_blocks", "tap_cosine_sums"]
