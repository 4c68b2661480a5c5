"""Configuration: frozen dataclass schema, presets and dotted overrides."""

from neodragon_jax.config.loader import (
    ConfigError,
    apply_overrides,
    available_presets,
    from_dict,
    from_json,
    load_config,
    parse_override,
    to_dict,
    to_json,
    valid_keys,
)
from neodragon_jax.config.stage_settings import StageSettings, register_settings, registered_stages
from neodragon_jax.config.schema import (
    CausalVAEConfig,
    CLIPTextConfig,
    Config,
    ContextAdapterConfig,
    DistilT5Config,
    LightDecoderConfig,
    MMDiTConfig,
    ModelConfig,
    PrecisionConfig,
    PyramidConfig,
    SamplingConfig,
    T5Config,
    TextConfig,
    VAEConfig,
    VideoConfig,
)

__all__ = [
    "CausalVAEConfig", "CLIPTextConfig", "Config", "ConfigError", "ContextAdapterConfig", "DistilT5Config",
    "LightDecoderConfig", "MMDiTConfig", "ModelConfig", "PrecisionConfig", "PyramidConfig", "SamplingConfig",
    "StageSettings", "T5Config", "TextConfig", "VAEConfig", "VideoConfig", "apply_overrides", "available_presets", "from_dict",
    "from_json", "load_config", "parse_override", "register_settings", "registered_stages", "to_dict", "to_json", "valid_keys",
]
