"""Optax chain from :class:`~neodragon_jax.config.train_schema.OptimConfig`.

``clip_by_global_norm -> adamw`` (decoupled weight decay, masked off biases / norms / 1-D tensors) with a
linear-warmup + cosine schedule. The EMA of the trained weights is an explicit tree in the train state
(``train.state``), not an optax transform, so it is checkpointed and read for sampling by name.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from flax import traverse_util

from neodragon_jax.config.train_schema import OptimConfig
from neodragon_jax.layers.core import LOGICAL_AXES

_NO_DECAY_NAMES = ("bias", "scale", "norm", "embedding_norm")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup ``0 -> lr`` over ``warmup_steps``, then cosine to ``lr * end_lr_ratio`` (or constant)."""
    if cfg.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {cfg.lr}")
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        decay = cfg.decay_steps or max(1, total_steps - cfg.warmup_steps)
        main = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.end_lr_ratio)
    if cfg.warmup_steps <= 0:
        return main
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def decay_mask(abstract_params: nnx.State) -> dict:
    """Pure-dict bool tree: True where weight decay applies (matrices/kernels, never biases or norms)."""
    flat = {}
    for path, var in nnx.to_flat_state(abstract_params):
        value = var.get_value() if hasattr(var, "get_value") else var[...]
        axes = var.get_metadata().get(LOGICAL_AXES) or ()
        name = str(path[-1]).lower()
        is_norm = "norm" in axes or any(n in name for n in _NO_DECAY_NAMES) or any(
            "norm" in str(p).lower() for p in path[:-1]
        )
        flat[tuple(path)] = bool(value.ndim >= 2 and not is_norm)
    return traverse_util.unflatten_dict(flat)


def make_optimizer(cfg: OptimConfig, total_steps: int, mask: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its learning-rate schedule (for logging)."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=mask if cfg.weight_decay > 0 else None,
        )
    )
    return optax.chain(*parts), schedule


def freeze_unmasked(tx: optax.GradientTransformation, trainable_mask: Any) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``trainable_mask`` is True; the others get exactly zero updates.

    ``optax.multi_transform`` with ``set_to_zero``: the frozen leaves hold no optimizer moments and, with
    decoupled weight decay inside ``tx``, are not decayed either.
    """
    labels = jax.tree.map(lambda m: "train" if m else "frozen", trainable_mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` in float32 master precision."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)
