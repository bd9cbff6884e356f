"""`PreprocessConfig`: the image-processor settings, read from and written to `preprocessor_config.json`.

Field names are those of the official file (spec 1.5); the defaults are the released values, so
`PreprocessConfig.from_hf(<released file>) == PreprocessConfig()`. Three run-time fields that the
official file does not carry (`max_image_pixels`, `alpha`, `exif_transpose`) control input loading.
Settings the released model does not use (other cropping or normalisation methods, bicubic
resampling, antialiasing) are refused with an error naming the key, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import PreprocessConfigError

# PIL's own default decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS).
PIL_DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3

# Values this implementation reproduces; anything else is refused (see the module docstring).
_SUPPORTED = {
    "cropping_method": ("overlap-and-resize",),
    "normalization_method": ("minmax",),
    "interpolation": ("bilinear",),
    "antialias": (False,),
}
# Run-time fields: not part of the official file, so to_hf() leaves them out.
_RUNTIME_FIELDS = ("max_image_pixels", "alpha", "exif_transpose")


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing settings (spec 1.5 and 5). Defaults = the released jina-vlm settings."""

    do_resize: bool = True                  # smart_resize to a multiple of patch_size first
    min_pixels: int = 3136                  # smart_resize pixel budget, lower bound (56 * 56)
    max_pixels: int = 1003520               # and upper bound (14 * 14 * 5120)
    do_convert_rgb: bool = True
    cropping_method: str = "overlap-and-resize"
    normalization_method: str = "minmax"
    image_min: float = -1.0                 # minmax normalisation maps [0, 1] to [image_min, image_max]
    image_max: float = 1.0
    interpolation: str = "bilinear"
    antialias: bool = False
    resize_in_float32: bool = False         # False: the first resize rounds to uint8 (spec 5.11)
    max_crops: int = 12                     # tiles per image, thumbnail not counted
    base_input_size: tuple[int, int] = (378, 378)
    patch_size: int = 14
    overlap_margins: tuple[int, int] = (4, 4)   # (left/top, right/bottom) margin of a tile, in patches
    use_column_tokens: bool = True
    pooling_w: int = 2
    pooling_h: int = 2
    token_length_w: int = 14
    token_length_h: int = 14
    # ---- run-time loading settings (not in the official file)
    max_image_pixels: int = PIL_DEFAULT_MAX_IMAGE_PIXELS  # refuse larger inputs (decompression bombs)
    alpha: str = "drop"                     # "drop" (official, spec 9.1) or "white" (composite on white)
    exif_transpose: bool = True             # apply the EXIF orientation of files / bytes (like HF load_image)

    def __post_init__(self):
        object.__setattr__(self, "base_input_size", tuple(int(v) for v in self.base_input_size))
        object.__setattr__(self, "overlap_margins", tuple(int(v) for v in self.overlap_margins))
        self._validate()

    def _validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise PreprocessConfigError(f"preprocessor config: {key}={getattr(self, key)!r}: {msg}")

        for key, allowed in _SUPPORTED.items():
            need(getattr(self, key) in allowed, key, f"only {allowed} is implemented (the released setting)")
        need(self.alpha in ("drop", "white"), "alpha", "expected 'drop' or 'white'")
        need(len(self.base_input_size) == 2 and self.base_input_size[0] == self.base_input_size[1],
             "base_input_size", "crops must be square (the vision tower takes 378x378)")
        need(self.patch_size > 0 and self.crop_size % self.patch_size == 0, "base_input_size",
             f"must be a multiple of patch_size {self.patch_size}")
        need(len(self.overlap_margins) == 2 and min(self.overlap_margins) >= 0
             and sum(self.overlap_margins) < self.crop_patches, "overlap_margins",
             f"two non-negative margins (in patches) summing to less than {self.crop_patches}")
        need(self.max_crops >= 1, "max_crops", "must be at least 1")
        need(0 < self.min_pixels <= self.max_pixels, "min_pixels", f"must be in (0, max_pixels={self.max_pixels}]")
        need(self.max_image_pixels > 0, "max_image_pixels", "must be positive")
        need(self.image_max > self.image_min, "image_max", f"must exceed image_min={self.image_min}")
        for axis in ("h", "w"):
            pool, length = getattr(self, f"pooling_{axis}"), getattr(self, f"token_length_{axis}")
            need(pool >= 1 and length == math.ceil(self.crop_patches / pool), f"token_length_{axis}",
                 f"must equal ceil({self.crop_patches} patches / pooling {pool}) = "
                 f"{math.ceil(self.crop_patches / max(pool, 1))}")

    # ------------------------------------------------------------------ derived geometry (spec 5)
    @property
    def crop_size(self) -> int:
        """Side of a crop in pixels (378)."""
        return self.base_input_size[0]

    @property
    def crop_patches(self) -> int:
        """Patches per crop side (27)."""
        return self.crop_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """Patches per crop (729)."""
        return self.crop_patches ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch, (dy, dx, c) ordered (588)."""
        return self.patch_size * self.patch_size * 3

    @property
    def window_patches(self) -> int:
        """Patches a tile contributes beyond the overlap margins (19)."""
        return self.crop_patches - sum(self.overlap_margins)

    @property
    def window_pixels(self) -> int:
        """Tile stride in pixels (266)."""
        return self.window_patches * self.patch_size

    @property
    def margin_pixels(self) -> int:
        """Both margins together, in pixels (112)."""
        return sum(self.overlap_margins) * self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        """Pooled features per crop (14 * 14 = 196)."""
        return self.token_length_h * self.token_length_w

    @property
    def max_crops_per_image(self) -> int:
        """Upper bound on crops of one image (tiles + thumbnail): the natural crop bucket."""
        return self.max_crops + 1

    def replace(self, **changes) -> "PreprocessConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ preprocessor_config.json
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | Mapping[str, Any], **runtime) -> "PreprocessConfig":
        """Read `preprocessor_config.json` (a path to it or its directory, or the parsed dict).

        Keys that are not settings of this pipeline (`image_processor_type`, `auto_map`, ...) are
        ignored; `runtime` sets the loading fields (`max_image_pixels`, `alpha`, `exif_transpose`).
        """
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "preprocessor_config.json"
            if not p.is_file():
                raise PreprocessConfigError(f"{p}: preprocessor_config.json not found")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise PreprocessConfigError(f"{p}: not valid JSON ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        unknown_runtime = set(runtime) - set(_RUNTIME_FIELDS)
        if unknown_runtime:
            raise PreprocessConfigError(f"unknown run-time settings {sorted(unknown_runtime)}; "
                                        f"expected some of {list(_RUNTIME_FIELDS)}")
        return cls(**kwargs, **runtime)

    def to_hf(self) -> dict[str, Any]:
        """The official `preprocessor_config.json` dict (run-time loading fields left out)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _RUNTIME_FIELDS}
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        d["image_processor_type"] = "JinaVLMImageProcessor"
        return d
