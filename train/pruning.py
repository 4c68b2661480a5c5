"""Block pruning's two-stage recovery (spec §6.2): ``recover-flow`` then ``recover-distill``.

The pruned student is the teacher's MMDiT with some blocks removed (``neodragon prune select`` writes it as
an official-layout folder whose transformer ``config.json`` records the kept blocks' teacher indices).

* ``recover-flow`` (stage 1): the student trained with the ordinary pyramidal flow-matching loss on real
  data (records of latents + text features; history = ground-truth past frames with Gaussian corruption),
  exactly the ``flow`` stage with the student's architecture and weights.
* ``recover-distill`` (stage 2, "full-teacher" distillation): the full teacher is a frozen role (never
  donated, never checkpointed). On the same noisy inputs, for each kept block: MSE between the student's
  and the teacher's image-token outputs and cosine distance between their valid text-token outputs, with
  the ``simple`` mapping (student block <-> the teacher block it was copied from) or ``next-block`` (student
  block output <-> the input of the next kept teacher block); plus two flow-matching terms, student against
  the teacher's velocity and student against the ground-truth flow. The paper found stage 2 works only after
  stage 1, so it refuses to start from weights that did not pass ``recover-flow`` unless ``force``.

Both stages take the student from ``student`` (the pruned folder: architecture + weights) or from ``kept``
(teacher block positions; the architecture only, e.g. for ``neodragon plan``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from neodragon_jax.config import Config
from neodragon_jax.pyramid.loss import FlowInputs, flow_matching_inputs, per_sample_mse
from train.flow_matching import FlowMatchingStage, grouped_loss, switch_value_and_grad
from train.roles import Frozen, Trained
from train.weights import parse_source

MAPPINGS = ("simple", "next-block")
STAGE1, STAGE2 = "recover-flow", "recover-distill"


class PruningError(ValueError):
    """A recovery stage's student, teacher or curriculum does not fit; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------- student
def pruned_folder_blocks(folder: str | Path) -> tuple[int, ...]:
    """The kept teacher block indices recorded in a pruned folder's transformer ``config.json``."""
    from neodragon_jax.pipelines.official import OURS, TRANSFORMER_FOLDERS

    folder = Path(folder)
    if not folder.is_dir():
        raise PruningError(f"student folder {str(folder)!r} does not exist: write it with `neodragon prune select`")
    names = [n for kind in TRANSFORMER_FOLDERS.values() for n in kind]
    for n in names:
        cfg_path = folder / n / "config.json"
        if cfg_path.is_file():
            ours = json.loads(cfg_path.read_text()).get(OURS, {})
            kept = tuple(int(k) for k in ours.get("teacher_block_indices", ()))
            if not kept:
                raise PruningError(f"{cfg_path} records no teacher_block_indices (not written by `neodragon prune "
                                   f"select`): give the kept blocks with stages.<stage>.kept=[...]")
            return kept
    raise PruningError(f"{str(folder)!r} has no transformer folder ({', '.join(names)}): write it with "
                       f"`neodragon prune select`")


def student_blocks(settings, num_teacher_blocks: int) -> tuple[int, ...]:
    """Kept teacher block positions from ``settings.student`` (a pruned folder) or ``settings.kept``."""
    if settings.student and settings.kept:
        from_folder = pruned_folder_blocks(settings.student)
        if tuple(settings.kept) != from_folder:
            raise PruningError(f"kept={list(settings.kept)} contradicts the student folder's blocks "
                               f"{list(from_folder)}: give one of them")
    kept = tuple(int(k) for k in settings.kept) if settings.kept else (
        pruned_folder_blocks(settings.student) if settings.student else ())
    if not kept:
        raise PruningError("no student: set stages.<stage>.student=FOLDER (from `neodragon prune select`) or "
                           "stages.<stage>.kept=[i,j,...] (teacher block positions)")
    if any(not 0 <= k < num_teacher_blocks for k in kept) or list(kept) != sorted(set(kept)):
        raise PruningError(f"kept blocks {list(kept)} must be increasing positions of the teacher's "
                           f"{num_teacher_blocks} blocks (model.mmdit.num_layers is the teacher's depth)")
    if kept[-1] != num_teacher_blocks - 1:
        raise PruningError(f"the teacher's last block ({num_teacher_blocks - 1}) must be kept: only it has the "
                           f"context_pre_only layout a model's last block needs")
    return kept


def student_overrides(kept: Sequence[int]) -> tuple[str, ...]:
    return (f"model.mmdit.num_layers={len(kept)}",
            f"model.mmdit.teacher_block_indices=[{','.join(str(int(k)) for k in kept)}]")


# ---------------------------------------------------------------------------------------------- stage 1
@dataclasses.dataclass(frozen=True)
class RecoverFlowSettings:
    """``cfg.stages.recover-flow``. ``model.mmdit`` is the TEACHER's config; the student is derived."""

    STUDENT_BLOCKS: ClassVar[str] = "kept"  # the field the plan's depth probe scales

    student: str = ""  # the pruned official folder from `neodragon prune select` (architecture + weights)
    kept: tuple[int, ...] = ()  # or: kept teacher block positions (architecture only)
    init: str = ""  # weight source of the student; "" = official:<student> (random with `kept` only)


class RecoverFlow(FlowMatchingStage):
    """Stage 1: the pruned student trained with the pyramidal flow-matching loss (role ``mmdit``)."""

    name = STAGE1
    settings_class = RecoverFlowSettings

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.kept = student_blocks(self.settings, cfg.model.mmdit.num_layers)
        if cfg.train.trainable_blocks:
            raise PruningError("train.trainable_blocks is not supported by the recovery stages (the whole student "
                               "trains)")

    def student_init(self) -> str:
        s = self.settings
        return s.init or (f"official:{s.student}" if s.student else "random")

    def roles(self, cfg: Config):
        return {"mmdit": Trained(self._mmdit, overrides=student_overrides(self.kept), init=self.student_init())}


# ---------------------------------------------------------------------------------------------- stage 2
@dataclasses.dataclass(frozen=True)
class RecoverDistillSettings:
    """``cfg.stages.recover-distill``. ``model.mmdit`` is the TEACHER's config; the student is derived."""

    STUDENT_BLOCKS: ClassVar[str] = "kept"  # the field the plan's depth probe scales

    student: str = ""  # the pruned folder (architecture); weights come from ``init``
    kept: tuple[int, ...] = ()  # or: kept teacher block positions
    init: str = ""  # the stage-1 run: run:DIR[@STEP][:ema] ("" = the pruned weights: needs force)
    teacher: str = "release:tiny-teacher"  # the frozen full teacher
    mapping: Literal["simple", "next-block"] = "simple"
    w_visual: float = 1.0  # MSE of image-token block outputs
    w_text: float = 1.0  # cosine distance of valid text-token block outputs
    w_teacher_flow: float = 1.0  # MSE of the student's velocity against the teacher's
    w_flow: float = 1.0  # MSE of the student's velocity against the ground-truth flow
    force: bool = False  # start without a passed stage 1 (the paper found stage 2 alone fails)


def block_targets(kept: Sequence[int], num_teacher_blocks: int, mapping: str) -> list[tuple[int, str]]:
    """For student block ``i``: ``(teacher tap index, "out" | "in")`` whose tensors it is matched to.

    ``simple``: the output of the teacher block it was copied from, ``(kept[i], "out")``. ``next-block``: the
    input of the next kept teacher block, ``(kept[i + 1], "in")``; the last student block (the teacher's last)
    matches the teacher's last output.
    """
    if mapping not in MAPPINGS:
        raise PruningError(f"mapping must be one of {', '.join(MAPPINGS)}, got {mapping!r}")
    kept = [int(k) for k in kept]
    if mapping == "simple":
        return [(k, "out") for k in kept]
    return [(kept[i + 1], "in") if i + 1 < len(kept) else (num_teacher_blocks - 1, "out") for i in range(len(kept))]


def _masked_cos_distance(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
    """Per sample: mean over valid tokens of ``1 - cos(a, b)`` (0 for a sample with no valid token)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)
    m = mask.astype(jnp.float32)
    return jnp.sum((1.0 - cos) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def recovery_terms(student, teacher, inp: FlowInputs, targets: Sequence[tuple[int, str]]) -> dict[str, jax.Array]:
    """The four per-sample terms of stage 2 on one group's inputs: ``visual`` (block output MSE), ``text``
    (block output cosine distance over valid text tokens), ``teacher_flow`` and ``flow``."""
    args = (inp.clips, inp.cond.tokens, inp.cond.mask, inp.cond.pooled, inp.timestep)
    v_s, taps_s = student(*args, return_taps=True)
    v_t, taps_t = jax.tree.map(jax.lax.stop_gradient, teacher(*args, return_taps=True))
    if len(targets) > len(taps_s):
        raise PruningError(f"{len(targets)} block targets for a {len(taps_s)}-block student")
    vis, txt, n_txt = 0.0, 0.0, 0
    for tap, (j, side) in zip(taps_s, targets):  # fewer targets than blocks: only the first blocks are matched
        ref = taps_t[j]
        vis = vis + per_sample_mse(tap["img_out"], ref[f"img_{side}"])
        if tap["txt_out"] is not None and ref[f"txt_{side}"] is not None:
            txt = txt + _masked_cos_distance(tap["txt_out"], ref[f"txt_{side}"], inp.cond.mask)
            n_txt += 1
    b = v_s.shape[0]
    return {
        "visual": vis / len(targets),
        "text": txt / n_txt if n_txt else jnp.zeros((b,), jnp.float32),
        "teacher_flow": per_sample_mse(v_s, v_t),
        "flow": per_sample_mse(v_s, inp.target),
    }


def check_curriculum(init: str, force: bool) -> None:
    """Refuse a stage-2 student that did not pass stage 1 (a ``run:`` of ``recover-flow``) unless ``force``."""
    how = (f"start stage 2 from a {STAGE1} run (stages.{STAGE2}.init=run:DIR[@STEP][:ema]); stages.{STAGE2}."
           f"force=true starts anyway (the paper found stage 2 without stage 1 fails)")
    src = parse_source(init) if init else None
    if src is None or src.kind != "run":
        if not force:
            raise PruningError(f"the student init {init or '(the pruned weights)'!r} has not passed stage 1: {how}")
        return
    run_dir = Path(src.path)
    run_dir = run_dir.parent if run_dir.name == "checkpoints" else run_dir
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise PruningError(f"stage-2 init {init!r}: {run_dir} is not a training run (no config.json)")
    stage = json.loads(cfg_path.read_text()).get("train", {}).get("stage")
    if stage != STAGE1 and not force:
        raise PruningError(f"stage-2 init {init!r} is a run of stage {stage!r}, not {STAGE1!r}: {how}")


class RecoverDistill(FlowMatchingStage):
    """Stage 2: the student (role ``student``) against the frozen full teacher (role ``teacher``)."""

    name = STAGE2
    settings_class = RecoverDistillSettings

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        s = self.settings
        self.num_teacher_blocks = cfg.model.mmdit.num_layers
        self.kept = student_blocks(s, self.num_teacher_blocks)
        self.targets = block_targets(self.kept, self.num_teacher_blocks, s.mapping)
        if cfg.train.trainable_blocks:
            raise PruningError("train.trainable_blocks is not supported by the recovery stages")
        check_curriculum(s.init, s.force)

    def student_init(self) -> str:
        s = self.settings
        if s.init:
            return s.init
        return f"official:{s.student}" if s.student else f"prune:teacher[{','.join(map(str, self.kept))}]"

    def roles(self, cfg: Config):
        return {"teacher": Frozen(self._mmdit, init=self.settings.teacher),
                "student": Trained(self._mmdit, overrides=student_overrides(self.kept), init=self.student_init())}

    def loss_fns(self, trainable, frozen, batch, rng):
        s = self.settings
        weights = {"visual": s.w_visual, "text": s.w_text, "teacher_flow": s.w_teacher_flow, "flow": s.w_flow}
        graphdef, params, rest = nnx.split(trainable["student"], nnx.Param, ...)
        teacher = frozen["teacher"]
        fb = self.flow_batch(batch)
        k_plan, k_loss = jax.random.split(rng)

        def loss_for(groups):
            def run(p):
                student = nnx.merge(graphdef, p, rest)

                def group_loss(sub, key, g):
                    inp = flow_matching_inputs(sub, key, schedule=self.schedule, stage=g.stage, unit=g.unit)
                    terms = recovery_terms(student, teacher, inp, self.targets)
                    total = sum(weights[k] * v for k, v in terms.items())
                    return total, {f"term/{k}": v for k, v in terms.items()}

                return grouped_loss(group_loss, fb, k_loss, groups=groups)

            return run

        return self.variants(jnp.shape(batch["latents"])[0]), loss_for, params, k_plan

    def loss(self, trainable, frozen, batch, rng):
        variants, loss_for, params, k_plan = self.loss_fns(trainable, frozen, batch, rng)
        (loss, metrics), i = switch_value_and_grad(variants, k_plan, loss_for, params)
        tops = jnp.asarray([g[-1].unit for g in variants], jnp.float32)
        return loss, dict(metrics, pyramid_unit=tops[i])


def is_recovery_run(run_dir: str | Path) -> str | None:
    """The recovery stage a run folder trained (None if it is not one)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    stage = json.loads(path.read_text()).get("train", {}).get("stage")
    return stage if stage in (STAGE1, STAGE2) else None


__all__ = ["MAPPINGS", "PruningError", "RecoverDistill", "RecoverDistillSettings", "RecoverFlow",
           "RecoverFlowSettings", "block_targets", "check_curriculum", "pruned_folder_blocks", "recovery_terms",
           "student_blocks", "student_overrides"]
