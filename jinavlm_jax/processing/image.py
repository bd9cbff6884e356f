"""One image to model inputs: smart resize, tiling, overlapping crops with a thumbnail first, patchify,
per-patch masks, the image's token block and image_input_idx (spec 5).

    proc = ImageProcessor(PreprocessConfig(), patch_id, start_id, end_id, col_id)
    out = proc.process("photo.jpg")   # images [T, 729, 588], image_masks [T, 729],
                                      # image_input_idx [T, 196], image_tokens [n]

Everything is vectorised: the resize is `resize.resize_bilinear`, the crops are one gather on the
canvas viewed as a patch grid, and the index layout is built per axis and broadcast.
"""
from __future__ import annotations

import math

import numpy as np

from .config import PreprocessConfig
from .errors import ImageInputError
from .loading import ImageLike, load_rgb
from .resize import resize_bilinear

# Unused pooled slots in image_input_idx, as the official image processor marks them (spec 5.10).
UNUSED_SLOT = -10000
# smart_resize refuses more extreme aspect ratios (official behaviour, spec 9.4).
MAX_ASPECT_RATIO = 200


# ---------------------------------------------------------------------- geometry (spec 5.2, 5.3)

def smart_resize(height: int, width: int, config: PreprocessConfig = PreprocessConfig()) -> tuple[int, int]:
    """Target (height, width) of the first resize: multiples of patch_size within the pixel budget.

    Official Qwen2-VL-style rule with factor = patch_size (14, not 28; trap 10) and Python's
    half-to-even `round`. Images below the budget, even 1x1, are scaled up, never refused.
    """
    factor = config.patch_size
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageInputError(f"image of {width}x{height} pixels (width x height) has an aspect ratio of "
                              f"{max(height, width) / min(height, width):.1f}, over the limit "
                              f"{MAX_ASPECT_RATIO}; crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > config.max_pixels:
        beta = math.sqrt(height * width / config.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def select_tiling(height: int, width: int, config: PreprocessConfig = PreprocessConfig()) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of this (already smart-resized) size (spec 5.3, trap 11).

    Candidates (i, j) with i * j <= max_crops are sorted by (i * j, i); the scale each needs is
    min(266 i / (h - 112), 266 j / (w - 112)) in float32. Sides at or below the margin give inf or
    negative scales; that is the official algorithm (a 50x2000 image ends as one squashed tile,
    spec 9.5) and is reproduced.
    """
    n = config.max_crops
    cand = np.array(sorted(((i, j) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= n),
                           key=lambda t: (t[0] * t[1], t[0])), dtype=np.int32)
    size = np.array([height - config.margin_pixels, width - config.margin_pixels], dtype=np.float32)
    with np.errstate(divide="ignore"):
        scale = ((cand * config.window_pixels).astype(np.float32) / size).min(axis=1)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))          # nothing covers the image: the largest upscale
    else:
        ix = int(np.argmin(np.where(scale < 1, np.float32(1e10), scale)))   # the smallest sufficient one
    return int(cand[ix, 0]), int(cand[ix, 1])


def _axis_slots(n_tiles: int, config: PreprocessConfig, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile along one axis: first valid pooled slot and number of valid slots (spec 5.10).

    A tile keeps its window of 19 patches plus the outer margin on the image border; pooled slots
    covering an inner margin are discarded. For (4, 4) margins and pooling 2 this gives 14 slots
    for a single tile, 0..11 for the first, 2..11 for middle and 2..13 for the last one.
    """
    left, right = config.overlap_margins
    i = np.arange(n_tiles)
    patches = config.window_patches + np.where(i == 0, left, 0) + np.where(i == n_tiles - 1, right, 0)
    first = np.where(i == 0, 0, left // pool)
    return first, -(-patches // pool)


def _axis_positions(n_tiles: int, config: PreprocessConfig, pool: int, length: int) -> np.ndarray:
    """[n_tiles, length]: the global pooled row (or column) of each slot of each tile, -1 if unused."""
    first, count = _axis_slots(n_tiles, config, pool)
    before = np.concatenate([[0], np.cumsum(count)[:-1]])
    slot = np.arange(length)[None, :]
    valid = (slot >= first[:, None]) & (slot < (first + count)[:, None])
    return np.where(valid, before[:, None] + slot - first[:, None], -1)


def grid_shape(rows: int, cols: int, config: PreprocessConfig = PreprocessConfig()) -> tuple[int, int]:
    """(Hp, Wp): pooled rows and columns of the tile grid (14 for one tile, else 10 n + 4; trap 12)."""
    return (int(_axis_slots(rows, config, config.pooling_h)[1].sum()),
            int(_axis_slots(cols, config, config.pooling_w)[1].sum()))


# ---------------------------------------------------------------------- pixels (spec 5.2 - 5.7)

def smart_resize_image(rgb: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """The first resize: RGB uint8 [H, W, 3] -> float32 [h, w, 3] in [0, 1] (spec 5.2, 5.11).

    With `resize_in_float32` false (released) the interpolation result is rounded half-to-even to
    uint8, as torchvision does for a uint8 tensor, and only then divided by 255; so
    `np.rint(result * 255)` is the exact uint8 intermediate. `do_resize` false skips the resize.
    """
    h, w = (smart_resize(rgb.shape[0], rgb.shape[1], config) if config.do_resize else rgb.shape[:2])
    if config.resize_in_float32:
        return resize_bilinear(rgb.astype(np.float32) / np.float32(255), h, w)
    if (h, w) == rgb.shape[:2]:
        resized = rgb
    else:
        resized = np.rint(resize_bilinear(rgb, h, w))
        np.clip(resized, 0, 255, out=resized)
    return resized.astype(np.float32) / np.float32(255)


def _normalize(x: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Clip to [0, 1] (bilinear results can leave it by an ulp), then minmax to [image_min, image_max]."""
    np.clip(x, 0, 1, out=x)
    x *= np.float32(config.image_max - config.image_min)
    x += np.float32(config.image_min)
    return x


def make_crops(image: np.ndarray, config: PreprocessConfig = PreprocessConfig()
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """Smart-resized float image [h, w, 3] -> (crops [T, 729, 588] float32, (rows, cols)).

    Crop 0 is the thumbnail (the whole image resized to 378x378); crops 1..T-1 are the 378x378
    tiles, stride 266, of the image resized to the tile canvas, in row-major order (spec 5.4-5.7).
    Each crop is patchified in row-major patch order with (dy, dx, c) inside a patch (trap 9).
    """
    rows, cols = select_tiling(image.shape[0], image.shape[1], config)
    p, cp, wp = config.patch_size, config.crop_patches, config.window_patches
    side = config.crop_size
    margin = config.margin_pixels
    canvas = _normalize(resize_bilinear(image, rows * config.window_pixels + margin,
                                        cols * config.window_pixels + margin), config)
    thumb = _normalize(resize_bilinear(image, side, side), config)

    crops = np.empty((1 + rows * cols, config.n_patches, config.patch_dim), np.float32)
    crops[0] = thumb.reshape(cp, p, cp, p, 3).transpose(0, 2, 1, 3, 4).reshape(config.n_patches, -1)
    # Tiles start at multiples of 266 = 19 patches, so every tile is a block of whole patches of the
    # canvas: view the canvas as a patch grid and gather all tiles with one fancy index.
    grid = canvas.reshape(canvas.shape[0] // p, p, canvas.shape[1] // p, p, 3)
    ti = (np.arange(rows)[:, None] * wp + np.arange(cp))[:, None, :, None]    # [rows, 1, 27, 1]
    tj = (np.arange(cols)[:, None] * wp + np.arange(cp))[None, :, None, :]    # [1, cols, 1, 27]
    tiles = grid[ti, :, tj, :, :]            # advanced dims first: [rows, cols, 27, 27, 14, 14, 3]
    crops[1:] = tiles.reshape(rows * cols, config.n_patches, config.patch_dim)
    return crops, (rows, cols)


# ---------------------------------------------------------------------- layout (spec 5.8 - 5.10)

def image_masks(n_crops: int, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """[T, 729] float32 patch coverage: ones, and a -1 row appended at the end (spec 5.8, trap 2).

    The canvas resize ignores the aspect ratio, so every tile is fully covered. The official code
    computes masks for the tiles only and appends the -1 row, while the pixels have the thumbnail
    in front: row 0 pairs with the thumbnail and the last tile gets the -1 row. Reproduced.
    """
    masks = np.ones((n_crops, config.n_patches), np.float32)
    masks[-1] = -1
    return masks


class ImageProcessor:
    """The official jina-vlm image processor in numpy: one image -> crops, masks, token block, indices.

    `patch_id`, `start_id`, `end_id`, `col_id` are the ids of `<im_patch>`, `<im_start>`, `<im_end>`
    and `<im_col>`; the defaults are the official image processor's built-in placeholders (0, 2, 3, 1),
    which only make sense for comparing with its raw output. `Processor` passes the tokenizer's ids.
    """

    def __init__(self, config: PreprocessConfig | None = None, patch_id: int = 0, start_id: int = 2,
                 end_id: int = 3, col_id: int = 1):
        self.config = config or PreprocessConfig()
        self.patch_id, self.start_id, self.end_id, self.col_id = patch_id, start_id, end_id, col_id

    def process(self, image: ImageLike) -> dict[str, np.ndarray]:
        """One image (path, bytes, PIL image or HWC uint8 array) -> its model inputs.

        Returns `images` float32 [T, 729, 588] (thumbnail first), `image_masks` float32 [T, 729],
        `image_input_idx` int32 [T, 196] (positions inside this image's token block, -10000 unused)
        and `image_tokens` int64 [n] (thumbnail block then grid block), T = rows * cols + 1.
        """
        rgb = load_rgb(image, self.config)
        crops, (rows, cols) = make_crops(smart_resize_image(rgb, self.config), self.config)
        tokens, idx = self.layout(rows, cols)
        return {"images": crops, "image_masks": image_masks(len(crops), self.config),
                "image_input_idx": idx, "image_tokens": tokens}

    def tiling(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an input image of this size, without touching pixels."""
        h, w = smart_resize(height, width, self.config) if self.config.do_resize else (height, width)
        return select_tiling(h, w, self.config)

    def n_image_tokens(self, height: int, width: int) -> int:
        """Length of the token block of an input image of this size (spec 9.6: any tiling)."""
        rows, cols = self.tiling(height, width)
        c = self.config
        hp, wp = grid_shape(rows, cols, c)
        col = int(c.use_column_tokens)
        return (2 + c.token_length_h * (c.token_length_w + col)) + (2 + hp * (wp + col))

    def layout(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Token block int64 [n] and image_input_idx int32 [1 + rows * cols, 196] for a tiling.

        Block: `<im_start>`, 14 x (14 `<im_patch>`, `<im_col>`), `<im_end>` for the thumbnail, then
        the same with Hp x Wp for the tile grid. Thumbnail slot (r, c) sits at 1 + 15 r + c; tile
        slots that survive the margin rule map to their global pooled (R, C) in the grid block;
        every other slot is -10000 (spec 5.9, 5.10).
        """
        c = self.config
        th, tw = c.token_length_h, c.token_length_w
        hp, wp = grid_shape(rows, cols, c)
        col = int(c.use_column_tokens)
        thumb_tokens = self._block(th, tw)
        tokens = np.concatenate([thumb_tokens, self._block(hp, wp)])

        thumb_idx = (1 + np.arange(th)[:, None] * (tw + col) + np.arange(tw)[None, :]).reshape(1, -1)
        r = _axis_positions(rows, c, c.pooling_h, th)[:, None, :, None]      # [rows, 1, th, 1]
        q = _axis_positions(cols, c, c.pooling_w, tw)[None, :, None, :]      # [1, cols, 1, tw]
        grid_idx = np.where((r >= 0) & (q >= 0), len(thumb_tokens) + 1 + r * (wp + col) + q, UNUSED_SLOT)
        idx = np.concatenate([thumb_idx, grid_idx.reshape(rows * cols, th * tw)])
        return tokens, idx.astype(np.int32)

    def _block(self, n_rows: int, n_cols: int) -> np.ndarray:
        """`<im_start>`, n_rows x (n_cols `<im_patch>` [+ `<im_col>`]), `<im_end>` as int64 ids."""
        row = [self.patch_id] * n_cols + ([self.col_id] if self.config.use_column_tokens else [])
        return np.array([self.start_id] + row * n_rows + [self.end_id], np.int64)
