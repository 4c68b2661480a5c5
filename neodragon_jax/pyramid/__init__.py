"""Pyramidal flow matching: schedule, stage jumps, temporal-pyramid history, training loss, samplers."""

from neodragon_jax.pyramid.history import (
    HistoryClip,
    build_history,
    clip_shapes,
    history_layout,
    image_token_count,
    num_units,
    unit_frames,
)
from neodragon_jax.pyramid.loss import (
    LossGroup,
    TextCondition,
    apply_text_dropout,
    flow_matching_loss,
    null_text_condition,
    plan_loss_groups,
    pyramid_flow_matching_loss,
    stage_assignment,
)
from neodragon_jax.pyramid.pyramids import downsample_2x, latent_pyramid, noise_pyramid, upsample_2x
from neodragon_jax.pyramid.sampler import (
    PyramidSampler,
    SampleOutput,
    count_nfe,
    sample_video,
    sampling_keys,
    sampling_noise,
    unit_settings,
)
from neodragon_jax.pyramid.scheduler import PyramidSchedule, block_noise, make_schedule, stage_jump

__all__ = [
    "HistoryClip",
    "LossGroup",
    "PyramidSampler",
    "PyramidSchedule",
    "SampleOutput",
    "TextCondition",
    "apply_text_dropout",
    "block_noise",
    "build_history",
    "clip_shapes",
    "count_nfe",
    "downsample_2x",
    "flow_matching_loss",
    "history_layout",
    "image_token_count",
    "latent_pyramid",
    "make_schedule",
    "noise_pyramid",
    "null_text_condition",
    "num_units",
    "plan_loss_groups",
    "pyramid_flow_matching_loss",
    "sample_video",
    "sampling_keys",
    "sampling_noise",
    "stage_assignment",
    "stage_jump",
    "unit_frames",
    "unit_settings",
    "upsample_2x",
]
