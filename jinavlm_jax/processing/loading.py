"""Image inputs (path, bytes, PIL image, HWC uint8 array) to an RGB uint8 HWC array, with clear errors.

Every failure of PIL on bad data (empty or truncated files, text files with an image suffix,
decompression bombs) becomes an `ImageInputError` naming the input; the pixel limit
(`PreprocessConfig.max_image_pixels`) is checked on the header before any pixel is decoded.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import PreprocessConfig
from .errors import ImageInputError

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Exceptions PIL raises while decoding corrupt data (truncated streams raise OSError, some codecs
# raise the others); all are reported as ImageInputError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_EXIF_ORIENTATION = 0x0112


def is_image_like(x) -> bool:
    """True for one image input (as opposed to a list of them)."""
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray))


def load_rgb(image: ImageLike, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Read one image input and return it as RGB uint8 [H, W, 3].

    Paths and bytes are decoded with PIL (EXIF orientation applied when `config.exif_transpose`);
    PIL images of any mode are converted as PIL's `convert("RGB")` does (alpha dropped, 16-bit
    values clipped at 255: spec 9.1, 9.3), or composited on white with `config.alpha == "white"`.
    Arrays are read as HWC (spec 9.2): uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, config)
    if isinstance(image, Image.Image):
        _check_pixels(image.size, "PIL image", config)
        return _pil_to_rgb(image, "PIL image", config)
    if isinstance(image, (bytes, bytearray, memoryview)):
        name = f"<{len(image)} bytes>"
        return _decode(io.BytesIO(bytes(image)), name, config)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageInputError(f"{path}: image file not found")
        with open(path, "rb") as f:
            return _decode(f, str(path), config)
    raise ImageInputError(f"unsupported image input of type {type(image).__name__}: expected a path, bytes, "
                          "a PIL image or an HWC uint8 numpy array")


def _decode(fp, name: str, config: PreprocessConfig) -> np.ndarray:
    try:
        im = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageInputError(f"{name}: not a readable image (empty file, wrong suffix or unsupported "
                              "format)") from None
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{name}: refused by PIL's decompression-bomb guard ({e}); raise "
                              "PIL.Image.MAX_IMAGE_PIXELS as well as max_image_pixels if it is "
                              "genuine") from None
    except _DECODE_ERRORS as e:
        raise ImageInputError(f"{name}: cannot read the image header ({e})") from None
    with im:
        _check_pixels(im.size, name, config)
        try:
            im.load()
            # exif_transpose copies even an upright image: only call it when there is a rotation.
            if config.exif_transpose and im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
        except _DECODE_ERRORS as e:
            raise ImageInputError(f"{name}: corrupt or truncated image data ({type(e).__name__}: {e})") from None
        return _pil_to_rgb(im, name, config)


def _check_pixels(size: tuple[int, int], name: str, config: PreprocessConfig) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageInputError(f"{name}: empty image ({w}x{h} pixels)")
    if w * h > config.max_image_pixels:
        raise ImageInputError(f"{name}: {w}x{h} = {w * h} pixels exceeds max_image_pixels="
                              f"{config.max_image_pixels} (decompression-bomb guard); downscale the image "
                              "or raise PreprocessConfig.max_image_pixels")


def _pil_to_rgb(im: Image.Image, name: str, config: PreprocessConfig) -> np.ndarray:
    if im.mode != "RGB" and not config.do_convert_rgb:
        raise ImageInputError(f"{name}: mode {im.mode} is not RGB and do_convert_rgb is false")
    has_alpha = "A" in im.getbands() or "transparency" in im.info
    try:
        if config.alpha == "white" and has_alpha:
            # transformers 5.x behaviour (spec 9.1): composite onto white instead of dropping alpha.
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        arr = np.asarray(rgb)
    except _DECODE_ERRORS as e:
        raise ImageInputError(f"{name}: cannot convert mode {im.mode} to RGB ({type(e).__name__}: {e})") from None
    return arr


def _array_to_rgb(arr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageInputError(f"array image: dtype {arr.dtype} not supported; pass uint8 values 0..255 "
                              "(or a PIL image for other pixel formats)")
    hwc = arr[:, :, None] if arr.ndim == 2 else arr
    if hwc.ndim != 3 or hwc.shape[2] not in (1, 3, 4):
        raise ImageInputError(f"array image: shape {arr.shape} is not HWC with 1, 3 or 4 channels (or HW)")
    _check_pixels((hwc.shape[1], hwc.shape[0]), "array image", config)
    if hwc.shape[2] == 3:
        return np.ascontiguousarray(hwc)
    if hwc.shape[2] == 1:                     # grey: what PIL's L -> RGB conversion does
        return np.ascontiguousarray(np.repeat(hwc, 3, axis=2))
    return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(hwc)), "array image", config)
