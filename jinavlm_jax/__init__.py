"""jinavlm-jax: jina-vlm (arXiv 2512.04032) in JAX/Flax.

Top-level names are imported lazily, so `import jinavlm_jax.processing` (e.g. in data-loader worker
processes) does not pull in jax and flax.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "InputError": ".model", "JinaVLM": ".model", "JinaVLMConfig": ".model", "abstract_params": ".model",
    "init_params": ".model", "CheckpointError": ".weights", "load_jina_vlm": ".weights",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'jinavlm_jax' has no attribute {name!r}")
