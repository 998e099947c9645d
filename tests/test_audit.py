"""The audit record (schema version 1): its fields and values, no patient names or paths, the JSON-lines
logging, ``medfedpure run --audit`` and ``medfedpure replay``."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from medfedpure import __version__  # noqa: E402
from medfedpure.cli import app  # noqa: E402
from medfedpure.runtime.audit import (  # noqa: E402
    AUDIT_FIELDS,
    AUDIT_SCHEMA_VERSION,
    AuditRecordError,
    JsonLinesFormatter,
    audit_file_handler,
    audit_record,
    log_audit,
    read_audit_record,
)
from medfedpure.runtime.defender import Defender  # noqa: E402
from medfedpure.scan import load_scan  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

PATIENT = "Doe^Jane"


def _path(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return str(path)


@pytest.fixture(scope="module")
def d() -> Defender:
    return Defender.default(backend="onnxruntime", device="cpu", threads=1)


@pytest.fixture()
def patient_dir(tmp_path: Path) -> Path:
    """A folder named after the patient holding MR_small with that PatientName, and an empty file that the
    loader refuses (its reason quotes the file name)."""
    folder = tmp_path / f"{PATIENT}_scans"
    folder.mkdir()
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    ds.PatientName = PATIENT
    ds.PatientID = "PID-424242"
    ds.save_as(folder / f"{PATIENT}.dcm", enforce_file_format=True)
    (folder / f"{PATIENT}_empty.dcm").write_bytes(b"")
    return folder


def _run(*args: str) -> object:
    return CliRunner().invoke(app, ["run", *args, "--threads", "1", "--backend", "onnxruntime", "--device", "cpu"])


def _replay(*args: str) -> object:
    return CliRunner().invoke(app, ["replay", *args])


# --- the record ----------------------------------------------------------------------------------
def test_record_carries_every_field_with_its_value(d: Defender) -> None:
    path = _path("MR_small.dcm")
    r = d.run(path, seed=11)
    before = dt.datetime.now(dt.timezone.utc)
    rec = audit_record(r, d, source=path)
    assert tuple(rec) == AUDIT_FIELDS  # every field, in order, and nothing else (no source)
    pixels = load_scan(path).pixels
    assert rec["pixel_sha256"] == hashlib.sha256(pixels.tobytes()).hexdigest() == r.pixel_sha256
    ds = pydicom.dcmread(path)
    assert rec["dicom"] == {"study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID,
                            "sop_uid": ds.SOPInstanceUID}
    g = d.engine.gate_spec
    signer = d.bundle.signer
    assert rec["schema_version"] == AUDIT_SCHEMA_VERSION == 1 and rec["medfedpure_version"] == __version__
    assert rec["bundle_id"] == d.bundle.bundle_id and rec["signer"] == {"name": signer.name, "key_id": signer.key_id}
    assert (rec["backend"], rec["device"], rec["precision"]) == ("onnxruntime", "cpu", "fp32")
    assert rec["policy"] == d.policy and rec["tau"] == g.tau and rec["t_range"] == [g.t_min, g.t_max]
    assert rec["seed"] == 11 and rec["status"] == "ok" and rec["reason"] is None and rec["error"] is None
    assert rec["label"] == r.label and rec["probabilities"] == r.probabilities
    assert rec["flagged"] == r.flagged and rec["score"] == r.score and rec["score_quantile"] == r.score_quantile
    assert rec["t_star"] == r.t_star and rec["latency_ms"] == r.latency_ms and rec["frame"] is None
    assert rec["scope"]["in_scope"] is True and rec["scope"]["modality"] == "MR"
    stamp = dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
    assert rec["timestamp"].endswith("Z") and stamp.utcoffset() == dt.timedelta(0)
    assert abs((stamp - before).total_seconds()) < 60
    json.dumps(rec, allow_nan=False)  # JSON-ready as is
    assert audit_record(r, d, source=path, include_source=True)["source"] == path


def test_record_of_an_array_has_no_dicom_part(d: Defender) -> None:
    x = np.random.default_rng(1).random((40, 40)).astype(np.float32)
    rec = audit_record(d.run(x, seed=2), d)
    assert rec["dicom"] is None and rec["pixel_sha256"] == hashlib.sha256(x.tobytes()).hexdigest()
    assert rec["scope"]["modality"] == "unknown"


def test_no_patient_name_and_no_path_in_the_audit_file(patient_dir: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    res = _run(str(patient_dir), "--seed", "4", "--audit", str(audit), "--quiet")
    assert res.exit_code == 2, res.output  # the empty file is refused, the scan is classified
    text = audit.read_text()
    recs = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["status"] for r in recs) == ["ok", "refused"]
    assert "Doe" not in text and "Jane" not in text and "PID-424242" not in text
    assert str(tmp_path) not in text and "_scans" not in text and "/" not in text.replace("\\/", "")
    refused = next(r for r in recs if r["status"] == "refused")
    assert "<source>" in refused["reason"] and refused["pixel_sha256"] is None
    assert all("source" not in r for r in recs)
    # asked for: the path is recorded
    audit2 = tmp_path / "audit2.jsonl"
    _run(str(patient_dir / f"{PATIENT}.dcm"), "--seed", "4", "--audit", str(audit2), "--audit-source", "--quiet")
    (rec,) = [json.loads(line) for line in audit2.read_text().splitlines()]
    assert rec["source"] == str(patient_dir / f"{PATIENT}.dcm")


def test_quiet_prints_nothing_and_log_level_info_prints_the_records(tmp_path: Path) -> None:
    res = _run(_path("MR_small.dcm"), "--seed", "4", "--quiet")
    assert res.exit_code == 0 and res.stdout == "", res.stdout
    res = _run(_path("MR_small.dcm"), "--seed", "4", "--quiet", "--log-level", "INFO")
    line = next(x for x in res.stderr.splitlines() if x.startswith("INFO medfedpure.audit: "))
    assert json.loads(line.split(": ", 1)[1])["seed"] == 4
    assert not logging.getLogger("medfedpure").handlers  # the command removed its handlers


# --- logging -------------------------------------------------------------------------------------
def test_handler_writes_one_json_object_per_line(d: Defender, tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    handler = audit_file_handler(path, mode="w")
    log = logging.getLogger("medfedpure")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        recs = [audit_record(d.run(_path(n), seed=i), d) for i, n in enumerate(["MR_small.dcm", "CT_small.dcm"])]
        for rec in recs:
            log_audit(rec)
        logging.getLogger("medfedpure.serve").warning("not an audit record: filtered out of the file")
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line) for line in lines] == recs
    assert [json.loads(line)["status"] for line in lines] == ["ok", "out_of_scope"]


def test_formatter_writes_plain_records_as_json() -> None:
    rec = logging.LogRecord("medfedpure.x", logging.WARNING, __file__, 1, "hello %s", ("there",), None)
    out = json.loads(JsonLinesFormatter().format(rec))
    assert out["level"] == "WARNING" and out["logger"] == "medfedpure.x" and out["message"] == "hello there"
    assert out["timestamp"].endswith("Z")


def test_read_audit_record(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    base = {k: None for k in AUDIT_FIELDS}
    recs = [{**base, "schema_version": 1, "seed": i, "dicom": {"sop_uid": f"1.2.{i}"}} for i in range(3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert read_audit_record(p, line=2)["seed"] == 1
    assert read_audit_record(p, sop_uid="1.2.2")["seed"] == 2
    with pytest.raises(AuditRecordError, match="holds 3 records"):
        read_audit_record(p)
    with pytest.raises(AuditRecordError, match="no record with SOP"):
        read_audit_record(p, sop_uid="9.9")
    with pytest.raises(AuditRecordError, match="no record on line 7"):
        read_audit_record(p, line=7)
    p.write_text(json.dumps({**recs[0], "schema_version": 2}) + "\n")
    with pytest.raises(AuditRecordError, match="schema_version 2"):
        read_audit_record(p)
    p.write_text("not json\n")
    with pytest.raises(AuditRecordError, match="not JSON"):
        read_audit_record(p)


# --- replay --------------------------------------------------------------------------------------
@pytest.fixture()
def recorded(tmp_path: Path) -> Path:
    """An audit file of MR_small then CT_small under policy floor (every scan purified: the seed matters)."""
    audit = tmp_path / "audit.jsonl"
    res = _run(_path("MR_small.dcm"), _path("CT_small.dcm"), "--seed", "9", "--policy", "floor",
               "--allow-out-of-scope", "--audit", str(audit), "--quiet")
    assert res.exit_code == 0, res.output
    return audit


def test_replay_identical(recorded: Path) -> None:
    res = _replay(str(recorded), "--line", "1", "--scan", _path("MR_small.dcm"), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["identical"] is True and out["differs"] == []
    assert out["fields"]["t_star"]["recorded"] > 0  # it was purified
    sop = pydicom.dcmread(_path("CT_small.dcm")).SOPInstanceUID
    res = _replay(str(recorded), "--sop-uid", sop, "--scan", _path("CT_small.dcm"))
    assert res.exit_code == 0, res.output
    assert "identical" in res.stdout  # with the scope override replayed


def test_replay_refuses_another_scan(recorded: Path) -> None:
    res = _replay(str(recorded), "--line", "1", "--scan", _path("CT_small.dcm"))
    assert res.exit_code == 2
    assert "pixel sha256 mismatch" in res.stderr and "not the scan the record was made from" in res.stderr


def test_replay_after_changing_the_seed_differs(recorded: Path, tmp_path: Path) -> None:
    rec = json.loads(recorded.read_text().splitlines()[0])
    rec["seed"] += 1
    edited = tmp_path / "edited.jsonl"
    edited.write_text(json.dumps(rec) + "\n")
    res = _replay(str(edited), "--scan", _path("MR_small.dcm"), "--json")
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    assert "probabilities" in out["differs"] and "seed" not in out["differs"]


@pytest.mark.parametrize("edit, needle", [
    ({"schema_version": 2}, "schema_version 2"),
    ({"bundle_id": "0" * 64}, "cannot load the record's bundle"),
    ({"backend": "nonesuch"}, "cannot load the record's bundle"),
])
def test_replay_bad_input(recorded: Path, tmp_path: Path, edit: dict, needle: str) -> None:
    rec = {**json.loads(recorded.read_text().splitlines()[0]), **edit}
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    res = _replay(str(p), "--scan", _path("MR_small.dcm"))
    assert res.exit_code == 2 and needle in res.stderr, res.output
