"""Test helper: write a tiny checkpoint in the official jina-vlm directory layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jinavlm_jax.weights import official_tensors, write_safetensors


def write_official_dir(path: Path, config, params=None, tensors: dict | None = None,
                       overrides: dict | None = None) -> Path:
    """config.json + model.safetensors for `config`; tensors from `params` (ours) or given directly."""
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {n: np.asarray(a) for n, a in official_tensors(config, params)}
    tensors = dict(tensors)
    tensors.update(overrides or {})
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=1))
    write_safetensors(path / "model.safetensors", tensors)
    return path
