"""ERNIE 4.5 text models = args (presets, HF config) + Megatron specs + router + HF adapter."""
from megatron_ernie.models.ernie.args import (
    PRESETS,
    ConfigError,
    ErnieArgs,
    from_hf_config,
    preset,
    to_hf_config,
)

__all__ = ["PRESETS", "ConfigError", "ErnieArgs", "from_hf_config", "preset", "to_hf_config"]
