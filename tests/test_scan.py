"""Scan input: arrays, PIL, image files, bytes; preprocessing numbers; refusals.

DICOM tests live in test_scan_dicom.py.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import medfedpure
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from medfedpure import scan as S
from medfedpure.scan import (
    Scan,
    ScanConstantError,
    ScanDtypeError,
    ScanEmptyError,
    ScanError,
    ScanFrameIndexError,
    ScanMultiFrameError,
    ScanNonFiniteError,
    ScanNotFoundError,
    ScanNotImageError,
    ScanShapeError,
    ScanTooLargeError,
    ScanTooSmallError,
    ScanTruncatedError,
    ScanTypeError,
    load_scan,
    preprocess,
)
from PIL import Image

DTYPES = [np.uint8, np.uint16, np.int16, np.float32, np.float64]


def _noise(shape: tuple[int, ...], dtype: type = np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100.0, 30.0, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _oracle_norm(grey: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(grey.astype(np.float64), [0.5, 99.5])
    return np.clip((grey.astype(np.float64) - lo) / (hi - lo), 0, 1)


# ------------------------------------------------------------------------------------------------
# Public API wiring
# ------------------------------------------------------------------------------------------------
def test_top_level_exports() -> None:
    assert medfedpure.load_scan is load_scan
    assert medfedpure.preprocess is preprocess
    assert medfedpure.ScanError is ScanError
    assert issubclass(ScanError, ValueError)
    # every refusal is a distinct ScanError subclass
    subs = [getattr(S, n) for n in S.__all__ if n.startswith("Scan") and n not in ("Scan", "ScanError", "ScanLimits")]
    assert len(subs) == len(set(subs)) == 16
    assert all(issubclass(c, ScanError) for c in subs)


# ------------------------------------------------------------------------------------------------
# Property tests over arrays
# ------------------------------------------------------------------------------------------------
@st.composite
def _array_inputs(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    h = draw(st.integers(32, 72))
    w = draw(st.integers(32, 72))
    channels = draw(st.sampled_from([None, 1, 3]))
    shape = (h, w) if channels is None else (h, w, channels)
    pattern = draw(st.sampled_from(["random", "two_values", "constant", "sparse", "hypothesis"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        scale = draw(st.sampled_from([2.0**-10, 1.0, 255.0, 4095.0, 2.0**20, 2.0**100]))  # exact in float32
        lo, hi = -scale, scale
    else:
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
    if pattern == "random":
        arr = rng.uniform(lo, hi, size=shape)
    elif pattern == "two_values":
        arr = np.where(rng.random(shape) < 0.5, lo, hi)
    elif pattern == "constant":
        arr = np.full(shape, rng.uniform(lo, hi))
    elif pattern == "sparse":  # a few bright pixels on a flat background: robust range may be 0
        arr = np.full(shape, lo, dtype=np.float64)
        k = draw(st.integers(1, 60))
        arr.reshape(-1)[rng.choice(arr.size, size=min(k, arr.size), replace=False)] = hi
    else:
        elements = (
            st.floats(lo, hi, width=dtype.itemsize * 8, allow_nan=False, allow_infinity=False)
            if dtype.kind == "f"
            else st.integers(lo, hi)
        )
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return np.asarray(arr).astype(dtype)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arr=_array_inputs(), size=st.sampled_from([32, 48, 64, 100]), readonly=st.booleans())
def test_property_arrays(arr: np.ndarray, size: int, readonly: bool) -> None:
    arr.flags.writeable = not readonly
    before = arr.copy()
    expect = arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    try:
        scan = load_scan(arr)
    except ScanConstantError:
        event("load_scan: constant")
        # Constant as the float32 pixels the scan holds (a float64 1e-131 underflows to 0).
        f32 = expect.astype(np.float32)
        assert f32.min() == f32.max()
    else:
        assert expect.astype(np.float32).min() != expect.astype(np.float32).max()
        px = scan.pixels
        assert px.dtype == np.float32 and px.shape == expect.shape
        np.testing.assert_array_equal(px, expect.astype(np.float32))
        assert not np.shares_memory(px, arr)
        assert not px.flags.writeable
        assert scan.meta["source_kind"] == "array"
        assert scan.meta["original_shape"] == arr.shape
        assert scan.meta["original_dtype"] == arr.dtype.name
        assert scan.meta["pixel_spacing"] is None

        grey = px.astype(np.float64) @ np.array(S.LUMA_601) if px.ndim == 3 else px
        p_lo, p_hi = np.percentile(np.asarray(grey, np.float32).astype(np.float64), [0.5, 99.5])
        try:
            out = preprocess(scan, size)
        except ScanConstantError:
            event("preprocess: robustly constant")
            assert p_lo == pytest.approx(p_hi, rel=1e-6, abs=0)
        else:
            event("preprocess: ok")
            assert out.shape == (1, size, size) and out.dtype == np.float32
            assert out.flags.c_contiguous
            assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
            h, w = expect.shape[:2]
            new_h, new_w = round(h * size / max(h, w)), round(w * size / max(h, w))
            top, left = (size - new_h) // 2, (size - new_w) // 2
            content = np.zeros((size, size), bool)
            content[top : top + new_h, left : left + new_w] = True
            assert (out[0][~content] == 0).all()  # padding is exactly 0
            np.testing.assert_array_equal(preprocess(arr, size), out)  # raw array path agrees
    # the caller's array is bit-identical and keeps its flags
    assert arr.dtype == before.dtype and arr.shape == before.shape
    assert arr.tobytes() == before.tobytes()
    assert arr.flags.writeable == (not readonly)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    h=st.integers(32, 64),
    w=st.integers(32, 64),
    step=st.sampled_from([1, 2]),
)
def test_property_non_contiguous_views_are_copied(dtype: type, h: int, w: int, step: int) -> None:
    base = _noise((2 * h, 2 * w, 3), dtype)
    view = base[::step, ::2][:h, :w]  # strided view into the caller's buffer
    before = base.copy()
    scan = load_scan(view)
    np.testing.assert_array_equal(scan.pixels, view.astype(np.float32))
    assert not np.shares_memory(scan.pixels, base)
    assert base.tobytes() == before.tobytes()


# ------------------------------------------------------------------------------------------------
# preprocess: known numbers
# ------------------------------------------------------------------------------------------------
def test_preprocess_landscape_ramp_known_values() -> None:
    # 64 x 128 horizontal ramp 0..127: percentiles 0 and 127 exactly (each value appears 64 times),
    # so the normalised scan is x / 127. Shrinking by 2 with Pillow's bilinear (triangle) filter
    # averages input columns 2j-1..2j+2 with weights 1,3,3,1 -> (2j + 0.5) / 127 inside; at the
    # left border column -1 is missing: (0*3 + 1*3 + 2*1) / 7 = 5/7.
    ramp = np.tile(np.arange(128, dtype=np.uint8), (64, 1))
    out = preprocess(ramp, 64)[0]
    assert (out[:16] == 0).all() and (out[48:] == 0).all()  # 32 content rows, centred
    content = out[16:48]
    assert (content == content[0]).all()  # every row identical
    j = np.arange(1, 63)
    np.testing.assert_allclose(content[0, 1:63], (2 * j + 0.5) / 127, atol=1e-6)
    assert content[0, 0] == pytest.approx((5 / 7) / 127, abs=1e-6)
    assert content[0, 63] == pytest.approx((126 + (1 - 5 / 7)) / 127, abs=1e-6)
    # the portrait version is the transpose
    np.testing.assert_array_equal(preprocess(ramp.T.copy(), 64)[0], out.T)


def test_preprocess_same_size_is_pure_normalisation() -> None:
    x = _noise((64, 64), np.float32, seed=3)
    out = preprocess(x, 64)[0]
    np.testing.assert_allclose(out, _oracle_norm(x), atol=2e-6)
    # corners of a scan that fills the canvas are not padding
    assert out[0, 0] == pytest.approx(_oracle_norm(x)[0, 0], abs=2e-6)


def test_preprocess_robust_to_outliers() -> None:
    ramp = np.tile(np.linspace(0, 1000, 64), (64, 1))
    spiked = ramp.copy()
    spiked[5, 7] = 1e9  # one hot pixel (< 0.5 %) does not change the normalisation
    spiked[9, 9] = -1e9
    a, b = preprocess(ramp, 64), preprocess(spiked, 64)
    mask = np.ones((64, 64), bool)
    mask[5, 7] = mask[9, 9] = False
    np.testing.assert_allclose(a[0][mask], b[0][mask], atol=1e-6)
    assert b[0, 5, 7] == 1.0 and b[0, 9, 9] == 0.0  # clipped


def test_preprocess_rgb_uses_bt601_luma() -> None:
    rgb = _noise((48, 64, 3), np.uint8, seed=4)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(preprocess(rgb, 64), preprocess(luma, 64), atol=1e-5)
    grey = _noise((48, 64), np.uint8, seed=5)
    np.testing.assert_allclose(preprocess(np.dstack([grey] * 3), 64), preprocess(grey, 64), atol=1e-6)


def test_preprocess_upsamples_small_scans() -> None:
    x = np.tile(np.arange(32, dtype=np.float32), (32, 1))
    out = preprocess(x, 128)
    assert out.shape == (1, 128, 128)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out[0, 64]) >= -1e-7)  # a ramp stays monotone


def test_preprocess_accepts_any_source(tmp_path) -> None:
    x = _noise((40, 50), np.uint8, seed=6)
    path = tmp_path / "x.png"
    Image.fromarray(x).save(path)
    ref = preprocess(load_scan(x), 64)
    np.testing.assert_array_equal(preprocess(x, 64), ref)
    np.testing.assert_array_equal(preprocess(path, 64), ref)
    np.testing.assert_array_equal(preprocess(str(path), np.int64(64)), ref)


@pytest.mark.parametrize("bad", [31, 0, -64, 64.0, True, "64", None, 16385])
def test_preprocess_bad_size(bad) -> None:
    with pytest.raises(ValueError, match="size must be an int"):
        preprocess(_noise((64, 64)), bad)


def test_preprocess_refuses_robustly_constant_scan() -> None:
    x = np.zeros((64, 64), np.float32)
    x[10, 10:20] = 1.0  # 10 of 4096 pixels (0.24 %) differ: not constant, but p0.5 == p99.5
    scan = load_scan(x)
    with pytest.raises(ScanConstantError, match="nearly constant"):
        preprocess(scan, 64)


def test_preprocess_extreme_float_range_stays_finite() -> None:
    x = np.where(_noise((64, 64), seed=7) > 100, 3.0e38, -3.0e38).astype(np.float32)
    out = preprocess(x, 64)
    assert np.isfinite(out).all() and set(np.unique(out)) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------------
# Scan dataclass
# ------------------------------------------------------------------------------------------------
def test_scan_is_frozen_and_read_only() -> None:
    scan = load_scan(_noise((40, 40)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        scan.pixels = np.zeros((40, 40), np.float32)  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        scan.pixels[0, 0] = 1.0
    assert load_scan(scan) is scan
    assert (scan.height, scan.width, scan.is_rgb) == (40, 40, False)


def test_scan_constructor_validates_and_copies() -> None:
    px = _noise((40, 40))
    s = Scan(px, {"source_kind": "array"})
    assert not np.shares_memory(s.pixels, px) and px.flags.writeable
    with pytest.raises(ScanDtypeError):
        Scan(px.astype(np.float64))
    with pytest.raises(ScanShapeError):
        Scan(np.zeros((40, 40, 4), np.float32))
    with pytest.raises(ScanNonFiniteError):
        Scan(np.full((40, 40), np.nan, np.float32))


# ------------------------------------------------------------------------------------------------
# Refusals (one per problem)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, what", [(np.nan, "1 NaN"), (np.inf, "1 infinite"), (-np.inf, "1 infinite")])
def test_refuse_non_finite(value: float, what: str) -> None:
    x = _noise((40, 40), np.float64)
    x[3, 4] = value
    with pytest.raises(ScanNonFiniteError, match=what) as ei:
        load_scan(x)
    assert "nan_to_num" in str(ei.value)


def test_refuse_beyond_float32_range() -> None:
    x = _noise((40, 40), np.float64)
    x[0, 0] = 1e39
    with pytest.raises(ScanNonFiniteError, match="float32 range"):
        load_scan(x)


@pytest.mark.parametrize("shape", [(0, 64), (64, 0), (0,), (0, 0, 3)])
def test_refuse_empty_array(shape) -> None:
    with pytest.raises(ScanEmptyError, match="empty"):
        load_scan(np.zeros(shape, np.uint8))


def test_refuse_empty_bytes_and_file(tmp_path) -> None:
    with pytest.raises(ScanEmptyError):
        load_scan(b"")
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ScanEmptyError):
        load_scan(tmp_path / "e.png")


@pytest.mark.parametrize("shape", [(31, 64), (64, 31), (8, 8, 3)])
def test_refuse_too_small(shape) -> None:
    with pytest.raises(ScanTooSmallError, match="at least 32 px"):
        load_scan(_noise(shape))
    load_scan(_noise((32, 32)))  # the limit itself is fine


@pytest.mark.parametrize("shape", [(16385, 32), (32, 16385), (8001, 8000)])
def test_refuse_too_large_array_without_touching_pixels(shape) -> None:
    # broadcast_to allocates nothing: the refusal comes from the shape alone
    x = np.broadcast_to(np.uint8(0), shape)
    with pytest.raises(ScanTooLargeError, match="64 megapixels and 16384 px per side"):
        load_scan(x)


def test_refuse_constant() -> None:
    with pytest.raises(ScanConstantError, match=r"every pixel is 7"):
        load_scan(np.full((64, 64), 7, np.uint16))
    with pytest.raises(ScanConstantError):
        load_scan(np.full((64, 64, 3), 0.5))


def test_refuse_four_channels_message() -> None:
    with pytest.raises(ScanShapeError) as ei:
        load_scan(np.zeros((64, 64, 4), np.uint8))
    msg = str(ei.value)
    assert "scan has 3 dimensions (H, W, 4)" in msg
    assert "expected grey (H, W) or RGB (H, W, 3)" in msg and "a[..., :3]" in msg


@pytest.mark.parametrize(
    "shape, hint",
    [
        ((3, 64, 64), "channels-first"),
        ((64,), "reshape"),
        ((2, 64, 64, 3), "one scan at a time"),
        ((64, 64, 5), "slice"),
    ],
)
def test_refuse_wrong_dims(shape, hint) -> None:
    with pytest.raises(ScanShapeError, match=hint):
        load_scan(_noise(shape, np.uint8))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint32, np.float16, np.bool_, np.complex64, object])
def test_refuse_dtype(dtype) -> None:
    x = (np.arange(64 * 64).reshape(64, 64) % 7).astype(dtype)
    with pytest.raises(ScanDtypeError, match=r"supported are uint8, uint16, int16, float32, float64"):
        load_scan(x)


def test_big_endian_arrays_are_accepted() -> None:
    x = _noise((40, 40), np.uint16)
    np.testing.assert_array_equal(load_scan(x.astype(">u2")).pixels, x.astype(np.float32))


@pytest.mark.parametrize("src", [[[1, 2], [3, 4]], 3.0, None, object()])
def test_refuse_unsupported_type(src) -> None:
    with pytest.raises(ScanTypeError, match="pass a numpy array, PIL image, file path") as ei:
        load_scan(src)
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, ValueError)


def test_refuse_missing_file(tmp_path) -> None:
    with pytest.raises(ScanNotFoundError, match="no such file") as ei:
        load_scan(tmp_path / "nope.png")
    assert isinstance(ei.value, FileNotFoundError)


def test_refuse_directory(tmp_path) -> None:
    with pytest.raises(ScanNotImageError, match="directory"):
        load_scan(tmp_path)


def test_refuse_not_an_image(tmp_path) -> None:
    (tmp_path / "notes.png").write_text("this is not a picture\n" * 20)
    with pytest.raises(ScanNotImageError, match="not a readable image"):
        load_scan(tmp_path / "notes.png")
    with pytest.raises(ScanNotImageError):
        load_scan(np.random.default_rng(0).bytes(500))
    # formats outside PNG / JPEG / TIFF / BMP are refused even though Pillow could read them
    with pytest.raises(ScanNotImageError, match="PNG, JPEG, TIFF, BMP, DICOM"):
        load_scan(_encode(_noise((40, 40), np.uint8), "GIF"))


def test_refuse_truncated_png() -> None:
    data = _encode(_noise((64, 64), np.uint8), "PNG")
    with pytest.raises(ScanTruncatedError, match="truncated"):
        load_scan(data[: len(data) // 2])


def test_refuse_transparent_alpha_but_accept_opaque() -> None:
    rgba = np.dstack([_noise((40, 40, 3), np.uint8), np.full((40, 40), 255, np.uint8)])
    scan = load_scan(_encode(rgba, "PNG"))
    np.testing.assert_array_equal(scan.pixels, rgba[..., :3].astype(np.float32))
    assert scan.meta["original_shape"] == (40, 40, 4) and scan.meta["photometric"] == "RGBA"
    rgba[0, 0, 3] = 10
    with pytest.raises(ScanShapeError, match="transparent"):
        load_scan(_encode(rgba, "PNG"))


@pytest.mark.parametrize("frame", [-1, 1.0, True, "0"])
def test_refuse_bad_frame_argument(frame) -> None:
    with pytest.raises(ScanFrameIndexError, match="non-negative int"):
        load_scan(_noise((40, 40)), frame=frame)


def test_frame_on_single_frame_sources() -> None:
    x = _noise((40, 40))
    np.testing.assert_array_equal(load_scan(x, frame=0).pixels, x)
    with pytest.raises(ScanFrameIndexError, match="out of range"):
        load_scan(x, frame=1)


# ------------------------------------------------------------------------------------------------
# Decompression bombs: refused from the header, before any decoding
# ------------------------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims width x height grey pixels (its data is 10 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("width, height", [(20000, 20000), (9000, 9000), (17000, 40), (40, 16385)])
def test_bomb_png_refused_before_decoding(tmp_path, monkeypatch, width, height) -> None:
    data = _png_header_only(width, height)
    assert len(data) < 100
    if width * height < 1.7e8:  # beyond that Pillow itself refuses to open it
        assert Image.open(io.BytesIO(data)).size == (width, height)

    def no_decoding(self, *a, **k):  # any decode attempt fails the test
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    for src in (data, path):
        with pytest.raises(ScanTooLargeError, match="megapixels") as ei:
            load_scan(src)
        assert "decompression-bomb" in str(ei.value)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the global Pillow setting is left alone


# ------------------------------------------------------------------------------------------------
# Round trips through files and bytes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt, ext, arr, kind",
    [
        ("PNG", "png", _noise((48, 64), np.uint8, 1), "path:png"),
        ("PNG", "png", _noise((48, 64), np.uint16, 2), "path:png"),
        ("PNG", "png", _noise((48, 64, 3), np.uint8, 3), "path:png"),
        ("TIFF", "tif", _noise((48, 64), np.float32, 4), "path:tiff"),
        ("TIFF", "tiff", _noise((48, 64), np.uint16, 5), "path:tiff"),
        ("BMP", "bmp", _noise((48, 64, 3), np.uint8, 6), "path:bmp"),
        ("BMP", "bmp", _noise((48, 64), np.uint8, 7), "path:bmp"),
    ],
)
def test_lossless_file_round_trip(tmp_path, fmt, ext, arr, kind) -> None:
    path = tmp_path / f"scan.{ext}"
    Image.fromarray(arr).save(path, format=fmt)
    for src, expect_kind in (
        (path, kind),
        (str(path), kind),
        (path.read_bytes(), kind.replace("path", "bytes")),
    ):
        scan = load_scan(src)
        np.testing.assert_array_equal(scan.pixels, arr.astype(np.float32))
        assert scan.meta["source_kind"] == expect_kind
        assert scan.meta["original_shape"] == arr.shape
        assert scan.meta["original_dtype"] == arr.dtype.name
    assert preprocess(path, 64).shape == (1, 64, 64)


def test_jpeg_round_trip(tmp_path) -> None:
    x = np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8)
    path = tmp_path / "scan.jpg"
    Image.fromarray(x).save(path, quality=95)
    scan = load_scan(path)
    assert scan.meta["source_kind"] == "path:jpeg" and scan.pixels.shape == (48, 64)
    assert np.abs(scan.pixels - x).max() <= 4  # lossy, but close


def test_extension_does_not_decide_format(tmp_path) -> None:
    x = _noise((40, 40), np.uint8)
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(x).save(path, format="PNG")
    scan = load_scan(path)
    assert scan.meta["source_kind"] == "path:png"
    np.testing.assert_array_equal(scan.pixels, x)


def test_bytearray_and_memoryview() -> None:
    x = _noise((40, 40), np.uint8)
    data = _encode(x, "PNG")
    ba = bytearray(data)
    for src in (ba, memoryview(data)):
        np.testing.assert_array_equal(load_scan(src).pixels, x)
    assert bytes(ba) == data


def test_pil_image_input_is_not_modified() -> None:
    x = _noise((40, 50, 3), np.uint8)
    img = Image.fromarray(x)
    scan = load_scan(img)
    assert scan.meta["source_kind"] == "pil" and scan.meta["photometric"] == "RGB"
    np.testing.assert_array_equal(scan.pixels, x)
    np.testing.assert_array_equal(np.asarray(img), x)
    assert not np.shares_memory(scan.pixels, x)
    # 16-bit and float PIL images keep their values
    x16 = _noise((40, 50), np.uint16)
    np.testing.assert_array_equal(load_scan(Image.fromarray(x16)).pixels, x16)
    # palette image -> RGB
    pal = Image.fromarray(x).convert("P")
    np.testing.assert_array_equal(load_scan(pal).pixels, np.asarray(pal.convert("RGB")))


def test_multipage_tiff_needs_frame(tmp_path) -> None:
    pages = [_noise((40, 48), np.uint8, seed=s) for s in range(3)]
    path = tmp_path / "stack.tif"
    Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(p) for p in pages[1:]])
    with pytest.raises(ScanMultiFrameError, match="3 frames"):
        load_scan(path)
    with pytest.raises(ScanFrameIndexError, match="0..2"):
        load_scan(path, frame=3)
    scan = load_scan(path, frame=2)
    np.testing.assert_array_equal(scan.pixels, pages[2])
    assert scan.meta["frame"] == 2 and scan.meta["num_frames"] == 3
    with Image.open(path) as img:  # a caller's open image: its position is restored
        img.seek(1)
        np.testing.assert_array_equal(load_scan(img, frame=0).pixels, pages[0])
        assert img.tell() == 1


@pytest.mark.parametrize("kind", ["normal", "integers", "background", "huge"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_robust_percentiles_equal_numpy_bit_for_bit(kind, dtype):
    """The sort-based percentiles of preprocessing are np.percentile's values exactly."""
    from medfedpure.scan import robust_percentiles

    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 201, 4096, 65536):
        if kind == "normal":
            a = rng.standard_normal(n)
        elif kind == "integers":
            a = np.round(rng.random(n) * 255)
        elif kind == "background":
            a = np.where(rng.random(n) < 0.6, 0.0, rng.random(n) * 4095)
        else:
            a = rng.random(n) * 3e38
        a = a.astype(dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            want = tuple(float(v) for v in np.percentile(a, (0.5, 99.5)))
            got = robust_percentiles(a.reshape(-1, 1) if n % 2 else a)
        assert got == want, (n, got, want)
