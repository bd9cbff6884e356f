"""Image pipeline tests: golden outputs of the official image processor, torch-equal resizing, tiling and
token counts of spec 5.1, index layout invariants, PIL modes, and bad input."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jinavlm_jax.processing import (ImageInputError, ImageProcessor, PreprocessConfig, PreprocessConfigError,
                                    load_rgb, resize_bilinear, select_tiling, smart_resize, smart_resize_image)

GOLDEN_CASES = ["astronaut", "synth_1000x750", "synth_378x378", "synth_50x2000"]
# Ids the official image processor uses when run alone (testdata README, section A).
RAW_IDS = dict(patch_id=0, start_id=2, end_id=3, col_id=1)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ golden data (acceptance 1)

@pytest.fixture(scope="module")
def cases(testdata):
    return json.loads((testdata / "image_processor_cases.json").read_text())


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_matches_official_image_processor(testdata, cases, name):
    rec = cases["cases"][name]
    gold = np.load(testdata / rec["npz"])
    out = ImageProcessor(PreprocessConfig.from_hf(cases["processor_settings"]), **RAW_IDS).process(
        testdata / rec["file"])

    np.testing.assert_array_equal(out["image_tokens"], gold["image_tokens"])
    np.testing.assert_array_equal(out["image_input_idx"], gold["image_input_idx"])
    np.testing.assert_array_equal(out["image_masks"], gold["image_masks"])
    assert out["images"].shape == gold["image_crops"].shape == (rec["n_crops"], 729, 588)
    assert out["images"].dtype == np.float32
    # Tolerance 1e-6 (acceptance 1: values in [-1, 1], float32 ulp at 1 is 1.2e-7). The resize
    # reproduces torch's fused multiply-adds, so the measured maximum is 0.0 for all four cases.
    diff = float(np.abs(out["images"] - gold["image_crops"]).max())
    assert diff <= 1e-6, f"{name}: max |pixel diff| {diff}"
    assert diff == 0.0, f"{name}: bit equality lost (max diff {diff}); resize kernel order changed?"
    assert len(out["image_tokens"]) == rec["n_tokens"]
    assert (out["image_tokens"] == RAW_IDS["patch_id"]).sum() == rec["n_patch_tokens"]


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_first_resize_and_tiling_match_official(testdata, cases, name):
    rec = cases["cases"][name]
    gold = np.load(testdata / rec["npz"])
    rgb = load_rgb(testdata / rec["file"])
    assert list(rgb.shape[:2]) == gold["input_hw"].tolist()
    assert list(smart_resize(*rgb.shape[:2])) == gold["resized_hw"].tolist() == rec["resized_hw"]
    resized = smart_resize_image(rgb)
    # The uint8 intermediate (rounded half-to-even) is exact integer data.
    np.testing.assert_array_equal(np.rint(resized * 255).astype(np.uint8), gold["resized_rgb_uint8"])
    np.testing.assert_array_equal(resized, gold["resized_rgb_uint8"].astype(np.float32) / np.float32(255))
    assert list(select_tiling(*resized.shape[:2])) == gold["tiling"].tolist() == rec["tiling"]


# ------------------------------------------------------------------ resize vs torch

def _torch_resize(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """What torchvision's tensor Resize(BILINEAR, antialias=False) computes on a CHW float tensor."""
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].float()
    y = torch.nn.functional.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).numpy()


@pytest.fixture
def torch_multithreaded():
    """torch picks its kernel by thread count (one thread + 3 channels -> channels-last kernel); the
    official outputs were made multi-threaded, which is what resize_bilinear reproduces."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_resize_bit_equal_to_torch(torch_multithreaded):
    rng = np.random.default_rng(7)
    # Random sizes, up and down, both kernels (oh + ow <= 128 uses the channels-last one), plus
    # the shapes of the real pipeline; uint8 and [0, 1] float inputs.
    sizes = [tuple(int(v) for v in rng.integers(1, 160, 4)) for _ in range(40)]
    sizes += [(750, 1000, 756, 994), (756, 994, 378, 378), (476, 644, 644, 644), (10, 10, 56, 56),
              (1, 1, 56, 56), (3, 200, 14, 462), (40, 40, 64, 64), (100, 100, 29, 99)]
    for h, w, oh, ow in sizes:
        x8 = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for x in (x8, rng.random((h, w, 3), dtype=np.float32)):
            ours, ref = resize_bilinear(x, oh, ow), _torch_resize(x.astype(np.float32), oh, ow)
            assert ours.dtype == np.float32 and ours.shape == (oh, ow, 3)
            bad = int((ours != ref).sum())
            assert bad == 0, f"{h}x{w} -> {oh}x{ow} ({x.dtype}): {bad} values differ, max {np.abs(ours - ref).max()}"


def test_resize_is_not_the_naive_formula(torch_multithreaded):
    """Guard for the test above: an unfused float32 bilinear differs from torch, so equality means
    the fma order is really reproduced."""
    from jinavlm_jax.processing.resize import axis_weights
    x = np.random.default_rng(1).random((97, 131, 3), dtype=np.float32)
    r0, r1, a0, a1 = axis_weights(97, 211)
    c0, c1, b0, b1 = axis_weights(131, 173)
    t = x[:, c0] * b0[None, :, None] + x[:, c1] * b1[None, :, None]
    naive = t[r0] * a0[:, None, None] + t[r1] * a1[:, None, None]
    assert (naive != _torch_resize(x, 211, 173)).any()
    assert np.abs(naive - _torch_resize(x, 211, 173)).max() < 1e-5   # but it is close


# ------------------------------------------------------------------ tiling and token counts (acceptance 3)

@pytest.mark.parametrize("w,h,resized,tiling,crops,patch_tokens,tokens", [
    (1000, 750, (756, 994), (3, 4), 13, 1692, 1744),
    (378, 378, (378, 378), (1, 1), 2, 392, 424),
    (640, 480, (476, 644), (2, 2), 5, 772, 814),
    (750, 1000, (994, 756), (4, 3), 13, 1692, 1754),    # trap 13: one <im_col> per grid row
])
def test_worked_examples(w, h, resized, tiling, crops, patch_tokens, tokens):
    proc = ImageProcessor(PreprocessConfig(), **RAW_IDS)
    assert smart_resize(h, w) == resized
    assert proc.tiling(h, w) == tiling
    assert proc.n_image_tokens(h, w) == tokens
    out = proc.process(_rgb(h, w))
    assert out["images"].shape == (crops, 729, 588)
    assert out["image_masks"].shape == (crops, 729) and out["image_input_idx"].shape == (crops, 196)
    assert len(out["image_tokens"]) == tokens
    assert (out["image_tokens"] == 0).sum() == patch_tokens == (out["image_input_idx"] >= 0).sum()


def test_paper_figure_size_counts():
    proc = ImageProcessor()
    assert smart_resize(2046, 2728) == (854, 1148)
    assert proc.tiling(2046, 2728) == (3, 4) and proc.n_image_tokens(2046, 2728) == 1744


def test_valid_features_per_tile_3x4():
    idx = ImageProcessor().layout(3, 4)[1]
    counts = (idx >= 0).sum(axis=1).reshape(-1)
    # thumbnail, then row-major tiles: corners 144, edges 120, interior 100 (spec 5.1)
    expected = [196, 144, 120, 120, 144, 120, 100, 100, 120, 144, 120, 120, 144]
    assert counts.tolist() == expected


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 5), (4, 1), (2, 2), (3, 4), (4, 3), (2, 6), (12, 1)])
def test_index_layout_invariants(rows, cols):
    """Every <im_patch> of the block receives exactly one pooled feature, and nothing else does;
    the count equals n_image_tokens for every tiling (spec 9.6)."""
    ids = dict(patch_id=7, start_id=8, end_id=9, col_id=6)
    tokens, idx = ImageProcessor(PreprocessConfig(), **ids).layout(rows, cols)
    valid = idx[idx >= 0]
    assert len(np.unique(valid)) == len(valid)
    assert set(valid.tolist()) == set(np.flatnonzero(tokens == 7).tolist())
    assert set(np.unique(idx[idx < 0]).tolist()) <= {-10000}
    assert tokens[0] == 8 and tokens[211] == 9 and tokens[212] == 8 and tokens[-1] == 9
    hp = 14 if rows == 1 else 10 * rows + 4
    wp = 14 if cols == 1 else 10 * cols + 4
    assert len(tokens) == 212 + 2 + hp * (wp + 1)
    assert (tokens[212:] == 6).sum() == hp
    # thumbnail slot (r, c) -> 1 + 15 r + c
    np.testing.assert_array_equal(idx[0], (1 + 15 * np.arange(14)[:, None] + np.arange(14)).reshape(-1))
    # features keep their raster order inside the grid block: row-major over (R, C)
    grid = tokens[213:-1].reshape(hp, wp + 1)
    assert (grid[:, -1] == 6).all() and (grid[:, :-1] == 7).all()


def test_mask_row_placement_and_crop_order():
    """-1 mask row on the last tile, thumbnail first; 378x378 input: thumbnail == tile pixels."""
    out = ImageProcessor().process(_rgb(378, 378, seed=3))
    assert out["image_masks"][0].tolist() == [1.0] * 729 and out["image_masks"][1].tolist() == [-1.0] * 729
    np.testing.assert_array_equal(out["images"][0], out["images"][1])
    # patch (dy, dx, c) layout: patch 0 of the thumbnail is the top-left 14x14x3 block, normalised
    x = _rgb(378, 378, seed=3)
    np.testing.assert_allclose(out["images"][0, 0], (x[:14, :14].astype(np.float32) / 255 * 2 - 1).reshape(-1),
                               atol=1e-6)   # tolerance: float32 rounding of /255*2-1 vs the direct formula
    np.testing.assert_allclose(out["images"][0, 28], (x[14:28, 14:28].astype(np.float32) / 255 * 2 - 1).reshape(-1),
                               atol=1e-6)


# ------------------------------------------------------------------ loading and PIL modes

def test_small_images_are_upscaled_not_refused():
    for h, w in [(1, 1), (10, 10), (1, 50), (7, 3)]:
        out = ImageProcessor().process(_rgb(h, w))
        assert out["images"].shape == (2, 729, 588) and np.isfinite(out["images"]).all()


def test_hwc_arrays_one_or_three_pixels_high_are_hwc():
    # spec 9.2: the official layout inference misreads these; we keep them wide.
    assert smart_resize(3, 200) == (14, 462)
    assert smart_resize_image(_rgb(3, 200)).shape == (14, 462, 3)
    assert smart_resize_image(_rgb(1, 150)).shape[:2] == smart_resize(1, 150)


def test_array_and_pil_inputs_agree():
    x = _rgb(50, 70)
    a = ImageProcessor().process(x)
    for src in (Image.fromarray(x), _png_bytes(Image.fromarray(x))):
        np.testing.assert_array_equal(ImageProcessor().process(src)["images"], a["images"])
    g = x[..., 0]
    np.testing.assert_array_equal(load_rgb(g), np.repeat(g[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_rgb(g[..., None]), load_rgb(Image.fromarray(g)))


def test_pil_modes_convert_like_pil():
    x = _rgb(20, 30)
    rgba = np.dstack([x, np.where(np.arange(30) < 15, 0, 255).astype(np.uint8)[None, :].repeat(20, 0)])
    for im in [Image.fromarray(x).convert(m) for m in ("L", "LA", "P", "1", "CMYK", "YCbCr")] + \
              [Image.fromarray(rgba)]:
        np.testing.assert_array_equal(load_rgb(im), np.asarray(im.convert("RGB")), err_msg=im.mode)
    # alpha dropped by default: colour under fully transparent pixels survives (spec 9.1)
    np.testing.assert_array_equal(load_rgb(Image.fromarray(rgba)), x)
    np.testing.assert_array_equal(load_rgb(rgba), x)
    white = load_rgb(Image.fromarray(rgba), PreprocessConfig(alpha="white"))
    assert (white[:, :15] == 255).all() and np.array_equal(white[:, 15:], x[:, 15:])
    pal = Image.fromarray(x).convert("P")
    pal.info["transparency"] = 0
    assert load_rgb(pal).shape == (20, 30, 3)


def test_16bit_grey_is_clipped_like_pil():
    v = np.array([[0, 100, 255, 256, 1000, 65535]], dtype=">u2")
    im = Image.frombytes("I;16B", (6, 1), v.tobytes())
    assert load_rgb(im)[0, :, 0].tolist() == [0, 100, 255, 255, 255, 255]
    buf = io.BytesIO()
    Image.frombytes("I;16", (6, 1), v.astype("<u2").tobytes()).save(buf, "PNG")
    assert load_rgb(buf.getvalue())[0, :, 1].tolist() == [0, 100, 255, 255, 255, 255]


def test_exif_orientation_applied_to_files(tmp_path):
    im = Image.fromarray(_rgb(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6     # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes())
    assert load_rgb(path).shape == (40, 20, 3)
    assert load_rgb(path, PreprocessConfig(exif_transpose=False)).shape == (20, 40, 3)


# ------------------------------------------------------------------ bad input (acceptance 6)

def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims another size (tests the guard that runs before decoding)."""
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])             # 'IHDR' + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(b""), "not a readable image"),
    (lambda p: p.write_text("this is not a png\n"), "not a readable image"),
    (lambda p: p.write_bytes(_png_with_size(3000, 3000)), "max_image_pixels"),
    (lambda p: p.write_bytes(_png_with_size(100000, 100000)), "decompression-bomb"),
])
def test_bad_files_raise_clear_errors(tmp_path, make, needle):
    path = tmp_path / "bad.png"
    make(path)
    cfg = PreprocessConfig(max_image_pixels=4_000_000)
    with pytest.raises(ImageInputError, match=needle) as e:
        ImageProcessor(cfg).process(path)
    assert "bad.png" in str(e.value)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    Image.fromarray(_rgb(200, 300)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageInputError, match="cut.jpg.*truncated"):
        ImageProcessor().process(path)


def test_pixel_limit_default_and_config():
    assert PreprocessConfig().max_image_pixels == Image.MAX_IMAGE_PIXELS or Image.MAX_IMAGE_PIXELS is None
    with pytest.raises(ImageInputError, match="max_image_pixels=1000"):
        ImageProcessor(PreprocessConfig(max_image_pixels=1000)).process(_rgb(40, 40))
    with pytest.raises(ImageInputError, match="max_image_pixels"):
        load_rgb(Image.new("RGB", (50, 50)), PreprocessConfig(max_image_pixels=2000))


@pytest.mark.parametrize("h,w", [(1, 201), (1000, 4)])
def test_aspect_ratio_over_200(h, w):
    with pytest.raises(ImageInputError, match=rf"{w}x{h}.*aspect ratio"):
        ImageProcessor().process(_rgb(h, w))
    ImageProcessor().process(_rgb(1, 200))    # exactly 200 is accepted (official: > 200 raises)


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((10, 10, 3), np.float32), "dtype float32"),
    (np.zeros((10, 10, 2), np.uint8), "shape"),
    (np.zeros((2, 10, 10, 3), np.uint8), "shape"),
    (12345, "unsupported image input"),
    ("/nonexistent/image.png", "not found"),
])
def test_bad_inputs(bad, needle):
    with pytest.raises(ImageInputError, match=needle):
        load_rgb(bad)


# ------------------------------------------------------------------ config

def test_config_from_hf_and_round_trip(testdata, tmp_path):
    released = json.loads((testdata / "jina-vlm_preprocessor_config.json").read_text())
    assert PreprocessConfig.from_hf(released) == PreprocessConfig()
    assert PreprocessConfig.from_hf(testdata / "jina-vlm_preprocessor_config.json") == PreprocessConfig()
    assert PreprocessConfig().to_hf() == released
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**released, "max_crops": 4}))
    cfg = PreprocessConfig.from_hf(tmp_path, alpha="white")
    assert cfg.max_crops == 4 and cfg.alpha == "white"
    assert ImageProcessor(cfg).tiling(3000, 4000) == (2, 2)


@pytest.mark.parametrize("change,needle", [
    (dict(interpolation="bicubic"), "interpolation"),
    (dict(antialias=True), "antialias"),
    (dict(normalization_method="gaussian"), "normalization_method"),
    (dict(token_length_w=13), "token_length_w"),
    (dict(base_input_size=(378, 336)), "base_input_size"),
    (dict(max_crops=0), "max_crops"),
    (dict(alpha="black"), "alpha"),
])
def test_config_refuses_unsupported(change, needle):
    with pytest.raises(PreprocessConfigError, match=needle):
        PreprocessConfig(**change)


def test_config_variants_are_honoured():
    x = _rgb(300, 500)
    float_path = ImageProcessor(PreprocessConfig(resize_in_float32=True)).process(x)["images"]
    uint8_path = ImageProcessor().process(x)["images"]
    # resize_in_float32 skips the uint8 rounding of the first resize: close, not equal
    assert not np.array_equal(float_path, uint8_path)
    assert np.abs(float_path - uint8_path).max() <= 2 / 255 * 2    # at most one rounding step per stage
    no_resize = ImageProcessor(PreprocessConfig(do_resize=False)).process(x)
    assert len(no_resize["images"]) == 1 + np.prod(select_tiling(300, 500))
    assert ImageProcessor(PreprocessConfig(max_crops=1)).process(_rgb(1000, 1000))["images"].shape[0] == 2


def test_library_never_imports_torch_or_tensorflow():
    import pathlib
    import re

    import jinavlm_jax.processing as processing
    for f in pathlib.Path(processing.__file__).parent.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(torch|torchvision|tensorflow)\b", f.read_text(), re.M), f.name
