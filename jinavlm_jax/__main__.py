"""`python -m jinavlm_jax`: ask the shipped demo model about a few images, in four languages.

The package ships a small jina-vlm trained by the CPU demo recipe (`python train.py`, recipe
`configs/demo.yaml`; packaged by `python -m jinavlm_jax.train.demo ship runs/demo/export`): the real
layout (ViT -> two feature layers -> 2x2 attention pooling -> SwiGLU projector -> Qwen3-style
decoder) at toy sizes, in the official safetensors layout with its tokenizer, under
`jinavlm_jax/assets/demo/model/`. This command loads it like any checkpoint, asks it the questions
of `assets/demo/images/questions.json` (colour, shape, count, position and multiple-choice, in
English, German, Chinese and Arabic) in one batch, and prints each question, the model's answer,
the expected one, and the time each stage took.

    python -m jinavlm_jax                       # the shipped model
    python -m jinavlm_jax --checkpoint runs/demo/export   # your own demo run (same questions)
    python -m jinavlm_jax --random              # the old smoke run: the random 2.4B-layout tiny model
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets" / "demo"


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


def ask(checkpoint: Path, images_dir: Path, max_new_tokens: int = 8, out=None) -> dict:
    """Answer the questions of `images_dir/questions.json` with the model in `checkpoint`; print a table.
    Returns {"correct": n, "total": n, "seconds": {...}}."""
    from .cli import load_model
    from .train.evaluate import score
    from .generate import Generator
    from .processing import Processor

    items = json.loads((images_dir / "questions.json").read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    processor = Processor.from_dir(checkpoint)
    config, params = load_model(checkpoint)
    gen = Generator(config, params)
    t_load = time.perf_counter() - t0

    prompts = [processor.apply_chat_template([{"role": "user", "content": "<|image|>" + it["question"]}])
               for it in items]
    t0 = time.perf_counter()
    batch = processor(prompts, [[str(images_dir / it["image"])] for it in items], padding_side="left")
    t_pre = time.perf_counter() - t0
    kw = dict(max_new_tokens=max_new_tokens, stop_ids=processor.stop_ids, tokenizer=processor.tokenizer)
    t0 = time.perf_counter()
    gen.generate(batch, **kw)  # compiles prefill and decode for this batch shape
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = gen.generate(batch, **kw).texts
    t_run = time.perf_counter() - t0

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    p = lambda s="": print(s, file=out or sys.stdout)
    p(f"jina-vlm demo model ({n_params:,} params, {config.vision.image_size}px crops, "
      f"vocab {config.text.vocab_size}) from {checkpoint}")
    p()
    correct = 0
    for it, a in zip(items, answers):
        ok = score(a, it["answer"], it["question"])
        correct += ok
        q = it["question"].replace("\n", " / ")
        p(f"[{it['lang']}] {it['image']}  Q: {q}")
        p(f"     model: {a.strip()!r}   expected: {it['answer']!r}   {'ok' if ok else 'WRONG'}")
    p()
    p(f"{correct} of {len(items)} right")
    p(f"time: load {t_load:.1f} s, preprocess {t_pre * 1e3:.0f} ms, first batch {t_first:.1f} s (with compile), "
      f"batch of {len(items)} questions {t_run * 1e3:.0f} ms (compiled) on {jax.devices()[0].platform}")
    return {"correct": correct, "total": len(items),
            "seconds": {"load": t_load, "preprocess": t_pre, "first": t_first, "compiled": t_run}}


def random_smoke(width: int, height: int, max_crops: int, out=None) -> None:
    """The tiny random model of the 2.4B layout on a synthetic image: shapes and timings."""
    from . import JinaVLM, JinaVLMConfig, init_params
    from .processing import ImageProcessor, PreprocessConfig

    cfg = JinaVLMConfig.tiny()
    # ids of the golden tiny model's special tokens (see ../shared/testdata/README.md)
    patch_id, start_id, end_id, col_id, bos_id = 500, 501, 502, 503, 510
    t0 = time.perf_counter()
    proc = ImageProcessor(PreprocessConfig(max_crops=max_crops), patch_id, start_id, end_id, col_id)
    res = proc.process(synthetic_image(width, height))
    t_pre = time.perf_counter() - t0
    block = np.asarray(res["image_tokens"])
    ids = np.concatenate([[bos_id], block, [7, 8, 9]]).astype(np.int32)[None]
    idx = np.where(res["image_input_idx"] >= 0, res["image_input_idx"] + 1, -1)[None]
    images, masks = res["images"][None], res["image_masks"][None]

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
    valid = (res["image_input_idx"] >= 0).sum(1)
    p = lambda s="": print(s, file=out or sys.stdout)
    p(f"jinavlm-jax tiny model ({n_params:,} params) on a synthetic {width}x{height} image")
    p(f"  crops (thumbnail + tiles): {images.shape[1]}   pooled tokens per crop: {res['image_input_idx'].shape[1]}")
    p(f"  features placed per crop:  {valid.tolist()}")
    p(f"  image token block: {block.size} tokens ({int((block == patch_id).sum())} <im_patch>)")
    p(f"  images {tuple(images.shape)} -> connector {tuple(feats.shape)} -> logits {tuple(logits.shape)}")
    p(f"  next-token argmax after the prompt: {int(np.asarray(logits)[0, -1].argmax())}")
    p(f"  time: preprocess {t_pre * 1e3:.0f} ms, init {t_init:.1f} s, forward {t_first:.1f} s "
      f"(with compile), {t_run * 1e3:.0f} ms (compiled) on {jax.devices()[0].platform}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jinavlm_jax", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ASSETS / "model",
                    help="a model directory with its tokenizer (default: the shipped demo model)")
    ap.add_argument("--images", type=Path, default=ASSETS / "images",
                    help="a directory with questions.json and its images (default: the shipped ones)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--random", action="store_true",
                    help="instead: run the random tiny model of the 2.4B layout on a synthetic image")
    ap.add_argument("--width", type=int, default=1000, help="--random: image width")
    ap.add_argument("--height", type=int, default=750, help="--random: image height")
    ap.add_argument("--max-crops", type=int, default=12, help="--random: tiles per image")
    args = ap.parse_args(argv)
    if args.random:
        random_smoke(args.width, args.height, args.max_crops)
        return 0
    for what, path in (("--checkpoint", args.checkpoint / "config.json"),
                       ("--images", args.images / "questions.json")):
        if not path.is_file():
            print(f"python -m jinavlm_jax: error: {what}: {path} not found", file=sys.stderr)
            return 1
    ask(args.checkpoint, args.images, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
