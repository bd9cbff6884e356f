"""`python -m jinavlm_jax`: run the tiny random model on a synthetic image and show what it computed.

A smoke run of the whole path (image tiling -> ViT -> connector -> decoder) that needs no weights,
no tokenizer and no network: it prints the crops and tokens the image became, the shapes of every
stage and the time each took.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 test card: colour ramps plus a few flat rectangles (HWC)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    np.full_like(x, 128, dtype=np.float64)], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        img[y0:y0 + height // 4, x0:x0 + width // 4] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jinavlm_jax", description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--height", type=int, default=750)
    ap.add_argument("--max-crops", type=int, default=12)
    args = ap.parse_args(argv)

    from . import JinaVLM, JinaVLMConfig, init_params
    from .processing import ImageProcessor, PreprocessConfig

    cfg = JinaVLMConfig.tiny()
    # ids of the golden tiny model's special tokens (see ../shared/testdata/README.md)
    patch_id, start_id, end_id, col_id, bos_id = 500, 501, 502, 503, 510
    t0 = time.perf_counter()
    proc = ImageProcessor(PreprocessConfig(max_crops=args.max_crops), patch_id, start_id, end_id, col_id)
    out = proc.process(synthetic_image(args.width, args.height))
    t_pre = time.perf_counter() - t0
    block = np.asarray(out["image_tokens"])
    ids = np.concatenate([[bos_id], block, [7, 8, 9]]).astype(np.int32)[None]
    idx = np.where(out["image_input_idx"] >= 0, out["image_input_idx"] + 1, -1)[None]
    images, masks = out["images"][None], out["image_masks"][None]

    t0 = time.perf_counter()
    params = init_params(cfg, 0)
    t_init = time.perf_counter() - t0
    model = JinaVLM(cfg)
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    t0 = time.perf_counter()
    logits = jax.block_until_ready(fwd(params, ids, images, masks, idx))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = jax.block_until_ready(fwd(params, ids, images, masks, idx))
    t_run = time.perf_counter() - t0
    feats = jax.jit(lambda p, a, m: model.apply({"params": p}, a, m, method=JinaVLM.encode_images))(
        params, images, masks)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    valid = (out["image_input_idx"] >= 0).sum(1)
    print(f"jinavlm-jax tiny model ({n_params:,} params) on a synthetic {args.width}x{args.height} image")
    print(f"  crops (thumbnail + tiles): {images.shape[1]}   pooled tokens per crop: {out['image_input_idx'].shape[1]}")
    print(f"  features placed per crop:  {valid.tolist()}")
    print(f"  image token block: {block.size} tokens ({int((block == patch_id).sum())} <im_patch>)")
    print(f"  images {tuple(images.shape)} -> connector {tuple(feats.shape)} -> logits {tuple(logits.shape)}")
    print(f"  next-token argmax after the prompt: {int(np.asarray(logits)[0, -1].argmax())}")
    print(f"  time: preprocess {t_pre * 1e3:.0f} ms, init {t_init:.1f} s, forward {t_first:.1f} s "
          f"(with compile), {t_run * 1e3:.0f} ms (compiled) on {jax.devices()[0].platform}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
