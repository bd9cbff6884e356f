"""jinavlm-jax: jina-vlm (arXiv 2512.04032) in JAX/Flax."""
from .model import InputError, JinaVLM, JinaVLMConfig, abstract_params, init_params
from .weights import CheckpointError, load_jina_vlm

__all__ = ["InputError", "JinaVLM", "JinaVLMConfig", "abstract_params", "init_params", "CheckpointError",
           "load_jina_vlm"]
__version__ = "0.1.0"
