"""Typed, frozen configuration schema: the single source of truth for every model and run setting.

Presets in ``configs/`` only state what differs from these defaults. Defaults describe the full-size
Neodragon / Pyramid Flow components (spec ``NEODRAGON.md`` §2, §4, §5); derived values are properties or
pure functions, never stored twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from neodragon_jax.config.stage_settings import StageSettings
from neodragon_jax.config.train_schema import (
    CheckpointConfig,
    DataConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)

DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class PrecisionConfig:
    """``dtype`` is the compute dtype of matmuls/convs, ``param_dtype`` the storage dtype (Flax meaning).

    Norms, AdaLN modulation, the scheduler and losses always compute in float32.
    """

    dtype: DType = "float32"
    param_dtype: DType = "float32"


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (T5-XXL teacher by default; DistilT5 body uses 12/768/12/64, d_ff 2048)."""

    vocab_size: int = 32128
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0


@dataclass(frozen=True)
class DistilT5Config:
    """DistilT5: a T5-base-style body plus a 768->4096->4096 projection head (spec §4.2)."""

    body: T5Config = field(
        default_factory=lambda: T5Config(d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=2048)
    )
    projection_dim: int = 4096
    head_dropout: float = 0.1


@dataclass(frozen=True)
class ContextAdapterConfig:
    """SkipMLP of spec §4.3: input-first concatenation skips from the original input."""

    in_dim: int = 4096
    hidden_dim: int = 4096
    num_hidden_layers: int = 4
    out_dim: int = 1536


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower with projection (CLIP-L/14 defaults; bigG/14 via the preset)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    projection_dim: int = 768
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pad_token_id: int = 49407


def _clip_big_g() -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_layers=32,
        num_heads=20,
        projection_dim=1280,
        hidden_act="gelu",
        pad_token_id=0,
    )


@dataclass(frozen=True)
class TextConfig:
    """Text conditioning stack.

    ``kind='teacher'``: T5-XXL tokens (the context embedder lives in the teacher MMDiT).
    ``kind='neodragon'``: DistilT5 -> ContextAdapter tokens at the MMDiT width.
    Both add pooled CLIP-L ‖ CLIP-bigG projected EOS vectors.
    """

    kind: Literal["teacher", "neodragon"] = "neodragon"
    t5: T5Config = field(default_factory=T5Config)
    distil_t5: DistilT5Config = field(default_factory=DistilT5Config)
    context_adapter: ContextAdapterConfig = field(default_factory=ContextAdapterConfig)
    clip_l: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    clip_g: CLIPTextConfig = field(default_factory=_clip_big_g)
    max_length: int = 128
    clip_max_length: int = 77
    # Folder holding `tokenizer/` (CLIP-L), `tokenizer_2/` (CLIP-G) and `tokenizer_3/` (T5). Empty: the
    # tokenizers shipped in the package (neodragon_jax/_assets/tokenizers/<tokenizer_preset>).
    tokenizer_dir: str = ""
    tokenizer_preset: str = ""
    prompt_modifier: str = ""

    @property
    def pooled_dim(self) -> int:
        return self.clip_l.projection_dim + self.clip_g.projection_dim

    @property
    def token_dim(self) -> int:
        """Width of the text tokens the conditioner hands to the MMDiT."""
        return self.t5.d_model if self.kind == "teacher" else self.context_adapter.out_dim


@dataclass(frozen=True)
class MMDiTConfig:
    """Pyramidal MMDiT (spec §2). ``context_in_dim`` set = teacher with a context embedder."""

    num_layers: int = 18
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    pooled_dim: int = 2048
    context_in_dim: int | None = None
    mlp_ratio: int = 4
    pos_embed_max_size: int = 192
    sample_size: int = 128
    max_num_frames: int = 200
    rope_theta: float = 10000.0
    qk_norm_eps: float = 1e-5
    norm_eps: float = 1e-6
    # Teacher block index of each block, in order; empty = range(num_layers). Set by pruning.
    teacher_block_indices: tuple[int, ...] = ()
    # Rematerialisation policy name for each block ("none", "full", "dots", "dots_no_batch").
    remat: str = "none"
    # Run the identical blocks (all but the context_pre_only last) as one lax.scan over their stacked
    # weights: XLA compiles one block body instead of num_layers - 1 (the parameters keep their per-block
    # layout and checkpoint keys; the stack is built inside the step). Same numbers as the unrolled loop.
    scan_blocks: bool = False
    # Attention implementation: "auto" (splash on TPU, cudnn on GPU for bf16/fp16 compute, dense on CPU),
    # "dense" (the reference: materialised scores plus a float32 mask bias), "chunked" (online softmax over
    # key chunks: memory linear in the tokens), "splash" (Pallas TPU kernel), "cudnn" (cuDNN flash
    # attention). Same parameters and checkpoints for all; see neodragon_jax/layers/attention.py.
    attention: str = "auto"

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def out_channels(self) -> int:
        return self.in_channels


@dataclass(frozen=True)
class CausalVAEConfig:
    """Pyramid Flow causal video VAE (spec §5.1)."""

    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    encoder_layers_per_block: int = 2
    decoder_layers_per_block: int = 3
    spatial_down: tuple[bool, ...] = (True, True, True, False)
    temporal_down: tuple[bool, ...] = (True, True, True, False)
    norm_groups: int = 32  # 0: per-channel affine without statistics (not official; for tiny VAEs)
    norm_eps: float = 1e-6
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # Latent normalisation: z' = (z - shift) * scale; first frame and later frames differ (spec §1.3).
    image_shift: float = 0.1490
    image_scale: float = 0.5430
    video_shift: float = -0.2343
    video_scale: float = 0.3031  # Neodragon decode; Pyramid Flow uses 1/3.0986 = 0.3227

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_down)

    @property
    def spatial_factor(self) -> int:
        return 2 ** sum(self.spatial_down)


@dataclass(frozen=True)
class LightDecoderConfig:
    """TAEHV-style asymmetric decoder with 8x temporal upsampling (spec §5.2).

    One flag per stage of ``channels`` in ``temporal_upscale`` (TGrow doubles the frames) and
    ``spatial_upscale`` (nearest 2x in H and W after the stage's MemBlocks): the decoder's factors are
    ``2 ** sum(flags)``, and must match the encoder's (8x8x8 officially; a 4x VAE without temporal
    compression takes two spatial and no temporal flags).
    """

    latent_channels: int = 16
    channels: tuple[int, ...] = (256, 128, 64)
    blocks_per_stage: int = 3
    temporal_upscale: tuple[bool, ...] = (True, True, True)
    spatial_upscale: tuple[bool, ...] = (True, True, True)
    out_channels: int = 3
    clamp: float = 3.0


@dataclass(frozen=True)
class VAEConfig:
    causal: CausalVAEConfig = field(default_factory=CausalVAEConfig)
    light_decoder: LightDecoderConfig = field(default_factory=LightDecoderConfig)
    decoder: Literal["native", "light"] = "light"


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)


@dataclass(frozen=True)
class VideoConfig:
    height: int = 320
    width: int = 512
    num_frames: int = 49
    fps: int = 24


@dataclass(frozen=True)
class PyramidConfig:
    """Pyramidal flow matching (spec §3)."""

    num_stages: int = 3
    gamma: float = 1.0 / 3.0
    num_train_timesteps: int = 1000
    stage_sample_ratios: tuple[int, ...] = (1, 2, 1)
    history_corrupt_ratio: float = 1.0 / 3.0
    text_dropout: float = 0.1
    frames_per_unit: int = 1


@dataclass(frozen=True)
class SamplingConfig:
    first_unit_steps: tuple[int, ...] = (20, 20, 20)
    later_unit_steps: tuple[int, ...] = (10, 10, 10)
    first_unit_cfg: float = 7.0
    later_unit_cfg: float = 5.0
    negative_prompt: str = ""
    seed: int = 0


@dataclass(frozen=True)
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Typed settings of each training stage (``stages.<stage>.<field>``), registered by the stage itself.
    stages: StageSettings = field(default_factory=StageSettings)


def replace(obj, **changes):
    """``dataclasses.replace`` re-exported so callers need only this module."""
    return dataclasses.replace(obj, **changes)
