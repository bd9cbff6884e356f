"""Small self-contained models for tests, benchmarks and demos: nothing downloaded.

    d = write_model_dir("tmp/tiny")           # tokenizer.json, config.json, preprocessor_config.json, ckpt/
    config, params = checkpoint.load(d / "ckpt"); proc = Processor.from_dir(d)
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np

WORDS = ("red green blue circle square triangle one two three left right top bottom what colour is the shape "
         "how many where").split()


def mid_config():
    """A few hundred million parameters of the real layout (for serving / speed benchmarks on CPU):
    decoder 1024 wide, 8 layers (GQA 16/8, head 64, MLP 3072); a 384-wide, 12-block vision tower."""
    from .model import ConnectorConfig, JinaVLMConfig, TextConfig, VisionConfig
    return JinaVLMConfig(
        vision=VisionConfig(hidden_size=384, n_layers=12, n_heads=6, head_dim=64, mlp_size=1536, output_size=1024),
        connector=ConnectorConfig(pool_heads=6, pool_head_dim=64, projector_size=2048),
        text=TextConfig(hidden_size=1024, n_layers=8, n_heads=16, n_kv_heads=8, head_dim=64, mlp_size=3072),
        torch_dtype="float32")


def write_model_dir(directory: str | Path, config=None, *, max_crops: int = 1, vocab_size: int = 300,
                    seed: int = 0) -> Path:
    """A model directory: a byte-level BPE tokenizer trained on a few words (`vocab_size`),
    config.json (`config`, default `JinaVLMConfig.tiny()`, with the tokenizer's vocabulary),
    preprocessor_config.json (`max_crops` tiles per image) and random params as an Orbax checkpoint
    in `ckpt/`. Returns the directory."""
    from . import checkpoint
    from .data.tokenizer import train_bpe_tokenizer
    from .model import JinaVLMConfig, init_params
    from .processing import PreprocessConfig

    d = Path(directory)
    rng = np.random.default_rng(seed)
    tok = train_bpe_tokenizer([" ".join(rng.choice(WORDS, 8)) for _ in range(300)], d, vocab_size)
    cfg = config or JinaVLMConfig.tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok["vocab_size"],
                                               additional_vocab_size=tok["additional_vocab_size"]))
    (d / "config.json").write_text(json.dumps(cfg.to_hf()))
    (d / "preprocessor_config.json").write_text(json.dumps(PreprocessConfig(max_crops=max_crops).to_hf()))
    checkpoint.save(d / "ckpt", cfg, init_params(cfg, seed))
    return d


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A random RGB image as PNG bytes (noise: every crop differs)."""
    from PIL import Image
    a = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()
