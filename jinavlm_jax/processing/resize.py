"""Bilinear resize that reproduces torch's CPU `interpolate(mode="bilinear", align_corners=False,
antialias=False)` on float32 images bit for bit, in vectorised numpy (spec 5.11, trap 21).

The official image processor resizes with torchvision's tensor `Resize`, which runs that kernel.
Reaching bit equality needs three details of the compiled torch kernel (checked against torch on
random sizes in tests/test_processing_image.py):

* Source coordinates: `scale = float32(in) / out`, `src = fma(scale, dst + 0.5, -0.5)` in float32
  (the multiply-add is fused by the compiler), clamped at 0; `i0 = min(floor(src), in - 1)`,
  `l1 = clamp(src - i0, 0, 1)`, `l0 = 1 - l1`, `i1 = min(i0 + 1, in - 1)`. Equal sizes copy.
* Two kernels, chosen by torch at run time. For `out_h + out_w > 128` (every crop, every large
  image) the "generic" kernel interpolates each source row along the width, then mixes two rows:
  `t = fma(x0, l0w, x1 * l1w)` and `out = fma(t0, l0h, t1 * l1h)`. For `out_h + out_w <= 128` (tiny
  smart-resized images such as 56x56) the "channels-last" kernel sums four products with weights
  `w_ij = l_ih * l_jw`: `out = fma(x11, w11, fma(x10, w10, fma(x00, w00, x01 * w01)))`. (torch also
  picks the second kernel for all sizes when it runs on one thread with 3 channels; the official
  outputs in the golden data come from the multi-threaded choice, which is what we follow.)
* A fused multiply-add rounds once. numpy has none, so it is computed in float64, where the product
  of two float32 numbers is exact, and rounded to float32 once (double rounding would need a tie at
  2^-29 relative precision; never seen in the tests).
"""
from __future__ import annotations

import numpy as np

# torch dispatches to its channels-last kernel below this output height + width.
_SMALL_OUTPUT_HW_SUM = 128
# Output rows per chunk of the generic kernel: keeps the float64 temporaries in cache.
_ROWS_PER_CHUNK = 8


def axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and float32 weights (l0, l1) of torch's half-pixel bilinear, one axis."""
    dst = np.arange(n_out)
    if n_in == n_out:
        return dst, dst, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    src = _fma(scale, dst + 0.5, -0.5)
    np.maximum(src, np.float32(0), out=src)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.float32(1) - l1, l1


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize an HWC image (uint8 or float32) to (out_h, out_w); float32 result equal to torch's.

    The input values are used as they are (uint8 0..255 stays on that scale, as torchvision casts
    a uint8 tensor to float32 before interpolating). Same size returns a float32 copy.
    """
    if image.ndim != 3:
        raise ValueError(f"resize_bilinear expects an HWC array, got shape {image.shape}")
    h, w, _ = image.shape
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize_bilinear: output size {out_h}x{out_w} must be positive")
    if (h, w) == (out_h, out_w):
        return image.astype(np.float32)
    rows = axis_weights(h, out_h)
    cols = axis_weights(w, out_w)
    if out_h + out_w <= _SMALL_OUTPUT_HW_SUM:
        return _resize_four_products(image, rows, cols)
    return _resize_separable(image, rows, cols)


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add a * b + c with a single rounding (float64 holds a * b exactly)."""
    out = np.multiply(a, b, dtype=np.float64)
    out += c
    return out.astype(np.float32)


def _resize_separable(image: np.ndarray, rows, cols) -> np.ndarray:
    """torch's generic kernel: along the width per source row, then two rows mixed along the height."""
    r0, r1, a0, a1 = rows
    c0, c1, b0, b1 = cols
    out_h, out_w, ch = len(r0), len(c0), image.shape[2]
    b0, b1 = b0.astype(np.float64)[:, None], b1[:, None]
    a0, a1 = a0.astype(np.float64)[:, None, None], a1[:, None, None]
    out = np.empty((out_h, out_w, ch), np.float32)
    for s in range(0, out_h, _ROWS_PER_CHUNK):   # chunks of rows, vectorised inside
        e = min(out_h, s + _ROWS_PER_CHUNK)
        n = e - s
        src_rows, pos = np.unique(np.concatenate([r0[s:e], r1[s:e]]), return_inverse=True)
        x = image[src_rows]
        t = np.take(x, c1, axis=1).astype(np.float32)
        t *= b1
        u = np.take(x, c0, axis=1).astype(np.float64)
        u *= b0
        u += t
        t = u.astype(np.float32)                      # width pass, one rounding per fma
        v = t[pos[n:]]
        v *= a1[s:e]
        u = t[pos[:n]].astype(np.float64)
        u *= a0[s:e]
        u += v
        out[s:e] = u                                  # height pass, rounded to float32 on store
    return out


def _resize_four_products(image: np.ndarray, rows, cols) -> np.ndarray:
    """torch's channels-last kernel (small outputs): four weighted corners, fused in this order."""
    r0, r1, a0, a1 = (v[:, None] for v in rows)
    c0, c1, b0, b1 = (v[None, :] for v in cols)
    x = image.astype(np.float32)
    w00, w01, w10, w11 = ((a * b)[..., None] for a, b in ((a0, b0), (a0, b1), (a1, b0), (a1, b1)))  # float32
    out = x[r0, c1] * w01
    out = _fma(x[r0, c0], w00, out)
    out = _fma(x[r1, c0], w10, out)
    return _fma(x[r1, c1], w11, out)
