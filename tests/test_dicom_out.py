"""DICOM out: the Structured Report and Secondary Captures of a Result, written and read back with pydicom and
highdicom (real libraries, the embedded default bundle, pydicom's ``MR_small.dcm``)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

hd = pytest.importorskip("highdicom")

from medfedpure.runtime import dicom_out  # noqa: E402
from medfedpure.runtime.defender import Defender, Result  # noqa: E402

SEED = 11
LEAK = "LEAKMARKER"


def _mr_path() -> str:
    return get_testdata_file("MR_small.dcm")


@pytest.fixture(scope="module")
def defender() -> Defender:
    return Defender.default(threads=1)


@pytest.fixture(scope="module")
def result(defender: Defender) -> Result:
    r = defender.run(_mr_path(), seed=SEED, return_purified=True, return_patch_error=True)
    assert r.status == "ok" and r.label is not None
    return r


@pytest.fixture()
def source() -> pydicom.Dataset:
    """MR_small with identifying attributes outside the patient/study modules and a private tag added."""
    ds = pydicom.dcmread(_mr_path())
    ds.InstitutionName = f"{LEAK} Hospital"
    ds.InstitutionAddress = f"{LEAK} Street 1"
    ds.OperatorsName = f"{LEAK}^Operator"
    ds.StationName = f"{LEAK}ST"
    ds.DeviceSerialNumber = f"{LEAK}SN"
    block = ds.private_block(0x0011, "MFPTEST", create=True)
    block.add_new(0x01, "LO", f"{LEAK} private")
    return ds


def _walk(ds: pydicom.Dataset):
    for el in ds:
        yield el
        if el.VR == "SQ":
            for item in el.value:
                yield from _walk(item)


def _items(sr: pydicom.Dataset) -> dict[str, Any]:
    """Root content items by concept code value → the item."""
    out: dict[str, Any] = {}
    for it in sr.ContentSequence:
        out.setdefault(it.ConceptNameCodeSequence[0].CodeValue, it)
    return out


def _write_read(ds: pydicom.Dataset, tmp_path: Path) -> tuple[pydicom.Dataset, bytes]:
    p = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return pydicom.dcmread(p), p.read_bytes()


# ------------------------------------------------------------------------------------------------
# Structured Report
# ------------------------------------------------------------------------------------------------
def test_sr_round_trip_records_the_result(result: Result, source: pydicom.Dataset, tmp_path: Path) -> None:
    sr = dicom_out.structured_report(result, source)
    back, _ = _write_read(sr, tmp_path)
    parsed = hd.sr.srread(tmp_path / f"{sr.SOPInstanceUID}.dcm")
    assert isinstance(parsed, hd.sr.ComprehensiveSR)
    assert back.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and back.Modality == "SR"
    # evidence: exactly the source instance
    assert parsed.get_evidence() == [(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID,
                                      source.SOPClassUID)]
    items = _items(back)
    img = items["121322"]
    assert img.ValueType == "IMAGE"
    assert img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert img.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    # same study and patient, new series and instance
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientName == source.PatientName and back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SOPInstanceUID != source.SOPInstanceUID
    assert back.SeriesNumber == 900 and back.InstanceNumber == 1
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    # the recorded decision equals the Result's, bit for bit
    assert items["MFP-STATUS"].TextValue == "ok"
    assert "MFP-REASON" not in items
    assert items["121071"].ConceptCodeSequence[0].CodeMeaning == result.label
    classes = list(result.probabilities)
    assert items["121071"].ConceptCodeSequence[0].CodeValue == f"CLASS{classes.index(result.label)}"
    for j, (cls, p) in enumerate(result.probabilities.items()):
        num = items[f"P{j}"]
        assert num.ConceptNameCodeSequence[0].CodeMeaning == f"Probability of {cls}"
        assert float(num.MeasuredValueSequence[0].FloatingPointValue) == p
    assert float(items["MFP-SCORE"].MeasuredValueSequence[0].FloatingPointValue) == result.score
    assert int(float(items["MFP-TSTAR"].MeasuredValueSequence[0].NumericValue)) == result.t_star
    assert items["MFP-FLAGGED"].ConceptCodeSequence[0].CodeValue == ("373066001" if result.flagged else
                                                                     "373067005")
    assert items["MFP-POLICY"].TextValue == result.policy
    assert items["MFP-BUNDLE"].TextValue == result.bundle_id
    assert int(items["MFP-SEED"].TextValue) == result.seed == SEED
    from medfedpure import __version__

    assert back.SoftwareVersions == __version__
    assert items["111003"].TextValue == __version__  # TID 4019 Algorithm Version
    params = {it.TextValue for it in back.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "111002"}
    assert {f"bundle_id={result.bundle_id}", f"seed={SEED}", f"policy={result.policy}"} <= params
    # highdicom's reader parses the content tree with its value types
    parsed_items = {it.name.value: it for it in parsed.content[0].ContentSequence}
    assert parsed_items["P1"].value == result.probabilities[classes[1]]


def test_sr_carries_nothing_of_the_source_beyond_patient_and_study(result: Result, source: pydicom.Dataset,
                                                                   tmp_path: Path) -> None:
    back, raw = _write_read(dicom_out.structured_report(result, source), tmp_path)
    assert LEAK.encode() not in raw
    assert not any(el.tag.is_private for el in _walk(back))
    for kw in ("InstitutionName", "InstitutionAddress", "OperatorsName", "StationName", "DeviceSerialNumber",
               "ImageComments", "ManufacturerModelName"):
        assert kw not in back, kw
    assert back.Manufacturer == "medfedpure"


def test_sr_explicit_numbers_and_version(result: Result, source: pydicom.Dataset) -> None:
    sr = dicom_out.structured_report(result, [source], series_number=77, instance_number=3,
                                     software_version="9.9.9-test")
    assert (sr.SeriesNumber, sr.InstanceNumber, sr.SoftwareVersions) == (77, 3, "9.9.9-test")
    with pytest.raises(ValueError, match="series_number"):
        dicom_out.structured_report(result, source, series_number=0)
    with pytest.raises(ValueError, match="software_version"):
        dicom_out.structured_report(result, source, software_version="")


def test_sr_two_sources_are_both_evidence(result: Result, source: pydicom.Dataset) -> None:
    other = pydicom.dcmread(_mr_path())
    other.SOPInstanceUID = generate_uid()
    sr = dicom_out.structured_report(result, [source, other])
    got = {e[2] for e in sr.get_evidence()}
    assert got == {source.SOPInstanceUID, other.SOPInstanceUID}


@pytest.mark.parametrize("status", ["unverified", "refused", "out_of_scope"])
def test_sr_of_a_result_without_answer_has_no_label(result: Result, source: pydicom.Dataset, tmp_path: Path,
                                                    status: str) -> None:
    # a malformed Result that still carries a label: the report must not show it unless the status is ok
    bad = dataclasses.replace(result, status=status, reason=f"{status}: the test's reason")
    back, _ = _write_read(dicom_out.structured_report(bad, source), tmp_path)
    items = _items(back)
    assert items["MFP-STATUS"].TextValue == status
    assert items["MFP-REASON"].TextValue == f"{status}: the test's reason"
    assert "121071" not in items and "P0" not in items and "P1" not in items
    assert not any(it.ValueType == "CODE" and it.ConceptNameCodeSequence[0].CodeValue == "121071"
                   for it in _walk(back) if hasattr(it, "ValueType") and hasattr(it, "ConceptNameCodeSequence"))
    assert back.CompletionFlag == "PARTIAL"


def test_sr_of_a_refused_scan(defender: Defender, source: pydicom.Dataset, tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(_mr_path())
    ds.PixelData = ds.PixelData[:100]  # truncated pixels: the scan is refused, no model runs
    ds.save_as(broken, enforce_file_format=True)
    r = defender.run_batch([str(broken)], seeds=[1])[0]
    assert r.status == "refused" and r.label is None
    back, _ = _write_read(dicom_out.structured_report(r, ds), tmp_path)
    items = _items(back)
    assert items["MFP-STATUS"].TextValue == "refused" and "121071" not in items
    assert items["MFP-REASON"].TextValue == r.reason
    assert "MFP-SCORE" not in items and "MFP-TSTAR" not in items


def test_result_to_dicom_sr(result: Result, source: pydicom.Dataset) -> None:
    a = result.to_dicom_sr(source)
    b = dicom_out.structured_report(result, source)
    assert isinstance(a, hd.sr.ComprehensiveSR)
    assert [(it.ValueType, it.ConceptNameCodeSequence[0].CodeValue) for it in a.ContentSequence] == \
           [(it.ValueType, it.ConceptNameCodeSequence[0].CodeValue) for it in b.ContentSequence]
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID


def _image_refs(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The ReferencedSOPSequence items of the report's IMAGE content items."""
    return [el.value[0] for el in _walk(sr) if el.keyword == "ReferencedSOPSequence"]


def test_sr_names_the_frame_of_a_multiframe_source(result: Result, source: pydicom.Dataset) -> None:
    source.NumberOfFrames = 3
    refs = _image_refs(dicom_out.structured_report(result, source, frame=2))
    # the IMAGE content item names the frame (0-based frame 2 is DICOM frame number 3); the evidence does not
    assert [int(r.ReferencedFrameNumber) for r in refs if "ReferencedFrameNumber" in r] == [3]
    plain = _image_refs(dicom_out.structured_report(result, source))
    assert plain and all("ReferencedFrameNumber" not in r for r in plain)
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match="frame"):
            dicom_out.structured_report(result, source, frame=bad)


def test_sr_refuses_bad_sources(result: Result, source: pydicom.Dataset) -> None:
    with pytest.raises(TypeError, match="pydicom.Dataset"):
        dicom_out.structured_report(result, _mr_path())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        dicom_out.structured_report(result, [])
    no_uid = pydicom.dcmread(_mr_path())
    del no_uid.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        dicom_out.structured_report(result, no_uid)
    other_study = pydicom.dcmread(_mr_path())
    other_study.StudyInstanceUID = generate_uid()
    other_study.SOPInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="studies"):
        dicom_out.structured_report(result, [source, other_study])
    # the Result was read from another instance than the one given
    with pytest.raises(ValueError, match="not among the sources"):
        dicom_out.structured_report(result, other_study)


# ------------------------------------------------------------------------------------------------
# Secondary Capture
# ------------------------------------------------------------------------------------------------
def test_sc_purified_round_trip(result: Result, source: pydicom.Dataset, tmp_path: Path) -> None:
    sc = dicom_out.secondary_capture(result, source, "purified")
    back, raw = _write_read(sc, tmp_path)
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    px = back.pixel_array
    size = result.purified.shape[-1]
    assert px.shape == (size, size) and px.dtype == np.uint8
    slope = float(back.RescaleSlope)
    assert slope == pytest.approx(1 / 255, rel=1e-12) and float(back.RescaleIntercept) == 0.0
    want = np.clip(result.purified[0].astype(np.float64), 0, 1)
    assert np.abs(px * slope - want).max() <= 0.5 / 255 + 1e-9
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SeriesNumber == 901
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(back.PatientOrientation) == ["L", "P"]  # MR_small: rows along +x, columns along +y
    assert LEAK.encode() not in raw and not any(el.tag.is_private for el in _walk(back))


def test_sc_patch_map_round_trip(result: Result, source: pydicom.Dataset, tmp_path: Path) -> None:
    sc = dicom_out.secondary_capture(result, source, "patch_map", series_number=902)
    back, _ = _write_read(sc, tmp_path)
    err = result.patch_error.astype(np.float64)
    g = int(np.sqrt(err.size))
    assert g * g == err.size
    px = back.pixel_array
    assert px.shape == (g, g) and px.dtype == np.uint8 and int(px.max()) == 255
    slope = float(back.RescaleSlope)
    assert slope == pytest.approx(err.max() / 255, rel=1e-10)
    assert np.abs(px.astype(np.float64) * slope - err.reshape(g, g)).max() <= slope / 2 * (1 + 1e-6)
    assert back.SeriesNumber == 902 and back.StudyInstanceUID == source.StudyInstanceUID
    assert "patch map" in back.DerivationDescription


def test_sc_without_the_array_names_the_run_option(result: Result, source: pydicom.Dataset) -> None:
    bare = dataclasses.replace(result, purified=None, patch_error=None)
    with pytest.raises(ValueError, match="return_purified=True"):
        dicom_out.secondary_capture(bare, source, "purified")
    with pytest.raises(ValueError, match="return_patch_error=True"):
        dicom_out.secondary_capture(bare, source, "patch_map")
    with pytest.raises(ValueError, match="'purified', 'patch_map'"):
        dicom_out.secondary_capture(result, source, "heatmap")
    no_orient = pydicom.dcmread(_mr_path())
    del no_orient.ImageOrientationPatient
    with pytest.raises(ValueError, match="orientation"):
        dicom_out.secondary_capture(result, no_orient, "purified")


# ------------------------------------------------------------------------------------------------
# Import without the extra; CLI
# ------------------------------------------------------------------------------------------------
def test_runtime_imports_without_highdicom_and_names_the_extra() -> None:
    code = ("import sys; sys.modules['highdicom'] = None\n"
            "import medfedpure.runtime.dicom_out as d, medfedpure.runtime.defender\n"
            "try:\n    d._highdicom()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'medfedpure[dicom]'" in out


def test_cli_dicom_out_writes_files_that_read_back(tmp_path: Path) -> None:
    from medfedpure.cli import app
    from typer.testing import CliRunner

    mr = tmp_path / "mr.dcm"
    pydicom.dcmread(_mr_path()).save_as(mr, enforce_file_format=True)
    png = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(png)
    out = tmp_path / "dicom"
    res = CliRunner().invoke(app, ["run", str(mr), str(png), "--json", "--seed", "5", "--threads", "1",
                                   "--dicom-out", str(out), "--dicom-sc", "purified,patch-map"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert f"dicom-out: {png}: not a DICOM file, no SR written for it" in res.stderr
    files = sorted(out.iterdir())
    assert len(files) == 3
    by_class = {}
    for f in files:
        ds = pydicom.dcmread(f)
        assert f.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.StudyInstanceUID == pydicom.dcmread(mr).StudyInstanceUID
        by_class[ds.SOPClassUID] = f
    sr = hd.sr.srread(by_class[pydicom.uid.ComprehensiveSRStorage])
    items = _items(sr)
    assert items["121071"].ConceptCodeSequence[0].CodeMeaning == rows[0]["label"]
    assert float(items["P1"].MeasuredValueSequence[0].FloatingPointValue) == rows[0]["probabilities"]["tumor"]
    assert int(items["MFP-SEED"].TextValue) == 5
    scs = [pydicom.dcmread(f) for f in files if pydicom.dcmread(f).SOPClassUID
           == pydicom.uid.SecondaryCaptureImageStorage]
    assert sorted(ds.SeriesNumber for ds in scs) == [901, 902]
    res = CliRunner().invoke(app, ["run", str(mr), "--dicom-sc", "purified"])
    assert res.exit_code == 2 and "--dicom-out" in res.output
    res = CliRunner().invoke(app, ["run", str(mr), "--dicom-out", str(out), "--dicom-sc", "heatmap"])
    assert res.exit_code == 2 and "heatmap" in res.output
