"""Frozen dataclass configs for the sharded training engine: mesh, run, optimiser, checkpoints, data.

Each is one section of the root :class:`~neodragon_jax.config.schema.Config` (``cfg.mesh``, ``cfg.train``,
``cfg.optim``, ``cfg.checkpoint``, ``cfg.data``), so dotted overrides such as ``mesh.data=2 mesh.fsdp=4`` or
``optim.lr=3e-4`` reach them. Mixed precision is not repeated here: ``cfg.precision`` (``dtype`` = compute,
``param_dtype`` = master weights) is what the stages build their models with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MESH_AXES = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``data x fsdp x tensor`` and the rule set that maps logical axes onto it.

    One of ``data``/``fsdp``/``tensor`` may be -1 to take the devices the others leave. ``dcn_*`` is the
    part of each axis that spans slices (multi-slice over DCN); the ICI part is ``axis / dcn_axis``. All 1 =
    a single slice. ``coordinator_address``/``num_processes``/``process_id`` are for multi-host runs
    (``jax.distributed.initialize``): ``distributed='auto'`` lets JAX read them from the TPU/SLURM
    environment, ``'on'`` uses the values given here, ``'off'`` is a single process.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: Literal["dp", "fsdp", "fsdp_sp", "fsdp_tp"] = "fsdp"
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # Unannotated parameters with at least this many elements are sharded on their largest divisible dim.
    min_shard_elements: int = 1 << 16
    distributed: Literal["off", "auto", "on"] = "off"
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0

    def shape(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def dcn_shape(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}") for a in MESH_AXES}


@dataclass(frozen=True)
class TrainConfig:
    """One training run: which stage, how long, batch sizes, logging and profiling."""

    stage: str = "toy"
    steps: int = 1000
    global_batch: int = 8
    # Gradient accumulation: the global batch is split into this many micro-batches, scanned in one step.
    micro_batches: int = 1
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = True
    # Profile steps [profile_start, profile_start + profile_steps) into <output_dir>/profile; -1 = off.
    profile_start: int = -1
    profile_steps: int = 3
    # Per-device peak FLOP/s for MFU; 0 = measure with a matmul microbenchmark at start-up.
    peak_flops: float = 0.0
    # Official-layout weights (safetensors file or folder) that the stage's trained/frozen models start from;
    # empty = random init. Read by the stage's ``load_weights`` hook.
    init_checkpoint: str = ""
    # Indices of the MMDiT blocks that train; empty = the whole model. With a subset, every other parameter
    # (other blocks, embedders, output layer) is frozen: zero updates, no optimizer state.
    trainable_blocks: tuple[int, ...] = ()
    # Pyramid stages: finest-stage units the step may draw (complementary unit sampling, one compiled
    # branch each); empty = every unit of the clip.
    pyramid_units: tuple[int, ...] = ()
    # Wall-clock budget of one invocation in seconds (start-up and compilation included); 0 = none. When it
    # runs out the loop checkpoints the step it reached and stops early, so a time-boxed job (a lent
    # accelerator, a preemptible slot) ends with its work saved; a later invocation resumes from there.
    time_limit_s: float = 0.0
    # Per-run init sources of a stage's roles, ``ROLE=SOURCE`` (``train/weights.py``: ``official:DIR``,
    # ``run:DIR@STEP[:ema]#SUBTREE``, ``npz:FILE``, ``prune:ROLE[i,j]``, ``random``); overrides the stage's own.
    role_init: tuple[str, ...] = ()


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (decoupled weight decay, biases/norms excluded) + warmup/cosine + clipping + EMA."""

    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    # Cosine length after warmup; 0 = until train.steps.
    decay_steps: int = 0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # global-norm clipping; 0 = off
    ema_decay: float = 0.0  # EMA of trained weights; 0 = no EMA tree


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: async saves every ``every_steps``, keep the latest N plus every K-th step."""

    directory: str = ""  # empty = <train.output_dir>/checkpoints
    every_steps: int = 100
    keep_latest: int = 2
    keep_every: int = 0  # additionally keep steps divisible by this; 0 = none
    async_save: bool = True
    resume: bool = True


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline: ``synthetic`` (the stage's own generator) or pre-extracted ``records`` (npz)."""

    source: Literal["synthetic", "records"] = "synthetic"
    path: str = ""
    shuffle: bool = True
    seed: int = 0
    num_synthetic: int = 1024
    # records only: read every record into host memory once at start. For datasets that fit in RAM this
    # takes the per-step file reads (about 1 ms per 280 kB record) off an accelerator's critical path.
    in_memory: bool = False
