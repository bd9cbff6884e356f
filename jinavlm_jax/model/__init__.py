"""The jina-vlm network: config, layers, vision tower, connector, text decoder, the full model."""
from .config import ConfigError, ConnectorConfig, JinaVLMConfig, TextConfig, VisionConfig
from .jinavlm import (InputError, JinaVLM, abstract_params, check_inputs, dummy_inputs, init_params,
                      kernel_permutations, merge_image_features, prompt_mask, tokens_per_crop)
from .text import causal_mask, positions_from_mask

__all__ = ["ConfigError", "ConnectorConfig", "JinaVLMConfig", "TextConfig", "VisionConfig", "InputError",
           "JinaVLM", "abstract_params", "check_inputs", "dummy_inputs", "init_params", "kernel_permutations", "merge_image_features", "prompt_mask", "tokens_per_crop",
           "causal_mask", "positions_from_mask"]
