"""DICOM scan input, on pydicom's bundled test files (offline) and in-memory variants of them."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from medfedpure.scan import (  # noqa: E402
    ScanCompressionError,
    ScanFrameIndexError,
    ScanMultiFrameError,
    ScanNoPixelDataError,
    ScanNotImageError,
    ScanTooLargeError,
    ScanTooSmallError,
    ScanTruncatedError,
    load_scan,
    preprocess,
)
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import JPEGLSLossless, RLELossless  # noqa: E402

MR = "MR_small.dcm"


def _path(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return str(path)


def _ds(name: str = MR):
    return pydicom.dcmread(_path(name))


def _raw(name: str = MR) -> np.ndarray:
    """The stored values of MR_small (int16, 64 x 64), decoded by pydicom directly."""
    return np.asarray(_ds(name).pixel_array)


def _to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _decoder_ok(name: str) -> bool:
    return get_decoder(_ds(name).file_meta.TransferSyntaxUID).is_available


# ------------------------------------------------------------------------------------------------
# MR_small and its lossless variants decode to the same numbers
# ------------------------------------------------------------------------------------------------
def test_mr_small_numbers_and_meta() -> None:
    raw = _raw()
    assert raw.dtype == np.int16 and raw.shape == (64, 64)
    scan = load_scan(_path(MR))
    np.testing.assert_array_equal(scan.pixels, raw.astype(np.float32))
    m = scan.meta
    assert m["source_kind"] == "path:dicom"
    assert m["original_shape"] == (64, 64) and m["original_dtype"] == "int16"
    assert m["pixel_spacing"] == (0.3125, 0.3125)
    assert m["photometric"] == "MONOCHROME2" and m["modality"] == "MR"
    assert m["frame"] is None and m["num_frames"] == 1


def test_no_patient_identifiers_in_meta() -> None:
    ds = _ds()
    scan = load_scan(ds)
    text = repr(scan.meta)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "StudyInstanceUID"):
        value = str(ds.get(kw) or "")
        if value:
            assert value not in text, kw
    allowed = {
        "source_kind", "original_shape", "original_dtype", "pixel_spacing", "photometric",
        "frame", "num_frames", "modality", "transfer_syntax", "body_part", "image_type", "orientation",
    }  # fmt: skip
    assert set(scan.meta) <= allowed


@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding")
@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
        "MR_small_padded.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_lossless_variants_match_mr_small(name: str) -> None:
    if not _decoder_ok(name):
        with pytest.raises(ScanCompressionError, match=_ds(name).file_meta.TransferSyntaxUID.name):
            load_scan(_path(name))
        return
    scan = load_scan(_path(name))
    np.testing.assert_array_equal(scan.pixels, _raw().astype(np.float32))
    assert scan.meta["transfer_syntax"] == _ds(name).file_meta.TransferSyntaxUID.name


def test_dicom_sniffed_by_magic_not_extension(tmp_path) -> None:
    data = open(_path(MR), "rb").read()
    (tmp_path / "scan.img").write_bytes(data)
    for src, kind in ((tmp_path / "scan.img", "path:dicom"), (data, "bytes:dicom")):
        scan = load_scan(src)
        assert scan.meta["source_kind"] == kind
        np.testing.assert_array_equal(scan.pixels, _raw().astype(np.float32))


def test_dicom_without_preamble_by_extension(tmp_path) -> None:
    # DICOM files from old systems may lack the 128-byte preamble + DICM: the .dcm extension decides
    ds = _ds()
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    path = tmp_path / "nopreamble.dcm"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_scan(path).pixels, _raw().astype(np.float32))
    # the same bytes without an extension are not taken for DICOM
    with pytest.raises(ScanNotImageError):
        load_scan(data)


def test_garbage_with_dcm_extension(tmp_path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(ScanNotImageError):
        load_scan(path)


# ------------------------------------------------------------------------------------------------
# Modality rescale and MONOCHROME1
# ------------------------------------------------------------------------------------------------
def test_rescale_slope_intercept_applied() -> None:
    ds = _ds()
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    raw = _raw().astype(np.float64)
    scan = load_scan(ds)
    np.testing.assert_array_equal(scan.pixels, (2 * raw - 100).astype(np.float32))
    # through bytes as well (the values travel in the header)
    np.testing.assert_array_equal(load_scan(_to_bytes(ds)).pixels, scan.pixels)


def test_ct_small_hounsfield_units() -> None:
    ds = _ds("CT_small.dcm")
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    scan = load_scan(_path("CT_small.dcm"))
    np.testing.assert_array_equal(scan.pixels, ds.pixel_array.astype(np.float32) - 1024)
    assert scan.meta["modality"] == "CT"


def test_rescale_from_functional_groups() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _ds()
    pvt = Dataset()
    pvt.RescaleSlope = "0.5"
    pvt.RescaleIntercept = "10"
    item = Dataset()
    item.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([item])
    np.testing.assert_array_equal(
        load_scan(ds).pixels, (0.5 * _raw().astype(np.float64) + 10).astype(np.float32)
    )


def test_monochrome1_inverted_exactly_once() -> None:
    raw = _raw().astype(np.float64)
    ds = _ds()
    ds.PhotometricInterpretation = "MONOCHROME1"
    # int16 stored range [-32768, 32767] -> inverted value = (-32768 + 32767) - x = -1 - x
    mono1 = load_scan(ds)
    np.testing.assert_array_equal(mono1.pixels, (-1 - raw).astype(np.float32))
    assert mono1.meta["photometric"] == "MONOCHROME1"
    assert ds.PhotometricInterpretation == "MONOCHROME1"  # the caller's dataset is untouched
    # with a rescale: the range maps through it first, [-65636, 65434] -> -202 - (2x - 100)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    np.testing.assert_array_equal(load_scan(ds).pixels, (-202 - (2 * raw - 100)).astype(np.float32))
    # after normalisation MONOCHROME1 is the mirror image of MONOCHROME2 (inverted once, not twice)
    a = preprocess(_ds(), 64)
    b = preprocess(load_scan(_to_bytes(ds)), 64)
    np.testing.assert_allclose(b, 1.0 - a, atol=1e-5)
    # loading a Scan again does not invert again
    np.testing.assert_array_equal(preprocess(load_scan(mono1), 64), preprocess(mono1, 64))


# ------------------------------------------------------------------------------------------------
# The caller's dataset is never modified
# ------------------------------------------------------------------------------------------------
def test_dataset_not_modified() -> None:
    ds = _ds()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 3, 7
    before = copy.deepcopy(ds)
    pixel_bytes = bytes(ds.PixelData)
    scan = load_scan(ds)
    preprocess(ds, 64)
    assert ds == before
    assert bytes(ds.PixelData) == pixel_bytes
    assert not np.shares_memory(scan.pixels, np.frombuffer(ds.PixelData, np.int16))
    assert getattr(ds, "_pixel_array", None) is None  # no decoded-pixel cache left on it


# ------------------------------------------------------------------------------------------------
# Multi-frame
# ------------------------------------------------------------------------------------------------
def _three_frames():
    raw = _raw()
    frames = np.stack([raw, raw // 2, -raw]).astype(np.int16)
    ds = _ds()
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    return ds, frames


def test_multiframe_needs_frame() -> None:
    ds, frames = _three_frames()
    with pytest.raises(ScanMultiFrameError, match="3 frames") as ei:
        load_scan(ds)
    assert "frame=i" in str(ei.value)
    for i in range(3):
        scan = load_scan(ds, frame=i)
        np.testing.assert_array_equal(scan.pixels, frames[i].astype(np.float32))
        assert scan.meta["frame"] == i and scan.meta["num_frames"] == 3
        assert scan.meta["original_shape"] == (3, 64, 64)
    with pytest.raises(ScanFrameIndexError, match="out of range"):
        load_scan(ds, frame=3)
    # the same through bytes
    data = _to_bytes(ds)
    np.testing.assert_array_equal(load_scan(data, frame=2).pixels, frames[2].astype(np.float32))
    with pytest.raises(ScanMultiFrameError):
        load_scan(data)


def test_multiframe_rgb_rle_file() -> None:
    name = "SC_rgb_rle_2frame.dcm"
    with pytest.raises(ScanMultiFrameError, match="2 frames"):
        load_scan(_path(name))
    ref = _ds(name).pixel_array  # (2, 100, 100, 3) uint8
    for i in range(2):
        scan = load_scan(_path(name), frame=i)
        assert scan.pixels.shape == (100, 100, 3)
        np.testing.assert_array_equal(scan.pixels, ref[i].astype(np.float32))
    assert preprocess(load_scan(_path(name), frame=1), 64).shape == (1, 64, 64)


# ------------------------------------------------------------------------------------------------
# Colour DICOM
# ------------------------------------------------------------------------------------------------
def test_palette_and_ybr_become_rgb() -> None:
    from pydicom.pixels import apply_color_lut

    pal = load_scan(_path("examples_palette.dcm"))
    assert pal.pixels.shape == (350, 800, 3) and pal.meta["photometric"] == "PALETTE COLOR"
    ds = _ds("examples_palette.dcm")
    np.testing.assert_array_equal(pal.pixels, apply_color_lut(ds.pixel_array, ds).astype(np.float32))
    ybr = load_scan(_path("SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.pixels.shape == (100, 100, 3)
    # pydicom's pixel_array converts YBR to RGB by default: the same numbers
    np.testing.assert_array_equal(
        ybr.pixels, _ds("SC_ybr_full_422_uncompressed.dcm").pixel_array.astype(np.float32)
    )
    assert ybr.meta["photometric"] == "YBR_FULL_422"


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------
def test_refuse_truncated_file() -> None:
    with pytest.raises(ScanTruncatedError, match=r"truncated.*8192 bytes.*after 8130"):
        load_scan(_path("MR_truncated.dcm"))


@pytest.mark.parametrize("cut", [600, 1000, 1400, 1600, 9000])
def test_refuse_truncated_bytes(tmp_path, cut: int) -> None:
    data = open(_path(MR), "rb").read()[:cut]
    with pytest.raises(ScanTruncatedError, match="truncated"):
        load_scan(data)
    (tmp_path / "cut.dcm").write_bytes(data)
    with pytest.raises(ScanTruncatedError, match="truncated"):
        load_scan(tmp_path / "cut.dcm")


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_refuse_non_image_dicom(name: str) -> None:
    with pytest.raises(ScanNoPixelDataError, match="no pixel data") as ei:
        load_scan(_path(name))
    assert "not an image" in str(ei.value)


def test_refuse_dataset_without_pixel_data() -> None:
    ds = _ds()
    del ds.PixelData
    with pytest.raises(ScanNoPixelDataError):
        load_scan(ds)


def test_refuse_compressed_without_decoder_installed() -> None:
    name = "MR_small_jpeg_ls_lossless.dcm"
    if _decoder_ok(name):  # pragma: no cover - environment with a JPEG-LS plugin
        np.testing.assert_array_equal(load_scan(_path(name)).pixels, _raw().astype(np.float32))
        return
    with pytest.raises(ScanCompressionError) as ei:
        load_scan(_path(name))
    msg = str(ei.value)
    assert JPEGLSLossless.name in msg and str(JPEGLSLossless) in msg
    assert "install one of" in msg and "pylibjpeg" in msg


def test_refuse_compressed_when_decoder_missing(monkeypatch) -> None:
    """Independent of what is installed here: a decoder reporting itself unavailable."""

    class _Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-rle>=2.0"]

        def as_array(self, *a, **k):  # pragma: no cover - must not be reached
            raise AssertionError("decoding attempted")

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: _Unavailable())
    with pytest.raises(ScanCompressionError, match=f"compressed with {RLELossless.name}.*pylibjpeg-rle"):
        load_scan(_path("MR_small_RLE.dcm"))


def test_refuse_when_installed_decoders_fail() -> None:
    # 12-bit JPEG Extended: Pillow's plugin is installed but cannot decode 12-bit samples
    name = "JPEG-lossy.dcm"
    try:
        ok = bool(get_decoder(_ds(name).file_meta.TransferSyntaxUID).as_array(_ds(name))[0].size)
    except Exception:
        ok = False
    if ok:  # pragma: no cover - environment with a 12-bit JPEG plugin
        assert load_scan(_path(name)).pixels.shape == (1024, 256)
        return
    with pytest.raises(ScanCompressionError, match="JPEG Extended"):
        load_scan(_path(name))


def test_missing_transfer_syntax() -> None:
    # read from a file: pydicom knows the encoding it parsed, which names the (uncompressed) syntax
    ds = _ds()
    del ds.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(load_scan(ds).pixels, _raw().astype(np.float32))
    # built in memory without file meta: nothing says how the pixel bytes are encoded
    fresh = Dataset()
    for elem in _ds():
        fresh.add(elem)
    with pytest.raises(ScanNotImageError, match="TransferSyntaxUID"):
        load_scan(fresh)


@pytest.mark.parametrize("rows, cols", [(20000, 20000), (9000, 9000), (16385, 64)])
def test_dicom_bomb_refused_from_header(monkeypatch, rows: int, cols: int) -> None:
    ds = _ds()
    ds.Rows, ds.Columns = rows, cols  # 8 KB of pixel data claiming a huge image

    def no_decoding(uid):
        raise AssertionError("pixel decoding was reached")

    monkeypatch.setattr("pydicom.pixels.get_decoder", no_decoding)
    for src in (ds, _to_bytes(ds)):
        with pytest.raises(ScanTooLargeError, match="decompression-bomb"):
            load_scan(src)


def test_refuse_corrupt_rescale() -> None:
    ds = _ds()
    ds.RescaleSlope, ds.RescaleIntercept = "7.25", 0
    data = _to_bytes(ds)
    assert data.count(b"7.25") == 1
    with pytest.raises(ScanNotImageError, match="invalid pixel-value attributes"):
        load_scan(data.replace(b"7.25", b"x.yz"))  # a DS that is not a number


def test_large_file_truncation_found_from_header(tmp_path, monkeypatch) -> None:
    # an 8 MB pixel element is deferred on read; the truncation is found without decoding it
    ds = _ds()
    ds.Rows = ds.Columns = 2048
    pixels = (np.arange(2048 * 2048) % 4001).astype(np.int16).reshape(2048, 2048)
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(load_scan(path).pixels, pixels.astype(np.float32))
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)

    def no_decoding(uid):
        raise AssertionError("pixel decoding was reached")

    monkeypatch.setattr("pydicom.pixels.get_decoder", no_decoding)
    with pytest.raises(
        ScanTruncatedError, match=r"declares 8388608 bytes but the file ends after \d+ of them"
    ):
        load_scan(path)


def test_dicom_too_small_refused() -> None:
    with pytest.raises(ScanTooSmallError, match="10×10"):
        load_scan(_path("rtdose_1frame.dcm"))  # a 10 x 10 dose grid


def test_refuse_a_transfer_syntax_without_any_decoder() -> None:
    # pydicom's get_decoder raises NotImplementedError for a syntax it has no decoder class for
    # (here a private UID); load_scan turns that into a typed refusal naming the syntax.
    from pydicom.uid import UID

    ds = _ds()
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.9.9999.1")
    with pytest.raises(NotImplementedError):
        get_decoder(ds.file_meta.TransferSyntaxUID)
    with pytest.raises(ScanCompressionError, match=r"1\.2\.826\.0\.1\.3680043\.9\.9999\.1.*no pixel data decoder"):
        load_scan(ds)
