"""Preprocessing throughput: a 4000x3000 photo to model inputs, with peers measured in the same run.

    python3 benchmarks/bench_preprocess.py [--repeats 7] [--threads 1]

Rows (median and best of --repeats, wall clock, this machine):
  * Processor(prompt, photo) from a decoded uint8 array: the figure of the acceptance target (< 0.3 s).
  * the same from JPEG bytes (adds PIL's decode, which is not ours to speed up).
  * stages: first resize (12 MP -> 854x1148 with uint8 rounding), crops (canvas + thumbnail resize,
    normalise, patchify), token layout.
Peers for the first resize, same input and output size:
  * torch `interpolate(bilinear, antialias=False)` on float32 + round: the official code path
    (torchvision Resize), bit-identical output; ratio = ours / torch.
  * PIL `Image.resize(BILINEAR)` on uint8: PIL's C resampler (antialiased, so different pixels);
    ratio = ours / PIL.
  * a non-vectorised per-pixel Python loop implementing the same formula, timed on the first 16
    output rows and scaled to the whole image; ratio = ours / loop.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jinavlm_jax.processing import ImageProcessor, PreprocessConfig, Processor, TextTokenizer  # noqa: E402
from jinavlm_jax.processing.image import make_crops, smart_resize, smart_resize_image  # noqa: E402
from jinavlm_jax.processing.resize import axis_weights  # noqa: E402



def tiny_tokenizer() -> TextTokenizer:
    """A word-level tokenizer with the special tokens (tokenization time is negligible here)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    special = ["<im_patch>", "<im_start>", "<im_end>", "<im_col>", "<|image|>", "<|endoftext|>", "<unk>"]
    words = ["User:", "Assistant:"] + [f"t{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words + special)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in special])
    return TextTokenizer(tok, "tiny word-level tokenizer")


def photo(h: int = 3000, w: int = 4000, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth gradients, a few shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 150) * np.cos(y / 110)], axis=-1)
    img[(x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 4) ** 2] *= 0.5
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def timeit(fn, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def naive_resize_rows(x: np.ndarray, out_h: int, out_w: int, n_rows: int) -> np.ndarray:
    """Per-pixel Python loop (same weights, unfused float arithmetic) for the first n_rows rows."""
    r0, r1, a0, a1 = axis_weights(x.shape[0], out_h)
    c0, c1, b0, b1 = axis_weights(x.shape[1], out_w)
    out = np.empty((n_rows, out_w, 3), np.float32)
    for i in range(n_rows):
        for j in range(out_w):
            for c in range(3):
                top = float(x[r0[i], c0[j], c]) * b0[j] + float(x[r0[i], c1[j], c]) * b1[j]
                bot = float(x[r1[i], c0[j], c]) * b0[j] + float(x[r1[i], c1[j], c]) * b1[j]
                out[i, j, c] = top * a0[i] + bot * a1[i]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the torch peer")
    args = ap.parse_args()

    img = photo()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    cfg = PreprocessConfig()
    h, w = smart_resize(*img.shape[:2], cfg)
    proc = Processor(tiny_tokenizer(), cfg)
    improc = ImageProcessor(cfg)
    prompt = " User: <|image|> t1 t2 t3 Assistant:"
    rows = []   # (label, median s, best s)

    rows.append(("Processor(prompt, 4000x3000 array)", *timeit(lambda: proc(prompt, img), args.repeats)))
    rows.append(("Processor(prompt, 4000x3000 JPEG bytes)", *timeit(lambda: proc(prompt, jpeg), args.repeats)))
    rows.append(("ImageProcessor.process(array)", *timeit(lambda: improc.process(img), args.repeats)))
    rows.append(("  (PIL JPEG decode alone)", *timeit(lambda: np.asarray(Image.open(io.BytesIO(jpeg))),
                                                      args.repeats)))
    first = timeit(lambda: smart_resize_image(img, cfg), args.repeats)
    rows.append((f"  first resize 3000x4000 -> {h}x{w}", *first))
    resized = smart_resize_image(img, cfg)
    rows.append(("  crops: canvas + thumbnail + patchify", *timeit(lambda: make_crops(resized, cfg), args.repeats)))
    rows.append(("  token layout 3x4", *timeit(lambda: improc.layout(3, 4), args.repeats)))

    print(f"preprocessing benchmark: {os.cpu_count()} CPUs, numpy {np.__version__}, repeats {args.repeats}")
    print(f"{'what':<46} {'median ms':>10} {'best ms':>9}")
    for label, med, best in rows:
        print(f"{label:<46} {med * 1e3:>10.1f} {best * 1e3:>9.1f}")

    print(f"\npeers for the first resize (ours: median {first[0] * 1e3:.1f} ms)")
    print(f"{'peer':<46} {'median ms':>10} {'ours/peer':>10}")
    try:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]

        def torch_resize():
            y = torch.nn.functional.interpolate(t.float(), size=(h, w), mode="bilinear", align_corners=False,
                                                antialias=False)
            return y.round().to(torch.uint8)
        tm = timeit(torch_resize, args.repeats)[0]
        same = np.array_equal(torch_resize()[0].permute(1, 2, 0).numpy(), np.rint(resized * 255).astype(np.uint8))
        print(f"{f'torch interpolate ({torch.get_num_threads()} threads), same pixels={same}':<46} "
              f"{tm * 1e3:>10.1f} {first[0] / tm:>10.2f}")
    except ImportError:
        print("torch not installed: torch peer skipped")
    pil = Image.fromarray(img)
    tp = timeit(lambda: pil.resize((w, h), Image.BILINEAR), args.repeats)[0]
    print(f"{'PIL Image.resize BILINEAR (antialiased)':<46} {tp * 1e3:>10.1f} {first[0] / tp:>10.2f}")
    n = 16
    t0 = time.perf_counter()
    naive_resize_rows(img, h, w, n)
    tn = (time.perf_counter() - t0) * h / n
    print(f"{f'per-pixel Python loop ({n} rows, scaled)':<46} {tn * 1e3:>10.0f} {first[0] / tn:>10.4f}")
    total = rows[0][1]
    print(f"\n4000x3000 photo -> model inputs (decoded array): {total:.3f} s median "
              f"({'under' if total < 0.3 else 'OVER'} the 0.3 s target)")


if __name__ == "__main__":
    main()
