"""The ``flow`` training stage: pyramidal flow matching of the MMDiT on pre-extracted records (spec §3.4-3.5).

Models: trained ``{"mmdit": PyramidMMDiT(cfg.model.mmdit)}``, frozen ``{}`` (text features and VAE latents
are pre-extracted by :func:`extract_records`). ``train.trainable_blocks`` trains a subset of the blocks:
every other parameter gets exactly zero updates and no optimizer state (``trainable_mask`` ->
``optax.multi_transform`` with ``set_to_zero`` in the engine) and no weight gradient is computed for it
(``stop_gradient`` in the loss). ``train.init_checkpoint`` starts from official-layout weights.

Batch (one row per video; shapes from the config, ``T`` latent frames of ``h x w``):
  ``latents [B, C, T, h, w]`` normalised VAE latents; ``text_tokens [B, S, D]``; ``text_mask [B, S]``;
  ``pooled [B, P]``; ``null_text_tokens [B, S, D]``, ``null_text_mask [B, S]``, ``null_pooled [B, P]``:
  the empty-prompt conditioning for the 10% CFG text dropout. Records carry their own copy of it (the
  engine's batches are per-example); the loss uses row 0. Records without ``null_*`` use the cache's
  ``null_text.npz`` beside the ``records/`` folder (``neodragon_jax.data.extract`` layout) as a constant of
  the step, or else the loss module's mask-based null condition.

Static shapes: a step trains one (stage, unit) group per stage column (``plan_loss_groups``); the unit
decides every clip shape. With complementary unit sampling a step's whole layout is fixed by the finest
stage's unit ``u``, so there are ``U`` layouts (``U`` = latent frames). The loss holds all of them as
branches of one ``lax.switch`` and draws ``u`` from the step key inside the compiled step: one compiled
program, only the drawn branch runs, and a resumed run draws the same units. Each branch runs its own
forward and backward (:func:`switch_value_and_grad`), so activation memory is the largest layout's, not
the sum. ``train.pyramid_units`` restricts the branches (faster compiles; a plan of one layout). The loss
of a layout is :func:`grouped_flow_matching_loss`: ``pyramid_flow_matching_loss``'s computation with each
stage column's rows taken shard-locally (:func:`take_rows`).

"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from neodragon_jax.config import Config
from neodragon_jax.layers.core import as_dtype
from neodragon_jax.models.mmdit import PyramidMMDiT
from neodragon_jax.pyramid.history import image_token_count, num_units
from neodragon_jax.pyramid.loss import NULL_KEYS, PER_SAMPLE_KEYS, LossGroup, flow_matching_loss, stage_assignment
from neodragon_jax.pyramid.scheduler import PyramidSchedule, make_schedule
from neodragon_jax.sharding import constrain
from train.roles import RoleStage, Trained

log = logging.getLogger(__name__)

BATCH_KEYS = PER_SAMPLE_KEYS + NULL_KEYS


# ---------------------------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class FlowGeometry:
    """Per-example shapes the stage trains on: latents ``[C, T, h, w]``, text ``[S, D]``, pooled ``[P]``."""

    channels: int
    frames: int
    height: int
    width: int
    text_len: int
    text_dim: int
    pooled_dim: int

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.channels, self.frames, self.height, self.width)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shape of every batch key."""
        return {
            "latents": self.latent_shape,
            "text_tokens": (self.text_len, self.text_dim),
            "text_mask": (self.text_len,),
            "pooled": (self.pooled_dim,),
            "null_text_tokens": (self.text_len, self.text_dim),
            "null_text_mask": (self.text_len,),
            "null_pooled": (self.pooled_dim,),
        }


def flow_geometry(cfg: Config) -> FlowGeometry:
    """Shapes implied by ``cfg.video``, the VAE factors, the pyramid and the text stack; clear errors."""
    vae = cfg.model.vae.causal
    m = cfg.model.mmdit
    v = cfg.video
    tf, sf = vae.temporal_factor, vae.spatial_factor
    if (v.num_frames - 1) % tf:
        raise ValueError(
            f"video.num_frames={v.num_frames}: the causal VAE needs 1 + {tf}k frames (e.g. {1 + tf}, 49)"
        )
    if v.height % sf or v.width % sf:
        raise ValueError(f"video {v.height}x{v.width} is not a multiple of the VAE's spatial factor {sf}")
    h, w = v.height // sf, v.width // sf
    need = 2 ** (cfg.pyramid.num_stages - 1) * m.patch_size
    if h % need or w % need:
        raise ValueError(
            f"latent size {h}x{w} must be a multiple of {need} (2**(num_stages-1) x patch_size) so that the "
            f"coarsest pyramid stage still patchifies; change video.height/width"
        )
    if m.in_channels != vae.latent_channels:
        raise ValueError(
            f"model.mmdit.in_channels={m.in_channels} but the VAE has {vae.latent_channels} latent channels"
        )
    t = cfg.model.text
    want_dim = m.context_in_dim or m.hidden_size
    if t.token_dim != want_dim:
        raise ValueError(
            f"text tokens are {t.token_dim}-d (model.text.kind={t.kind!r}) but the MMDiT takes {want_dim}-d "
            f"text (context_in_dim={m.context_in_dim}, hidden_size={m.hidden_size})"
        )
    if t.pooled_dim != m.pooled_dim:
        raise ValueError(f"pooled text is {t.pooled_dim}-d but model.mmdit.pooled_dim={m.pooled_dim}")
    return FlowGeometry(m.in_channels, 1 + (v.num_frames - 1) // tf, h, w, t.max_length, t.token_dim, t.pooled_dim)


# ----------------------------------------------------------------------------------------- group layouts
def group_variants(
    batch_size: int, num_frames: int, schedule: PyramidSchedule, units: Sequence[int] = ()
) -> tuple[tuple[LossGroup, ...], ...]:
    """Every group plan ``plan_loss_groups(..., unit_sampling="complementary")`` can return, one per
    finest-stage unit ``u`` (``units``: only those ``u``; empty = all ``U``): stages from
    ``stage_assignment``, unit ``u`` for the finest stage and ``U - 1 - u`` for the others."""
    U = num_units(num_frames, schedule.frames_per_unit)
    tops = tuple(int(u) for u in units) or tuple(range(U))
    bad = [u for u in tops if not 0 <= u < U]
    if bad:
        raise ValueError(f"train.pyramid_units {list(bad)} out of range: a {num_frames}-frame latent has units 0..{U - 1}")
    if len(set(tops)) != len(tops):
        raise ValueError(f"train.pyramid_units has repeated units: {list(tops)}")
    stages = stage_assignment(batch_size, schedule.stage_sample_ratios)
    S = schedule.num_stages
    out = []
    for top in tops:
        per_stage = [U - 1 - top] * (S - 1) + [top]
        groups = []
        for st in range(S):
            idx = tuple(i for i, g in enumerate(stages) if g == st)
            if idx:
                groups.append(LossGroup(stage=st, unit=per_stage[st], indices=idx))
        out.append(tuple(groups))
    return tuple(out)


def switch_value_and_grad(variants: Sequence[Any], key: jax.Array, loss_for: Callable[[Any], Callable], params: Any):
    """``loss_for(variants[i])(params) -> (losses, metrics)`` for ``i ~ U{0..len-1}`` drawn from ``key``,
    differentiable w.r.t. ``params``; returns ``((losses, metrics), i)``.

    Every variant (static layout) is a branch of one ``lax.switch``: one compiled program, only the drawn
    branch runs. Why not simply differentiate the switch: JAX's autodiff of ``lax.switch`` keeps the
    residuals of EVERY branch alive between forward and backward (it shares an output slot only between
    same-shaped residuals, and different layouts have different shapes), so activation memory would be the
    SUM over layouts. Here each branch computes its own forward AND backward (a ``custom_vjp`` whose only
    residual is the gradient), so memory is the MAX over layouts.

    ``losses``: a scalar (gradient w.r.t. all of ``params``) or a dict ``{name: scalar}`` with ``params``
    a dict of the same names, where each entry differentiates only ``params[name]`` (the engine's contract
    for dict losses; cross terms are not computed).
    """
    n = len(variants)
    idx = jax.random.randint(key, (), 0, n) if n > 1 else jnp.zeros((), jnp.int32)

    def pick(branches, *args):
        return branches[0](*args) if n == 1 else jax.lax.switch(idx, branches, *args)

    def with_grads(v):
        def run(p):
            losses, vjp_fn, metrics = jax.vjp(loss_for(v), p, has_aux=True)
            if isinstance(losses, dict):
                grads = {}
                for name in p:
                    if name in losses:
                        ct = {k: jnp.ones_like(x) if k == name else jnp.zeros_like(x) for k, x in losses.items()}
                        grads[name] = vjp_fn(ct)[0][name]
                    else:
                        grads[name] = jax.tree.map(jnp.zeros_like, p[name])
            else:
                grads = vjp_fn(jnp.ones_like(losses))[0]
            return (losses, metrics), grads

        return run

    @jax.custom_vjp
    def f(p):
        return pick([loss_for(v) for v in variants], p)

    def f_fwd(p):
        return pick([with_grads(v) for v in variants], p)

    def f_bwd(grads, ct):
        ct_losses = ct[0]

        def scale(c, g):
            return jax.tree.map(lambda x: (c * x).astype(x.dtype), g)

        if isinstance(ct_losses, dict):
            return ({name: scale(ct_losses[name], g) if name in ct_losses else g for name, g in grads.items()},)
        return (scale(ct_losses, grads),)

    f.defvjp(f_fwd, f_bwd)
    return f(params), idx


def take_rows(x: jax.Array, indices: Sequence[int]) -> jax.Array:
    """``x[indices]`` along axis 0, as reshape + slice when ``indices`` repeat a contiguous column range with
    a period dividing the batch (what ``stage_assignment`` produces), else a gather.

    Why: a batch-sharded array indexed by a static gather is, in general, all-gathered onto every device
    first (the whole global batch in each device's temporaries: GiBs at full size); with 4 examples per
    device the period-4 stage columns are rows each device already holds, and reshape + slice keeps them
    there.
    """
    idx = np.asarray(indices, np.int64)
    B = x.shape[0]
    for period in range(1, B + 1):
        if B % period:
            continue
        cols = idx[idx < period]
        if not len(cols) or not np.array_equal(cols, np.arange(cols[0], cols[-1] + 1)):
            continue
        if np.array_equal(idx, (np.arange(B // period)[:, None] * period + cols[None]).ravel()):
            y = x.reshape((B // period, period) + x.shape[1:])[:, int(cols[0]) : int(cols[-1]) + 1]
            return y.reshape((-1,) + x.shape[1:])
    return x[idx]


def grouped_loss(group_loss: Callable, batch, rng, *, groups: Sequence[LossGroup]):
    """The batch mean of a per-sample loss computed group by group, each group's rows taken by
    :func:`take_rows` (a sharded batch is not gathered onto every device) with key ``fold_in(rng, gi)``.

    ``group_loss(sub_batch, key, group) -> (per_sample [b], terms {name: per_sample [b]})``. Returns
    ``(loss, metrics)`` with ``loss/stageK`` (mean over that stage's samples) and each term's batch mean.
    """
    per_sample, per_stage, terms = [], {}, {}
    for gi, g in enumerate(groups):
        sub = {k: (take_rows(v, g.indices) if k in PER_SAMPLE_KEYS else v) for k, v in batch.items()}
        ps, t = group_loss(sub, jax.random.fold_in(rng, gi), g)
        per_sample.append(ps)
        per_stage.setdefault(g.stage, []).append(ps)
        for name, v in t.items():
            terms.setdefault(name, []).append(v)
    metrics = {f"loss/stage{st}": jnp.mean(jnp.concatenate(v)) for st, v in sorted(per_stage.items())}
    metrics.update({name: jnp.mean(jnp.concatenate(v)) for name, v in terms.items()})
    return jnp.mean(jnp.concatenate(per_sample)), metrics


def grouped_flow_matching_loss(model, batch, rng, *, schedule: PyramidSchedule, groups: Sequence[LossGroup]):
    """``pyramid_flow_matching_loss`` (same groups, same per-group keys ``fold_in(rng, group_index)``, same
    per-sample flow-matching loss and batch mean; a test checks they agree) through :func:`grouped_loss`.
    Returns ``(loss, {loss/stageK})``.
    """

    def group_loss(sub, key, g):
        _, aux = flow_matching_loss(model, sub, key, schedule=schedule, stage=g.stage, unit=g.unit)
        return aux["loss_per_sample"], {}

    return grouped_loss(group_loss, batch, rng, groups=groups)


def _sharded_model(model: nnx.Module) -> Callable:
    """The MMDiT call with its inputs and output pinned batch-sharded.

    The loss gathers each stage column's rows with a static index (a gather XLA may leave replicated); the
    constraint makes the expensive part, the MMDiT, run on batch shards whatever the gather produced.
    """

    def fn(clips, tokens, mask, pooled, t):
        clips = [constrain(c, ("batch", None, None, None, None)) for c in clips]
        tokens = constrain(tokens, ("batch", None, None))
        v = model(clips, tokens, mask, pooled, t)
        return constrain(v, ("batch", None, None, None, None))

    return fn


class _KeyStream:
    """Parameter keys folded from one key drawn from the engine's ``nnx.Rngs``.

    Building the 2B-parameter MMDiT with ``nnx.Rngs`` under ``eval_shape``/``jit`` updates a traced counter
    per parameter, which is slow (see ``models/mmdit/model.py``); a Python counter is not.
    """

    def __init__(self, rngs: nnx.Rngs):
        self._key = rngs.params()
        self._n = 0

    def params(self) -> jax.Array:
        self._n += 1
        return jax.random.fold_in(self._key, self._n)

    __call__ = params


def _block_index(path: Sequence[Any]) -> int | None:
    if len(path) > 1 and str(getattr(path[0], "key", path[0])) == "transformer_blocks":
        return int(getattr(path[1], "key", path[1]))
    return None


def _stop_gradient_where(model: nnx.Module, trainable: Callable[[tuple], bool]) -> None:
    """Replace (in the traced module) every parameter whose path is not ``trainable`` by its stop_gradient."""
    state = nnx.state(model, nnx.Param)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    flat = {p: (v if trainable(p) else jax.lax.stop_gradient(v)) for p, v in flat.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)


def _dtype(key: str) -> str:
    return "int32" if key.endswith("mask") else "float32"


def _record_keys(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """``{key: (shape, dtype)}`` of the first record when training from records, else None."""
    if cfg.data.source != "records" or not cfg.data.path:
        return None
    from train.data import NpzRecords

    first = NpzRecords(cfg.data.path)[0]
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in first.items()}


def _dataset_null_text(records_path: str, shapes: dict) -> dict[str, np.ndarray] | None:
    """The empty prompt's features stored once for a whole cache, ``null_text.npz`` beside the records folder
    (or file): the layout of ``neodragon_jax.data.extract``: ``[1, S, D]``, ``[1, S]``, ``[1, P]``; None if absent
    (the loss then uses its mask-based null condition)."""
    path = Path(records_path).absolute().parent / "null_text.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        missing = [k for k in NULL_KEYS if k not in z.files]
        if missing:
            raise KeyError(f"{path} lacks {missing}")
        out = {k: np.asarray(z[k]) for k in NULL_KEYS}
    wrong = {k: v.shape for k, v in out.items() if v.shape not in ((1,) + shapes[k], shapes[k])}
    if wrong:
        raise ValueError(f"{path}: shapes {wrong} do not match the records' text features {({k: shapes[k] for k in wrong})}")
    return {k: (v if v.shape[0] == 1 and v.ndim == len(shapes[k]) + 1 else v[None]) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ stage
@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """``cfg.stages.flow``. The stage's other options are the older ``train.*`` keys (``trainable_blocks``,
    ``pyramid_units``, ``init_checkpoint``), kept where the CLI and the demo set them."""

    # Init source of the MMDiT (``train/weights.py`` spec: ``official:DIR``, ``run:DIR@STEP:ema``, ...);
    # empty = ``official:<train.init_checkpoint>`` when that is set, else random.
    init: str = ""


def mmdit_init(cfg: Config, spec: str) -> str:
    """A role's init source: ``spec``, else the official weights of ``train.init_checkpoint``, else random."""
    if spec:
        return spec
    return f"official:{cfg.train.init_checkpoint}" if cfg.train.init_checkpoint else "random"


class FlowMatchingStage(RoleStage):
    """Pyramidal flow matching of ``PyramidMMDiT(cfg.model.mmdit)`` (see the module docstring)."""

    name = "flow"
    settings_class = FlowSettings

    def __init__(self, cfg: Config):
        self.settings = cfg.stages.get_settings(self.name)
        self.schedule = make_schedule(cfg.pyramid)
        self.geometry = flow_geometry(cfg)
        n = cfg.model.mmdit.num_layers
        blocks = tuple(int(b) for b in cfg.train.trainable_blocks)
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise ValueError(f"train.trainable_blocks {bad} out of range: the MMDiT has blocks 0..{n - 1}")
        self.trainable_blocks = frozenset(blocks) if blocks else None
        self.units = tuple(cfg.train.pyramid_units)
        group_variants(4, self.geometry.frames, self.schedule, self.units)  # validates the units now
        self.null_text: dict[str, np.ndarray] | None = None  # dataset-wide empty prompt (null_text.npz)
        self.with_null = self._check_records(cfg)

    # -- roles -------------------------------------------------------------------------------------------
    def _mmdit(self, cfg: Config, rngs: nnx.Rngs) -> PyramidMMDiT:
        return PyramidMMDiT(cfg.model.mmdit, dtype=as_dtype(cfg.precision.dtype),
                            param_dtype=as_dtype(cfg.precision.param_dtype), rngs=_KeyStream(rngs))

    def roles(self, cfg: Config):
        return {"mmdit": Trained(self._mmdit, init=mmdit_init(cfg, self.settings.init),
                                 mask=lambda c, p: self.trainable_mask(c, "mmdit", p))}

    def is_trainable(self, path: Sequence[Any]) -> bool:
        """Whether the parameter at ``path`` (pure-dict keys) trains under ``train.trainable_blocks``."""
        if self.trainable_blocks is None:
            return True
        b = _block_index(path)
        return b is not None and b in self.trainable_blocks

    def trainable_mask(self, cfg: Config, name: str, abstract_params: nnx.State):
        if self.trainable_blocks is None:
            return None
        flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_params))
        return traverse_util.unflatten_dict({p: self.is_trainable(p) for p in flat})

    # -- data --------------------------------------------------------------------------------------------
    def _check_records(self, cfg: Config) -> bool:
        """Validate the first record against the config; returns whether records carry ``null_*``."""
        keys = _record_keys(cfg)
        if keys is None:
            return True
        want = self.geometry.shapes()
        missing = [k for k in PER_SAMPLE_KEYS if k not in keys]
        if missing:
            raise KeyError(f"records in {cfg.data.path} lack {missing}; write them with train.flow_matching.extract_records")
        has_null = [k in keys for k in NULL_KEYS]
        if any(has_null) and not all(has_null):
            raise KeyError(f"records in {cfg.data.path} have only some of {NULL_KEYS}: give all or none")
        wrong = {k: (keys[k][0], want[k]) for k in BATCH_KEYS if k in keys and keys[k][0] != want[k]}
        if wrong:
            desc = ", ".join(f"{k} is {got}, the config implies {exp}" for k, (got, exp) in wrong.items())
            raise ValueError(
                f"records in {cfg.data.path} do not match the config: {desc}. Set video.num_frames/height/"
                f"width and model.text to what the records were extracted with (or re-extract them)"
            )
        bad_dtype = {k: keys[k][1] for k in BATCH_KEYS if k in keys and keys[k][1] != _dtype(k)}
        if bad_dtype:
            raise ValueError(
                f"records in {cfg.data.path} store {bad_dtype}; the step takes float32 features and int32 masks"
            )
        if not all(has_null):
            self.null_text = _dataset_null_text(cfg.data.path, want)
        return all(has_null)

    def batch_keys(self) -> tuple[str, ...]:
        return BATCH_KEYS if self.with_null else PER_SAMPLE_KEYS

    def example_batch(self, cfg: Config, global_batch: int):
        shapes = self.geometry.shapes()
        return {k: jax.ShapeDtypeStruct((global_batch,) + shapes[k], _dtype(k)) for k in self.batch_keys()}

    def batch_logical_axes(self, cfg: Config):
        return {k: ("batch",) + (None,) * len(self.geometry.shapes()[k]) for k in self.batch_keys()}

    def num_examples(self, cfg: Config) -> int:
        return cfg.data.num_synthetic

    def make_example(self, cfg: Config, index: int) -> dict[str, np.ndarray]:
        """Synthetic record: unit-variance latents, random text features with a random real length."""
        return synthetic_record(self.geometry, cfg.data.seed, index)

    def tokens_per_example(self, cfg: Config) -> int:
        """Mean tokens (image tokens of history + current clip, plus the S text tokens) the MMDiT processes
        per example, averaged over the stage columns and the compiled unit layouts."""
        g = self.geometry
        ratios = self.schedule.stage_sample_ratios
        S = self.schedule.num_stages
        U = num_units(g.frames, self.schedule.frames_per_unit)
        tops = self.units or tuple(range(U))
        total = 0.0
        for top in tops:
            for st in range(S):
                unit = top if st == S - 1 else U - 1 - top
                n = image_token_count(unit, st, num_stages=S, latent_hw=(g.height, g.width),
                                      patch_size=cfg.model.mmdit.patch_size, frames_per_unit=self.schedule.frames_per_unit)
                total += ratios[st] / sum(ratios) * n
        return int(round(total / len(tops))) + g.text_len

    # -- loss --------------------------------------------------------------------------------------------
    def variants(self, batch_size: int) -> tuple[tuple[LossGroup, ...], ...]:
        return group_variants(batch_size, self.geometry.frames, self.schedule, self.units)

    def flow_batch(self, batch) -> dict:
        """The per-sample keys plus the empty-prompt condition (the records' row 0, else the dataset's
        ``null_text.npz``, else none: the loss's mask-based null condition)."""
        fb = {k: batch[k] for k in PER_SAMPLE_KEYS}
        if self.with_null and all(k in batch for k in NULL_KEYS):
            fb.update({k: batch[k][:1] for k in NULL_KEYS})
        elif self.null_text is not None:
            fb.update({k: jnp.asarray(v) for k, v in self.null_text.items()})
        return fb

    def loss_fns(self, trainable, frozen, batch, rng):
        """``(variants, loss_for, params, plan_key)``: ``loss_for(variant)(params) -> (loss, metrics)`` is the
        loss of one static layout as a function of the trained parameters (nnx.State per model)."""
        graphdef, params, rest = nnx.split(trainable["mmdit"], nnx.Param, ...)
        b = jnp.shape(batch["latents"])[0]
        fb = self.flow_batch(batch)
        k_plan, k_loss = jax.random.split(rng)

        def loss_for(groups):
            def run(p):
                model = nnx.merge(graphdef, p, rest)
                if self.trainable_blocks is not None:
                    # No weight gradients for frozen parameters: XLA drops their backward matmuls.
                    _stop_gradient_where(model, self.is_trainable)
                return grouped_flow_matching_loss(_sharded_model(model), fb, k_loss, schedule=self.schedule,
                                                  groups=groups)

            return run

        return self.variants(b), loss_for, params, k_plan

    def loss(self, trainable, frozen, batch, rng):
        variants, loss_for, params, k_plan = self.loss_fns(trainable, frozen, batch, rng)
        (loss, metrics), i = switch_value_and_grad(variants, k_plan, loss_for, params)
        tops = jnp.asarray([g[-1].unit for g in variants], jnp.float32)
        return loss, dict(metrics, pyramid_unit=tops[i])

    def activation_bytes(self, cfg: Config, batch_size: int) -> dict[int, int]:
        """Bytes the backward pass keeps from the forward (residuals of the loss's vjp that are not its inputs:
        activations plus low-precision weight copies) for ``batch_size`` examples, per finest-stage unit
        layout. Traced abstractly (nothing allocated); global figures, before sharding."""
        abstract = {k: nnx.split(m) for k, m in nnx.eval_shape(lambda: self.build_trainable(cfg, nnx.Rngs(0))).items()}
        frozen = {k: nnx.split(m) for k, m in nnx.eval_shape(lambda: self.build_frozen(cfg, nnx.Rngs(1))).items()}
        batch = self.example_batch(cfg, batch_size)
        out = {}
        for v, groups in enumerate(self.variants(batch_size)):

            def residuals(states, frozen_states, batch, v=v):
                mods = {k: nnx.merge(abstract[k][0], states[k]) for k in states}
                fz = {k: nnx.merge(frozen[k][0], frozen_states[k]) for k in frozen_states}
                variants, loss_for, params, _ = self.loss_fns(mods, fz, batch, jax.random.key(0))
                return jax.vjp(loss_for(variants[v]), params, has_aux=True)[1]

            closed = jax.make_jaxpr(residuals)({k: s for k, (_, s) in abstract.items()},
                                               {k: s for k, (_, s) in frozen.items()}, batch)
            inputs = set(closed.jaxpr.invars)
            seen, total = set(), 0
            for var in closed.jaxpr.outvars:
                if isinstance(var, jax.extend.core.Literal) or var in inputs or var in seen:
                    continue
                seen.add(var)
                total += int(np.prod(var.aval.shape)) * np.dtype(var.aval.dtype).itemsize
            out[groups[-1].unit] = total
        return out


def synthetic_record(g: FlowGeometry, seed: int, index: int) -> dict[str, np.ndarray]:
    """One deterministic synthetic record (``seed``, ``index``) with the fields :func:`extract_records` writes."""
    rng = np.random.default_rng([seed, index])
    length = int(rng.integers(1, g.text_len + 1))
    mask = (np.arange(g.text_len) < length).astype(np.int32)
    null = np.random.default_rng([seed, 1 << 30])  # one empty-prompt encoding for the whole data set
    return {
        "latents": rng.standard_normal(g.latent_shape, dtype=np.float32),
        "text_tokens": rng.standard_normal((g.text_len, g.text_dim), dtype=np.float32) * mask[:, None].astype(np.float32),
        "text_mask": mask,
        "pooled": rng.standard_normal((g.pooled_dim,), dtype=np.float32),
        "null_text_tokens": null.standard_normal((g.text_len, g.text_dim), dtype=np.float32) * 0.1,
        "null_text_mask": (np.arange(g.text_len) < 1).astype(np.int32),
        "null_pooled": null.standard_normal((g.pooled_dim,), dtype=np.float32) * 0.1,
    }




# ------------------------------------------------------------------------------------- record extraction
def _video_to_model(video: np.ndarray) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` (as ``read_video`` returns) or float ``[3, F, H, W]`` in [-1, 1] -> float32
    ``[3, F, H, W]`` in [-1, 1]."""
    v = np.asarray(video)
    if v.ndim != 4:
        raise ValueError(f"a video must be uint8 [F, H, W, 3] or float [3, F, H, W], got shape {v.shape}")
    if v.dtype == np.uint8:
        if v.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be [F, H, W, 3], got shape {v.shape}")
        return np.transpose(v.astype(np.float32) / 127.5 - 1.0, (3, 0, 1, 2))
    if v.shape[0] != 3:
        raise ValueError(f"a float video must be [3, F, H, W] in [-1, 1], got shape {v.shape}")
    return v.astype(np.float32)


def extract_records(
    out_dir: str | Path,
    pairs: Iterable[tuple[np.ndarray, str]],
    cfg: Config,
    *,
    text=None,
    vae=None,
    tokenizers=None,
    seed: int = 0,
    null_text: bool = True,
    sample_posterior: bool = True,
) -> Path:
    """Encode ``(video, caption)`` pairs into the ``.npz`` records the ``flow`` stage trains on.

    ``video``: uint8 ``[F, H, W, 3]`` or float ``[3, F, H, W]`` in [-1, 1], exactly ``cfg.video``'s frames
    and size. Runs the tokenizers, the text conditioner (``text``) and the VAE encoder (``vae``); models not
    given are randomly initialised (tests only: a warning is logged). Each record (``out_dir/000000.npz``
    ...) holds ``latents [C, T, h, w]`` (posterior sample with key ``fold_in(seed, i)``, or the mean when
    ``sample_posterior=False``, then ``normalize_latents``), ``text_tokens [S, D]``, ``text_mask [S]``,
    ``pooled [P]``, ``caption`` and, with ``null_text``, the empty prompt's ``null_text_tokens``,
    ``null_text_mask``, ``null_pooled``. Returns ``out_dir``.
    """
    from neodragon_jax.models.build import init_jit
    from neodragon_jax.models.text.conditioner import TextConditioner
    from neodragon_jax.models.text.tokenizers import TextTokenizers
    from neodragon_jax.models.vae import CausalVideoVAE
    from neodragon_jax.models.vae.normalize import normalize_latents
    from train.data import write_npz_records

    g = flow_geometry(cfg)
    kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))
    if text is None:
        log.warning("extract_records: no text conditioner given, using RANDOM weights")
        text = init_jit(lambda: TextConditioner(cfg.model.text, rngs=nnx.Rngs(seed), **kw))
    if vae is None:
        log.warning("extract_records: no VAE given, using RANDOM weights")
        vae = init_jit(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(seed + 1), **kw))
    tokenizers = tokenizers or TextTokenizers.for_config(cfg.model.text)
    want = (3, cfg.video.num_frames, cfg.video.height, cfg.video.width)

    @nnx.jit
    def encode_text(model, t5_ids, t5_mask, l_ids, g_ids):
        tokens, mask, pooled = model(t5_ids, t5_mask, l_ids, g_ids)
        return tokens.astype(jnp.float32), mask, pooled.astype(jnp.float32)

    @nnx.jit
    def encode_video(model, video, key):
        post = model.encode(video)
        z = post.sample(key) if sample_posterior else post.mode()
        return normalize_latents(z.astype(jnp.float32), cfg.model.vae)

    def text_features(captions: list[str]):
        ids = tokenizers(captions)
        return [np.asarray(a) for a in encode_text(text, ids.t5_ids, ids.t5_mask, ids.clip_l_ids, ids.clip_g_ids)]

    null = {}
    if null_text:
        tok, mask, pooled = text_features([""])
        null = {"null_text_tokens": tok[0], "null_text_mask": mask[0].astype(np.int32), "null_pooled": pooled[0]}

    def records():
        base = jax.random.key(seed)
        for i, (video, caption) in enumerate(pairs):
            v = _video_to_model(video)
            if v.shape != want:
                raise ValueError(
                    f"video {i} ({caption[:40]!r}) is {v.shape[1]} frames of {v.shape[2]}x{v.shape[3]}; the config "
                    f"wants {want[1]} frames of {want[2]}x{want[3]} (video.num_frames/height/width)"
                )
            z = np.asarray(encode_video(vae, jnp.asarray(v[None]), jax.random.fold_in(base, i)))[0]
            assert z.shape == g.latent_shape, (z.shape, g.latent_shape)
            tok, mask, pooled = text_features([caption])
            yield {"latents": z, "text_tokens": tok[0], "text_mask": mask[0].astype(np.int32), "pooled": pooled[0],
                   "caption": np.asarray(caption), **null}

    return write_npz_records(out_dir, records())
