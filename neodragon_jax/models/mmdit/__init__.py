"""Pyramidal MMDiT denoiser (spec §2): joint blocks, block taps, pruning-aware block list."""

from neodragon_jax.models.mmdit.model import (
    REMAT_POLICIES,
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    FeedForward,
    JointTransformerBlock,
    PyramidMMDiT,
    SequenceLayout,
    abstract_mmdit,
    init_mmdit,
    prune,
)

__all__ = [
    "REMAT_POLICIES", "AdaLayerNormContinuous", "AdaLayerNormZero", "FeedForward", "JointTransformerBlock",
    "PyramidMMDiT", "SequenceLayout", "abstract_mmdit", "init_mmdit", "prune",
]
