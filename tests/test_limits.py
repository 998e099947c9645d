"""Bounded inputs, partial failures and a runtime that keeps its promises.

Inputs: only regular files are opened (FIFOs, devices, directories refused without blocking), a
file-size cap and a decoded-bytes budget checked from headers before decoding (``ScanLimits``),
0-d arrays refused. Batches: a refused input is one ``status="refused"`` Result, the others are
classified; ``medfedpure run`` processes every file and exits 0 / 1 / 2. Runtime: ``close()``
under concurrent use, and the time budget enforced while a stage runs.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from medfedpure import Defender, load_scan
from medfedpure.scan import (
    MAX_DECODED_BYTES,
    MAX_FILE_BYTES,
    ScanDtypeError,
    ScanError,
    ScanLimits,
    ScanNotImageError,
    ScanNotRegularFileError,
    ScanShapeError,
    ScanTooLargeError,
)
from PIL import Image
from tiny_bundle import cached_tiny_bundle, tiny_scans

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _grey(seed: int = 1, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    x = tiny_scans(1, seed, size=64)[0, 0]
    return (x[: shape[0], : shape[1]] * 255).astype(np.uint8)


def _png_header_only(width: int, height: int, colour_type: int = 2, depth: int = 8) -> bytes:
    """A < 100-byte PNG whose header claims width × height pixels (colour type 2: RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + \
        chunk(b"IEND", b"")


def _no_decoding(monkeypatch) -> None:
    from PIL import ImageFile

    def boom(self, *a, **k):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(Image.Image, "load", boom)
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: pytest.fail("pixel decoding was reached"))


def _in_thread(fn, timeout: float = 5.0):
    """fn() in a daemon thread: (finished, elapsed s, result or exception). A blocked call fails the test
    instead of hanging the suite."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["value"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout)
    return not th.is_alive(), time.perf_counter() - t0, box.get("value")


def _release_fifo(path: Path) -> None:
    """Unblock a reader stuck in open() on a FIFO (for the code before the fix)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------
# ScanLimits
# ------------------------------------------------------------------------------------------------
def test_scan_limits_defaults_and_validation() -> None:
    lim = ScanLimits()
    assert (lim.max_file_bytes, lim.max_decoded_bytes) == (MAX_FILE_BYTES, MAX_DECODED_BYTES)
    assert MAX_FILE_BYTES < 200_000_000 and MAX_DECODED_BYTES < 192_000_000  # below the reviewer's cases
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_file_bytes"):
            ScanLimits(max_file_bytes=bad)
    with pytest.raises(ValueError, match="MIN_SIDE"):
        ScanLimits(max_side=31)
    with pytest.raises(TypeError, match="ScanLimits"):
        load_scan(_grey(), limits={"max_file_bytes": 10})
    with pytest.raises(Exception, match="frozen|cannot assign"):
        lim.max_file_bytes = 1  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------
# Only regular files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["scan.png", "scan.dcm"])
def test_fifo_refused_without_blocking(tmp_path: Path, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    try:
        finished, elapsed, value = _in_thread(lambda: load_scan(fifo))
    finally:
        _release_fifo(fifo)
    assert finished, "load_scan blocked on a FIFO"
    assert isinstance(value, ScanNotRegularFileError), value
    assert isinstance(value, ScanNotImageError) and "FIFO" in str(value) and "not a regular file" in str(value)
    assert elapsed < 1.0


def test_fifo_swapped_in_after_the_check_cannot_block(tmp_path: Path, monkeypatch) -> None:
    """A regular file replaced by a FIFO between os.stat and open: O_NONBLOCK + fstat refuse it."""
    import medfedpure.scan.load as load_mod

    path = tmp_path / "swap.png"
    Image.fromarray(_grey()).save(path)
    real_stat = os.stat

    def stat_then_swap(p, *a, **k):
        st = real_stat(p, *a, **k)
        if os.fspath(p) == str(path):
            os.remove(path)
            os.mkfifo(path)
        return st

    monkeypatch.setattr(load_mod.os, "stat", stat_then_swap)
    try:
        finished, elapsed, value = _in_thread(lambda: load_scan(path))
    finally:
        monkeypatch.undo()
        _release_fifo(path)
    assert finished, "load_scan blocked on a swapped-in FIFO"
    assert isinstance(value, ScanNotRegularFileError) and "FIFO" in str(value), value
    assert elapsed < 1.0


def test_directory_and_device_refused(tmp_path: Path) -> None:
    with pytest.raises(ScanNotRegularFileError, match="directory"):
        load_scan(tmp_path)
    if os.path.exists("/dev/zero"):  # endless: reading it would never finish
        finished, _, value = _in_thread(lambda: load_scan("/dev/zero"))
        assert finished and isinstance(value, ScanNotRegularFileError) and "character device" in str(value)


def test_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "real.png"
    Image.fromarray(_grey()).save(path)
    (tmp_path / "link.png").symlink_to(path)
    np.testing.assert_array_equal(load_scan(tmp_path / "link.png").pixels, load_scan(path).pixels)


# ------------------------------------------------------------------------------------------------
# File-size cap
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zeros.dcm", "zeros.png"])
def test_200mb_sparse_zero_file_refused_fast(tmp_path: Path, monkeypatch, name: str) -> None:
    path = tmp_path / name
    with open(path, "wb") as fh:
        fh.truncate(200_000_000)  # sparse: no disk used
    _no_decoding(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ScanTooLargeError, match=r"200,000,000 bytes: the file-size cap is") as ei:
        load_scan(path)
    assert time.perf_counter() - t0 < 1.0
    assert "ScanLimits.max_file_bytes" in str(ei.value)


def test_file_size_cap_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    Image.fromarray(_grey()).save(path)
    size = path.stat().st_size
    data = path.read_bytes()
    load_scan(path, limits=ScanLimits(max_file_bytes=size))  # the cap itself is fine
    for src in (path, data, bytearray(data), memoryview(data)):
        with pytest.raises(ScanTooLargeError, match="file-size cap"):
            load_scan(src, limits=ScanLimits(max_file_bytes=size - 1))


# ------------------------------------------------------------------------------------------------
# Decoded-bytes budget, from the header
# ------------------------------------------------------------------------------------------------
def test_small_rgb_png_that_decodes_to_a_huge_image_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    # 8000 × 7999 RGB: under the 64-megapixel cap, but 192 MB of decoded pixels
    data = _png_header_only(8000, 7999)
    assert len(data) < 100
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    _no_decoding(monkeypatch)
    for src in (path, data):
        t0 = time.perf_counter()
        with pytest.raises(ScanTooLargeError, match=r"decodes to 191,976,000 bytes .*decoded-bytes budget"):
            load_scan(src)
        assert time.perf_counter() - t0 < 1.0


def test_decoded_bytes_budget_is_configurable_and_exact(tmp_path: Path) -> None:
    rgb = np.stack([_grey(1), _grey(2), _grey(3)], axis=-1)  # 48 × 40 × 3 uint8
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    exact = 48 * 40 * 3
    load_scan(buf.getvalue(), limits=ScanLimits(max_decoded_bytes=exact))
    with pytest.raises(ScanTooLargeError, match=r"48×40 pixels × 3 samples × 1 bytes"):
        load_scan(buf.getvalue(), limits=ScanLimits(max_decoded_bytes=exact - 1))
    g16 = (_grey().astype(np.uint16) * 200)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, format="PNG")
    load_scan(buf.getvalue(), limits=ScanLimits(max_decoded_bytes=48 * 40 * 2))
    with pytest.raises(ScanTooLargeError, match="decoded-bytes budget"):
        load_scan(buf.getvalue(), limits=ScanLimits(max_decoded_bytes=48 * 40 * 2 - 1))


def _dicom(rows: int, cols: int, *, spp: int = 1, bits: int = 16, frames: int = 1, rle: bool = False):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, RLELossless, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless if rle else "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, spp
    ds.PhotometricInterpretation = "RGB" if spp == 3 else "MONOCHROME2"
    if spp == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rle:  # one encapsulated fragment of a few KB
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\x00" * 4096])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = b"\x00" * 4096  # a few KB claiming far more
    return ds


@pytest.mark.parametrize("kw, decoded", [
    (dict(rows=4096, cols=4096, spp=3, bits=16, rle=True), 100_663_296),  # RLE RGB 16-bit: 16.8 Mpx, 100 MB
    (dict(rows=512, cols=512, frames=200), 104_857_600),  # 200 frames, all read with the pixel data
])
def test_dicom_decoded_bytes_refused_from_header(monkeypatch, kw, decoded: int) -> None:
    ds = _dicom(**kw)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    _no_decoding(monkeypatch)
    frame = 0 if kw.get("frames", 1) > 1 else None
    for src in (ds, buf.getvalue()):
        t0 = time.perf_counter()
        with pytest.raises(ScanTooLargeError, match=f"decodes to {decoded:,} bytes"):
            load_scan(src, frame=frame)
        assert time.perf_counter() - t0 < 1.0


def test_dicom_budget_is_configurable() -> None:
    import pydicom.data

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))  # 64 × 64 int16
    nbytes = 64 * 64 * 2
    load_scan(ds, limits=ScanLimits(max_decoded_bytes=nbytes))
    with pytest.raises(ScanTooLargeError, match=r"64×64 pixels × 1 samples × 2 bytes × 1 frames"):
        load_scan(ds, limits=ScanLimits(max_decoded_bytes=nbytes - 1))


def test_caller_array_over_budget_refused_without_copying() -> None:
    x = np.broadcast_to(np.float64(1.0), (4000, 4000))  # 128 MB declared, nothing allocated
    with pytest.raises(ScanTooLargeError, match="decodes to 128,000,000 bytes"):
        load_scan(x)
    load_scan(_grey(), limits=ScanLimits(max_decoded_bytes=48 * 40))
    with pytest.raises(ScanTooLargeError):
        load_scan(_grey(), limits=ScanLimits(max_decoded_bytes=48 * 40 - 1))


# ------------------------------------------------------------------------------------------------
# Bad arrays
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arr", [np.array(5.0), np.array(7, np.uint8), np.zeros((), np.int16)])
def test_zero_d_array_refused_with_shape_error(arr) -> None:
    before = arr.copy()
    with pytest.raises(ScanShapeError, match="0-d array"):
        load_scan(arr)
    np.testing.assert_array_equal(arr, before)


def test_other_bad_arrays_are_typed_refusals() -> None:
    with pytest.raises(ScanDtypeError):
        load_scan(np.empty((40, 40), dtype=object))
    with pytest.raises(ScanDtypeError):
        load_scan(np.zeros((40, 40), dtype=[("a", "u1"), ("b", "f4")]))
    with pytest.raises(ScanShapeError, match=r"\(N,\)"):
        load_scan(np.arange(1600, dtype=np.float32))
    with pytest.raises(ScanShapeError):
        load_scan(np.zeros((2, 40, 40, 3), np.uint8))


# ------------------------------------------------------------------------------------------------
# Partial failure: run_batch and medfedpure run
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_path() -> Path:
    return cached_tiny_bundle()


@pytest.fixture()
def d(bundle_path: Path) -> Defender:
    return Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)


def test_run_batch_returns_one_result_per_input(d: Defender, tmp_path: Path) -> None:
    good, other = _grey(1), _grey(2)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    bads = [np.zeros((40, 40, 4), np.uint8), b"not an image", np.array(3.0), tmp_path / "missing.png", fifo,
            np.full((40, 40), 7, np.uint8)]
    try:
        finished, _, value = _in_thread(lambda: d.run_batch([good, *bads, other], seeds=[5] * 8), timeout=60)
    finally:
        _release_fifo(fifo)
    assert finished and isinstance(value, list), value
    rs = value
    assert len(rs) == 8
    assert [r.status for r in rs] == ["ok"] + ["refused"] * 6 + ["ok"]
    assert [r.error for r in rs[1:7]] == ["ScanShapeError", "ScanNotImageError", "ScanShapeError",
                                          "ScanNotFoundError", "ScanNotRegularFileError", "ScanConstantError"]
    for r in rs[1:7]:
        assert r.label is None and r.probabilities == {} and r.flagged is None and r.t_star is None
        assert r.reason.startswith(r.error + ": ") and r.seed == 5
        row = json.loads(r.to_json())
        assert row["status"] == "refused" and row["error"] == r.error
    # the good scans are classified exactly as on their own
    alone = d.run_batch([good, other], seeds=[5, 5])
    for a, b in zip((rs[0], rs[7]), alone, strict=True):
        assert (a.label, a.flagged, a.t_star, a.error) == (b.label, b.flagged, b.t_star, None)
        assert abs(a.probabilities["tumor"] - b.probabilities["tumor"]) < 1e-6
    # all refused: no model runs
    rs = d.run_batch([b"x", np.array(1.0)])
    assert [r.status for r in rs] == ["refused", "refused"] and rs[0].latency_ms["mae"] == 0.0
    # run() on one bad scan still raises the typed error; usage errors raise for the whole call
    with pytest.raises(ScanShapeError):
        d.run(np.array(3.0))
    with pytest.raises(ValueError, match="seed"):
        d.run_batch([good, b"x"], seeds=[2**63, 0])
    with pytest.raises(ValueError, match="one seed"):
        d.run_batch([good, b"x"], seeds=[1])


def test_defender_limits(bundle_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    Image.fromarray(_grey()).save(path)
    tight = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1,
                          limits=ScanLimits(max_decoded_bytes=48 * 40 - 1))
    r = tight.run_batch([path])[0]
    assert r.status == "refused" and r.error == "ScanTooLargeError" and "decoded-bytes budget" in r.reason
    with pytest.raises(TypeError, match="ScanLimits"):
        Defender.load(bundle_path, backend="onnxruntime", device="cpu", limits=1024)


def _cli(args: list[str]):
    from medfedpure.cli import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


def test_cli_run_processes_every_file_and_exits_2_on_refusal(bundle_path: Path, tmp_path: Path) -> None:
    good, good2, bad = tmp_path / "a.png", tmp_path / "c.png", tmp_path / "b.png"
    Image.fromarray(_grey(1)).save(good)
    Image.fromarray(_grey(2)).save(good2)
    bad.write_bytes(b"not an image")
    base = ["run", "--bundle", str(bundle_path), "--seed", "5", "--threads", "1"]
    res = _cli([*base, "--json", str(good), str(bad), str(good2)])
    assert res.exit_code == 2, res.output
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [(r["scan"], r["status"]) for r in rows] == [(str(good), "ok"), (str(bad), "refused"),
                                                        (str(good2), "ok")]
    assert rows[1]["error"] == "ScanNotImageError" and rows[1]["label"] is None
    assert f"refused: {bad}: ScanNotImageError" in res.stderr and "Traceback" not in res.output
    res = _cli([*base, str(good), str(bad), str(good2)])  # table mode prints every row too
    assert res.exit_code == 2
    assert "a.png" in res.stdout and "b.png" in res.stdout and "c.png" in res.stdout
    assert "refused" in res.stdout
    res = _cli([*base, "--json", str(good), str(good2)])
    assert res.exit_code == 0


def test_cli_run_exit_1_when_unverified_and_2_for_usage_errors(bundle_path: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    good = tmp_path / "a.png"
    Image.fromarray(_grey(1)).save(good)
    base = ["run", "--bundle", str(bundle_path), "--threads", "1", "--json"]
    res = _cli([*base, "--seed", str(2**63), str(good)])
    assert res.exit_code == 2 and "Traceback" not in res.output and "seed" in res.output.lower()
    res = _cli([*base, str(good)] + ["--bundle", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    badb = tmp_path / "badbundle"
    badb.mkdir()
    (badb / "manifest.json").write_text("{not json")
    res = _cli(["run", "--bundle", str(badb), str(good)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert res.output.startswith("error:") and "Traceback" not in res.output
    # a failing stage: unverified, exit 1
    from medfedpure.runtime.engines.onnxruntime import OnnxRuntimeEngine

    monkeypatch.setattr(OnnxRuntimeEngine, "mae", lambda self, x: (_ for _ in ()).throw(RuntimeError("boom")))
    res = _cli([*base, "--seed", "1", str(good)])
    assert res.exit_code == 1 and json.loads(res.stdout.splitlines()[-1])["status"] == "unverified"


# ------------------------------------------------------------------------------------------------
# Runtime: the time budget while a stage runs; close() under concurrent use
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["mae", "classify", "denoise"])
def test_timeout_interrupts_a_stuck_stage(bundle_path: Path, monkeypatch, stage: str) -> None:
    d = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1, timeout_s=0.5,
                      policy="floor" if stage == "denoise" else None, overlap=False)
    x = tiny_scans(2, 3)
    d.run_array(x, seeds=[0, 0])  # warm
    orig = getattr(d.engine, stage)

    def stall(*a, **k):
        time.sleep(4.0)
        return orig(*a, **k)

    monkeypatch.setattr(d.engine, stage, stall)
    t0 = time.perf_counter()
    rs = d.run_array(x, seeds=[0, 0])
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.5, elapsed
    stage_name = "purify" if stage == "denoise" else stage
    for r in rs:
        assert r.status == "unverified" and r.label is None
        assert r.reason == f"timeout: the 0.5 s budget ran out during the {stage_name} stage"


def test_timeout_with_the_speculative_classifier_stuck(bundle_path: Path, monkeypatch) -> None:
    d = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1, timeout_s=0.5)
    assert d.overlap
    x = tiny_scans(1, 3)
    flagged = d.run_array(x, seeds=[0])[0].flagged
    orig = d.engine.classify
    monkeypatch.setattr(d.engine, "classify", lambda xb: (time.sleep(3.0), orig(xb))[1])
    t0 = time.perf_counter()
    r = d.run_array(x, seeds=[0])[0]
    assert time.perf_counter() - t0 < 1.5
    assert r.status == "unverified" and r.reason.startswith("timeout: the 0.5 s budget ran out")
    assert flagged is not None


def test_onnxruntime_run_is_terminated_by_the_interrupt(bundle_path: Path) -> None:
    """At the deadline the session run gets RunOptions.terminate: a run in progress stops and raises."""
    from medfedpure.runtime.engines.base import Interrupt, run_interruptible

    d = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)
    eng = d.engine
    seen: list[object] = []

    class FakeSession:
        def run(self, outputs, feeds, opts=None):
            seen.append(opts)
            while not opts.terminate:  # a stuck graph that honours the terminate flag
                time.sleep(0.01)
            raise RuntimeError("Exiting due to terminate flag being set to true.")

    eng.sessions = {**eng.sessions, "mae": FakeSession()}
    intr = Interrupt()
    box: dict[str, BaseException] = {}

    def work() -> None:
        try:
            run_interruptible(intr, eng.mae, tiny_scans(1, 0))
        except BaseException as e:  # noqa: BLE001
            box["e"] = e

    th = threading.Thread(target=work, daemon=True)
    th.start()
    time.sleep(0.2)
    assert th.is_alive() and len(seen) == 1 and seen[0].terminate is False
    intr.set()
    th.join(2.0)
    assert not th.is_alive() and "terminate" in str(box["e"])
    # already interrupted: the next run does not start
    with pytest.raises(RuntimeError, match="terminate"):
        run_interruptible(intr, eng.mae, tiny_scans(1, 0))
    assert seen[-1].terminate is True


def test_close_while_another_thread_runs(bundle_path: Path) -> None:
    d = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)
    assert d.overlap
    x = tiny_scans(4, 5)
    want = [r.probabilities for r in d.run_array(x, seeds=[1] * 4)]
    errors: list[BaseException] = []
    results: list[list] = []
    stop = threading.Event()

    def runner() -> None:
        while not stop.is_set():
            try:
                results.append(d.run_array(x, seeds=[1] * 4))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    th = threading.Thread(target=runner, daemon=True)
    th.start()
    t_end = time.perf_counter() + 2.0
    closes = 0
    while time.perf_counter() < t_end:
        d.close()
        closes += 1
        time.sleep(0.002)
    stop.set()
    th.join(10)
    assert not th.is_alive()
    assert errors == [], errors
    assert len(results) > 0 and closes > 50
    for rs in results:
        for r, p in zip(rs, want, strict=True):
            assert r.status in ("ok", "unverified")
            if r.ok:
                assert r.probabilities == p
    d.close()
    assert d._pool is None
    assert [r.probabilities for r in d.run_array(x, seeds=[1] * 4)] == want  # a later run restarts the pool
    assert d._pool is not None
    d.close()


def test_caller_data_untouched_by_refusal_and_batch(d: Defender) -> None:
    good = _grey(4)
    bad = np.zeros((40, 40, 4), np.uint8)
    g0, b0 = good.copy(), bad.copy()
    d.run_batch([good, bad], seeds=[0, 0])
    np.testing.assert_array_equal(good, g0)
    np.testing.assert_array_equal(bad, b0)
    assert isinstance(ScanError("x"), ValueError)
