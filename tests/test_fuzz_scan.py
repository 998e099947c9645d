"""Fuzzing ``load_scan(bytes)`` and ``preprocess``: the seed corpus, mutations of it, the atheris target.

The contract (``tests/fuzz/scan_contract.py``): any byte string gives a valid Scan (finite float32
``(H, W)`` / ``(H, W, 3)`` within the size limits, metadata a dict) or a ``ScanError`` subclass —
never another exception, never more than ``FuzzLimits.time_s`` seconds or ``memory_bytes`` of traced
memory. The hypothesis tests mutate the corpus (byte flips, truncations, integer header-field edits,
PNG IHDR edits with a valid CRC, DICOM header elements set through pydicom, cut / duplicated
chunks, splices of two files) with a fixed budget and ``derandomize=True``, so every run tests the
same inputs. Files named ``crash-*`` in the corpus are inputs that once broke the contract; each
has a regression test below.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from medfedpure.scan import ScanNotImageError, load_scan

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
CORPUS = FUZZ_DIR / "corpus"
if str(FUZZ_DIR) not in sys.path:
    sys.path.insert(0, str(FUZZ_DIR))

import scan_contract  # noqa: E402
from scan_contract import ContractViolation, FuzzLimits, check_bytes  # noqa: E402

SEEDS = {p.name: p.read_bytes() for p in sorted(CORPUS.iterdir()) if p.is_file()}
NAMES = sorted(SEEDS)
DICOM_NAMES = [n for n in NAMES if n.endswith(".dcm")]
LIMITS = FuzzLimits(time_s=10.0, memory_bytes=512 * 2**20)

# The outcome of every seed: a Scan of that shape, the first and last frame of a multi-frame
# input, or the ScanError subclass. Alternatives are allowed where an optional decoder decides.
EXPECTED = {
    "ExplVR_BigEndNoMeta.dcm": {"ScanNotImageError"},
    "MR_small.dcm": {"Scan64x64"},
    "MR_small_RLE.dcm": {"Scan64x64"},
    "MR_small_bigendian.dcm": {"Scan64x64"},
    "MR_small_implicit.dcm": {"Scan64x64"},
    "MR_small_jpeg_ls_lossless.dcm": {"ScanCompressionError", "Scan64x64"},
    "MR_truncated.dcm": {"ScanTruncatedError"},
    "SC_rgb_rle_2frame.dcm": {"multiframe[Scan100x100x3,Scan100x100x3]"},
    "SC_rgb_small_odd.dcm": {"ScanTooSmallError"},
    "float32.tif": {"Scan48x40"},
    "grey.jpg": {"Scan48x40"},
    "grey16.png": {"Scan48x40"},
    "grey8.png": {"Scan48x40"},
    "grey8_deflate.tif": {"Scan48x40"},
    "mr_3frames_mono1_rescale.dcm": {"multiframe[Scan40x36,Scan40x36]"},
    "palette.bmp": {"Scan48x40x3"},
    "palette.png": {"Scan48x40x3"},
    "rgb.bmp": {"Scan48x40x3"},
    "rgb_progressive.jpg": {"Scan48x40x3"},
    "rgba_opaque.png": {"Scan48x40x3"},
    "rtplan.dcm": {"ScanNoPixelDataError"},
    "two_pages.tif": {"multiframe[Scan48x40,Scan48x40]"},
    # reproducers of fixed reader bugs
    "crash-tiff-missing-dimensions.tif": {"ScanNotImageError"},
    "crash-dicom-unknown-vr.dcm": {"ScanNotImageError"},
    "crash-dicom-wrong-length-columns.dcm": {"ScanNotImageError"},
    "crash-tiff-rational-as-int.tif": {"multiframe[ScanNotImageError,Scan48x40]"},
}
# DICOM seeds that decode: the header edits start from a readable image.
DICOM_IMAGES = [n for n in DICOM_NAMES if not any(o.endswith("Error") for o in EXPECTED.get(n, {"Error"}))]


# ------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------
def test_corpus_is_small_and_complete() -> None:
    sizes = {n: len(b) for n, b in SEEDS.items()}
    assert sum(sizes.values()) < 200 * 1024, sizes
    assert set(NAMES) == set(EXPECTED), set(NAMES) ^ set(EXPECTED)
    magic = {"png": b"\x89PNG", "tiff": b"II*\x00", "bmp": b"BM", "jpeg": b"\xff\xd8"}
    for fmt, head in magic.items():
        assert sum(b.startswith(head) for b in SEEDS.values()) >= 2, fmt
    assert sum(b[128:132] == b"DICM" for b in SEEDS.values()) >= 8


@pytest.mark.parametrize("name", NAMES)
def test_corpus_file_outcome(name: str) -> None:
    outcome = check_bytes(SEEDS[name], LIMITS)
    assert outcome in EXPECTED[name]


def test_corpus_scans_preprocess_to_unit_range() -> None:
    from medfedpure.scan import preprocess

    x = preprocess(load_scan(SEEDS["MR_small.dcm"]), 64)
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


# ------------------------------------------------------------------------------------------------
# The contract checker itself catches what it must
# ------------------------------------------------------------------------------------------------
def test_contract_flags_other_exceptions(monkeypatch) -> None:
    def boom(data: bytes, frame: int | None = None) -> None:
        raise KeyError("x")

    monkeypatch.setattr(scan_contract, "load_scan", boom)
    with pytest.raises(ContractViolation, match="load_scan raised KeyError"):
        check_bytes(b"anything", LIMITS)


def test_contract_time_box(monkeypatch) -> None:
    def hang(data: bytes, frame: int | None = None) -> None:
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(scan_contract, "load_scan", hang)
    t0 = time.perf_counter()
    with pytest.raises(ContractViolation, match="longer than 0.2 s"):
        check_bytes(b"anything", FuzzLimits(time_s=0.2, memory_bytes=0))
    assert time.perf_counter() - t0 < 5.0


def test_contract_memory_bound(monkeypatch) -> None:
    def hog(data: bytes, frame: int | None = None) -> None:
        big = np.ones(8 * 2**20, dtype=np.uint8)  # 8 MiB, traced by numpy
        raise ScanNotImageError(f"refused after {big.nbytes} bytes")

    monkeypatch.setattr(scan_contract, "load_scan", hog)
    with pytest.raises(ContractViolation, match="peaked at 8 MiB"):
        check_bytes(b"x" * 100, FuzzLimits(time_s=0, memory_bytes=4 * 2**20))
    assert check_bytes(b"x" * 100, FuzzLimits(time_s=0, memory_bytes=16 * 2**20)) == "ScanNotImageError"


def test_fuzz_limits_validate() -> None:
    with pytest.raises(ValueError, match="time_s"):
        FuzzLimits(time_s=-1.0)
    with pytest.raises(ValueError, match="memory_bytes"):
        FuzzLimits(memory_bytes=-1)


# ------------------------------------------------------------------------------------------------
# Regression tests: inputs that broke the contract before the fix in scan/
# ------------------------------------------------------------------------------------------------
def test_regression_tiff_whose_next_page_has_no_dimensions() -> None:
    # Counting the pages parses every IFD; Pillow raised TypeError("Missing dimensions").
    data = SEEDS["crash-tiff-missing-dimensions.tif"]
    with pytest.raises(ScanNotImageError, match="pages cannot be counted .*TypeError"):
        load_scan(data)


def test_regression_tiff_page_decoder_type_error() -> None:
    # A two-page TIFF whose first page has a rational where Pillow's decoder needs an int: load()
    # raised TypeError, which the decode step did not catch. The intact second page still loads.
    data = SEEDS["crash-tiff-rational-as-int.tif"]
    with pytest.raises(ScanNotImageError, match="cannot be decoded .*IFDRational"):
        load_scan(data, frame=0)
    scan = load_scan(data, frame=1)
    assert scan.pixels.shape == (48, 40) and scan.meta["num_frames"] == 2


def test_regression_dicom_element_with_unknown_vr() -> None:
    # pydicom converts elements lazily; reading one with an unknown VR raised NotImplementedError.
    data = SEEDS["crash-dicom-unknown-vr.dcm"]
    with pytest.raises(ScanNotImageError, match="corrupt DICOM header .*NotImplementedError"):
        load_scan(data)


def test_regression_dicom_columns_with_wrong_length() -> None:
    # Columns (US) stored as 2 bytes under an explicit VR of UL: pydicom's BytesLengthException
    # escaped the Rows / Columns check, which caught only AttributeError, TypeError and ValueError.
    data = SEEDS["crash-dicom-wrong-length-columns.dcm"]
    with pytest.raises(ScanNotImageError, match="corrupt DICOM header .*BytesLengthException.*0028,0011"):
        load_scan(data)


# ------------------------------------------------------------------------------------------------
# Mutations of the corpus (hypothesis, fixed budget, deterministic)
# ------------------------------------------------------------------------------------------------
_INTERESTING = (0, 1, 2, 3, 7, 8, 16, 31, 32, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFF,
                0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, mask in flips:
        out[pos % len(out)] ^= mask
    return bytes(out)


def _set_int(data: bytes, pos: int, width: int, big: bool, value: int) -> bytes:
    out = bytearray(data)
    pos = pos % max(1, len(out) - width + 1)
    out[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big" if big else "little")
    return bytes(out[: len(data)])


def _png_ihdr(data: bytes, field: str, value: int) -> bytes:
    """Set one IHDR field (width, height, depth, colour, interlace) and recompute the chunk CRC."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return data
    ihdr = bytearray(data[16:29])
    off, width = {"width": (0, 4), "height": (4, 4), "depth": (8, 1), "colour": (9, 1), "interlace": (12, 1)}[field]
    ihdr[off : off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


@st.composite
def mutated_inputs(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES), label="seed")
    data = SEEDS[name]
    n = len(data)
    how = draw(st.sampled_from(["flip", "truncate", "int", "png_ihdr", "cut", "dup", "splice"]), label="mutation")
    event(f"mutation: {how}")
    if how == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=8))
        return _flip(data, flips)
    if how == "truncate":
        return data[: draw(st.integers(0, n - 1))]
    if how == "int":  # an integer header field: most formats keep their header in the first KiB
        return _set_int(data, draw(st.integers(0, min(n, 1024) - 1)), draw(st.sampled_from([1, 2, 4])),
                        draw(st.booleans()), draw(st.sampled_from(_INTERESTING)))
    if how == "png_ihdr":
        png = draw(st.sampled_from([k for k in NAMES if k.endswith(".png")]))
        field = draw(st.sampled_from(["width", "height", "depth", "colour", "interlace"]))
        return _png_ihdr(SEEDS[png], field, draw(st.sampled_from(_INTERESTING)))
    a = draw(st.integers(0, n - 1))
    b = draw(st.integers(a, min(n, a + 512)))
    if how == "cut":
        return data[:a] + data[b:]
    if how == "dup":
        return data[:b] + data[a:b] + data[b:]
    other = SEEDS[draw(st.sampled_from(NAMES))]
    return data[:a] + other[draw(st.integers(0, len(other) - 1)):]


@settings(max_examples=400, deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=mutated_inputs())
def test_property_mutated_corpus(data: bytes) -> None:
    outcome = check_bytes(data, LIMITS)  # raises ContractViolation when the contract breaks
    event(f"outcome: {outcome.split('[')[0] if outcome.startswith('multi') else outcome}")
    assert outcome.startswith(("Scan", "multiframe["))


# DICOM header elements set to hostile values. They are written as raw values (pydicom would refuse
# to build most of them), so the file is well-formed apart from the edited values.
_US = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 31, 32, 63, 64, 65, 4096, 0x7FFF, 0x8000, 0xFFFF)
_DICOM_EDITS = {
    "Rows": st.sampled_from(_US),
    "Columns": st.sampled_from(_US),
    "BitsAllocated": st.sampled_from(_US),
    "BitsStored": st.sampled_from(_US),
    "HighBit": st.sampled_from(_US),
    "SamplesPerPixel": st.sampled_from(_US),
    "PixelRepresentation": st.sampled_from(_US),
    "PlanarConfiguration": st.sampled_from(_US),
    "NumberOfFrames": st.sampled_from(["0", "-1", "2", "3", "65", "1000000", "1e3", "x", ""]),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "", "XYZ"]),
    "RescaleSlope": st.sampled_from(["0", "-1", "1e308", "-1e308", "1e-300", "nan", "inf", "x", ""]),
    "RescaleIntercept": st.sampled_from(["0", "-32768", "1e308", "nan", "-inf", "x", ""]),
    "PixelSpacing": st.sampled_from(["0\\0", "nan\\1", "1", "1\\1\\1", "x\\y", ""]),
    "TransferSyntaxUID": st.sampled_from(
        ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
         "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99", "1.2.3.4", ""]),
}


def _set_raw(ds, keyword: str, value: int | str) -> None:
    """Store ``value`` as the raw bytes of ``keyword`` in ``ds``'s own encoding (no validation)."""
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(keyword)
    vr = dictionary_VR(tag)
    implicit, little = ds.original_encoding
    if isinstance(value, int):
        raw = value.to_bytes(2, "little" if little else "big")
    else:
        raw = value.encode("ascii")
        raw += b"\0" if vr == "UI" and len(raw) % 2 else b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, None if implicit else vr, len(raw), raw, 0, implicit, little)


def _set_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Replace the (explicit VR little endian) file-meta Transfer Syntax UID value in ``data``."""
    marker = b"\x02\x00\x10\x00UI"
    i = data.find(marker)
    if i < 0:
        return data
    n = int.from_bytes(data[i + 6 : i + 8], "little")
    raw = uid.encode("ascii") + b"\0" * (len(uid) % 2)
    return data[: i + 6] + len(raw).to_bytes(2, "little") + raw + data[i + 8 + n :]


@settings(max_examples=200, deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_dicom_header_edits(data: st.DataObject) -> None:
    import pydicom

    name = data.draw(st.sampled_from(DICOM_IMAGES), label="seed")
    ds = pydicom.dcmread(io.BytesIO(SEEDS[name]))
    edits = data.draw(st.fixed_dictionaries({}, optional=_DICOM_EDITS), label="edits")
    uid = None
    for key, value in edits.items():
        if key == "TransferSyntaxUID":
            uid = value
        else:
            _set_raw(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    raw = buf.getvalue() if uid is None else _set_transfer_syntax(buf.getvalue(), uid)
    outcome = check_bytes(raw, LIMITS)
    event(f"outcome: {outcome.split('[')[0] if outcome.startswith('multi') else outcome}")


# ------------------------------------------------------------------------------------------------
# The atheris target
# ------------------------------------------------------------------------------------------------
_NO_ATHERIS = importlib.util.find_spec("atheris") is None


@pytest.mark.skipif(_NO_ATHERIS, reason="atheris is not installed (pip install atheris; it is in the dev extra)")
def test_atheris_target_in_process_on_corpus(monkeypatch) -> None:
    import fuzz_load_scan

    for name in NAMES:
        fuzz_load_scan.TestOneInput(SEEDS[name])  # raises ContractViolation on a broken contract

    def broken(data: bytes, frame: int | None = None) -> None:
        raise RuntimeError("not a ScanError")

    monkeypatch.setattr(scan_contract, "load_scan", broken)
    with pytest.raises(ContractViolation, match="RuntimeError"):
        fuzz_load_scan.TestOneInput(SEEDS["grey8.png"])


@pytest.mark.skipif(_NO_ATHERIS, reason="atheris is not installed (pip install atheris; it is in the dev extra)")
@pytest.mark.slow  # the instrumented imports take several seconds
def test_atheris_fixed_runs(tmp_path: Path) -> None:
    # libFuzzer ends its process when the runs are done, so the fixed-size run is a child interpreter.
    runs = 300
    env = {**os.environ, "MEDFEDPURE_FUZZ_WORKDIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    env.pop("MEDFEDPURE_FUZZ_KEEP_GOING", None)
    proc = subprocess.run(
        [sys.executable, str(FUZZ_DIR / "fuzz_load_scan.py"), str(CORPUS), f"-runs={runs}", "-seed=1",
         "-max_len=12000"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert f"Done {runs} runs" in tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), tail
    assert sorted(p.name for p in CORPUS.iterdir()) == NAMES  # new inputs went to the scratch dir
