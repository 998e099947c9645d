"""The DICOM node (``medfedpure listen``): a real pynetdicom Storage SCP, real SCUs, pydicom's MR test files.

Every node listens on a free loopback port (port 0) and shares one Defender of the embedded default
bundle (loading it takes about a second; a node never closes a Defender it did not load).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pydicom.data
import pynetdicom._config
import pytest
from medfedpure.cli import app
from medfedpure.node import scp
from medfedpure.node.config import ForwardTarget, NodeConfig, parse_host_port
from medfedpure.node.scp import DicomNode, transfer_syntaxes
from medfedpure.runtime.defender import Defender
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)
from typer.testing import CliRunner

MR = pydicom.data.get_testdata_file("MR_small.dcm")
MR_RLE = pydicom.data.get_testdata_file("MR_small_RLE.dcm")
MR_TRUNCATED = pydicom.data.get_testdata_file("MR_truncated.dcm")
CT = pydicom.data.get_testdata_file("CT_small.dcm")
TIMEOUT = 20


@pytest.fixture(scope="module")
def defender():
    d = Defender.default()
    yield d
    d.close()


@pytest.fixture()
def store_node(defender, tmp_path):
    node = DicomNode(NodeConfig(port=0, store=str(tmp_path / "reports")), defender).start()
    yield node
    node.stop()


def _scu(*contexts: tuple[str, list[str] | None], ae_title: str = "TESTSCU") -> AE:
    ae = AE(ae_title=ae_title)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, TIMEOUT)
    for uid, syntaxes in contexts or ((MRImageStorage, None), (Verification, None)):
        if syntaxes is None:
            ae.add_requested_context(uid)
        else:
            ae.add_requested_context(uid, syntaxes)
    return ae


def _send(port: int, dataset, *, called: str = "MEDFEDPURE", contexts=()) -> pydicom.Dataset:
    """One association, one C-STORE; the response's status dataset."""
    assoc = _scu(*contexts).associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return assoc.send_c_store(dataset)
    finally:
        assoc.release()


def _evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {str(ref.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def _content_image_uids(sr: pydicom.Dataset) -> set[str]:
    return {str(ref.ReferencedSOPInstanceUID) for item in sr.ContentSequence if item.ValueType == "IMAGE"
            for ref in item.ReferencedSOPSequence}


def _text(sr: pydicom.Dataset, meaning: str) -> str:
    (value,) = [str(item.TextValue) for item in sr.ContentSequence if item.ValueType == "TEXT"
                and item.ConceptNameCodeSequence[0].CodeMeaning == meaning]
    return value


# -- association, C-ECHO, storage ------------------------------------------------------------------

def test_c_echo_returns_success(store_node):
    assoc = _scu().associate("127.0.0.1", store_node.port, ae_title="MEDFEDPURE")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def test_store_writes_the_report_named_by_its_uid(store_node, defender, tmp_path):
    sent = pydicom.dcmread(MR)
    status = _send(store_node.port, sent)
    assert status.Status == 0x0000
    files = list((tmp_path / "reports").iterdir())
    assert len(files) == 1 and files[0].suffix == ".dcm"
    sr = pydicom.dcmread(files[0])
    assert files[0].stem == str(sr.SOPInstanceUID)
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == sent.StudyInstanceUID and sr.SeriesInstanceUID != sent.SeriesInstanceUID
    assert _evidence_uids(sr) == _content_image_uids(sr) == {str(sent.SOPInstanceUID)}
    # the report carries the Defender's decision on exactly this image
    expected = defender.run(sent)
    assert _text(sr, "Decision status") == expected.status == "ok"
    assert _text(sr, "Bundle id") == defender.bundle.bundle_id
    finding = [i for i in sr.ContentSequence if i.ValueType == "CODE"
               and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
    assert finding[0].ConceptCodeSequence[0].CodeMeaning == expected.label
    out = store_node.last_outcome
    assert out.status == 0x0000 and out.reports == (str(sr.SOPInstanceUID),) and out.reason is None
    assert not [f for f in (tmp_path / "reports").iterdir() if f.name.endswith(".part")]


def test_forward_sends_the_report_to_a_second_scp(defender):
    received: list[pydicom.Dataset] = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    dest = AE(ae_title="PACS")
    dest.add_supported_context(ComprehensiveSRStorage)
    server = dest.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        cfg = NodeConfig(port=0, forward=ForwardTarget("127.0.0.1", port, "PACS"), forward_timeout_s=TIMEOUT)
        with DicomNode(cfg, defender) as node:
            sent = pydicom.dcmread(MR)
            assert _send(node.port, sent).Status == 0x0000
    finally:
        server.shutdown()
    assert len(received) == 1
    sr = received[0]
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert _evidence_uids(sr) == {str(sent.SOPInstanceUID)}
    assert sr.StudyInstanceUID == sent.StudyInstanceUID
    assert _text(sr, "Decision status") == "ok"


def test_forward_destination_down_is_out_of_resources_and_the_node_keeps_serving(defender, caplog):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    cfg = NodeConfig(port=0, forward=ForwardTarget("127.0.0.1", dead_port, "PACS"), forward_timeout_s=2.0)
    with caplog.at_level(logging.WARNING, logger="medfedpure.node"), DicomNode(cfg, defender) as node:
        status = _send(node.port, pydicom.dcmread(MR))
        assert status.Status == scp.FORWARD_FAILED == 0xA701
        assert "PACS@127.0.0.1" in str(status.ErrorComment)
        assert len(node.last_outcome.results) == 1 and node.last_outcome.results[0].ok  # it was classified
        assert _scu().associate("127.0.0.1", node.port, ae_title="MEDFEDPURE").send_c_echo().Status == 0
    assert any("0xA701" in r.getMessage() and r.name == "medfedpure.node" for r in caplog.records)


def test_rle_compressed_mr_is_accepted(store_node, tmp_path):
    assert RLELossless in transfer_syntaxes()
    status = _send(store_node.port, MR_RLE, contexts=((MRImageStorage, [RLELossless]),))
    assert status.Status == 0x0000
    assert len(list((tmp_path / "reports").glob("*.dcm"))) == 1


def test_enhanced_mr_is_negotiated_and_classified(store_node, tmp_path):
    ds = pydicom.dcmread(MR)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    status = _send(store_node.port, ds, contexts=((EnhancedMRImageStorage, None),))
    assert status.Status == 0x0000
    (f,) = (tmp_path / "reports").glob("*.dcm")
    assert _evidence_uids(pydicom.dcmread(f)) == {str(ds.SOPInstanceUID)}


def test_multi_frame_gives_one_report_per_frame(store_node, defender, tmp_path):
    ds = pydicom.dcmread(MR)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2  # the same 64×64 slice twice
    assert _send(store_node.port, ds, contexts=((EnhancedMRImageStorage, None),)).Status == 0x0000
    out = store_node.last_outcome
    assert len(out.results) == 2 and len(out.reports) == 2
    assert out.results[0].label == out.results[1].label == defender.run(pydicom.dcmread(MR)).label
    srs = sorted((pydicom.dcmread(f) for f in (tmp_path / "reports").glob("*.dcm")), key=lambda d: d.InstanceNumber)
    assert [int(sr.InstanceNumber) for sr in srs] == [1, 2]
    assert all(_evidence_uids(sr) == {str(ds.SOPInstanceUID)} for sr in srs)
    frames = [[int(ref.ReferencedFrameNumber) for it in _walk_items(sr) if "ReferencedSOPSequence" in it
               for ref in it.ReferencedSOPSequence if "ReferencedFrameNumber" in ref] for sr in srs]
    assert frames == [[1], [2]]  # each report names its frame


def _walk_items(ds):
    for it in ds.get("ContentSequence", []):
        yield it
        yield from _walk_items(it)


def test_an_unverified_decision_is_reported_without_a_finding(tmp_path, caplog):
    # a budget no stage can meet: every decision is "unverified" (fail closed), and the report says so
    with caplog.at_level(logging.WARNING, logger="medfedpure.node"), \
            DicomNode(NodeConfig(port=0, store=str(tmp_path), timeout_s=1e-9)) as node:
        assert _send(node.port, pydicom.dcmread(MR)).Status == 0x0000
    (f,) = tmp_path.glob("*.dcm")
    sr = pydicom.dcmread(f)
    assert _text(sr, "Decision status") == "unverified" and "timeout" in _text(sr, "Reason")
    assert not [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
    assert sr.CompletionFlag == "PARTIAL"
    assert any("unverified/None" in r.getMessage() for r in caplog.records if r.name == "medfedpure.node")


def test_deflated_transfer_syntax_is_decoded(store_node):
    ds = pydicom.dcmread(MR)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    status = _send(store_node.port, ds, contexts=((MRImageStorage, [DeflatedExplicitVRLittleEndian]),))
    assert status.Status == 0x0000 and store_node.last_outcome.results[0].ok


def test_concurrent_associations_share_one_defender(store_node, tmp_path):
    def one(_: int) -> int:
        return int(_send(store_node.port, pydicom.dcmread(MR)).Status)

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(4)))
    assert statuses == [0, 0, 0, 0]
    assert len(list((tmp_path / "reports").glob("*.dcm"))) == 4  # four reports, four new UIDs


# -- refusals -------------------------------------------------------------------------------------

def test_ct_is_not_negotiated_and_the_next_mr_is_served(store_node, tmp_path):
    assoc = _scu((CTImageStorage, None), (MRImageStorage, None)).associate("127.0.0.1", store_node.port,
                                                                          ae_title="MEDFEDPURE")
    assert assoc.is_established
    accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    rejected = {str(c.abstract_syntax) for c in assoc.rejected_contexts}
    assert accepted == {MRImageStorage} and rejected == {CTImageStorage}
    with pytest.raises(ValueError, match="No presentation context for 'CT Image Storage'"):
        assoc.send_c_store(pydicom.dcmread(CT))
    assert assoc.send_c_store(pydicom.dcmread(MR)).Status == 0x0000
    assoc.release()
    assert len(list((tmp_path / "reports").glob("*.dcm"))) == 1


def test_ct_labelled_as_mr_does_not_match_the_sop_class(store_node, caplog):
    ds = pydicom.dcmread(CT)  # Modality CT under the MR Image Storage SOP class
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    with caplog.at_level(logging.WARNING, logger="medfedpure.node"):
        status = _send(store_node.port, ds)
    assert status.Status == scp.DATASET_MISMATCH == 0xA900
    assert "Modality is CT" in str(status.ErrorComment)
    assert any("0xA900" in r.getMessage() for r in caplog.records if r.name == "medfedpure.node")
    assert _send(store_node.port, pydicom.dcmread(MR)).Status == 0x0000


def test_missing_study_uid_does_not_match_the_sop_class(store_node):
    ds = pydicom.dcmread(MR)
    del ds.StudyInstanceUID  # Type 1 in the MR Image IOD
    status = _send(store_node.port, ds)
    assert status.Status == scp.DATASET_MISMATCH
    assert "StudyInstanceUID" in str(status.ErrorComment)


@pytest.mark.parametrize(("frames", "status"), [("0", 0xA900), ("-2", 0xA900), ("1e3x", 0xC000)])
def test_bad_number_of_frames_is_refused(store_node, frames, status):
    ds = pydicom.dcmread(MR)
    ds.add_new("NumberOfFrames", "IS", None)
    ds["NumberOfFrames"]._value = frames  # written as is: the sender's header is wrong, not pydicom's
    assert _send(store_node.port, ds).Status == status
    assert "NumberOfFrames" in str(store_node.last_outcome.reason)


def test_a_refused_scan_is_cannot_understand(store_node, tmp_path):
    status = _send(store_node.port, pydicom.dcmread(MR_TRUNCATED))
    assert status.Status == scp.CANNOT_UNDERSTAND == 0xC000
    assert "ScanTruncatedError" in str(status.ErrorComment) and len(str(status.ErrorComment)) <= 64
    assert store_node.last_outcome.results == () and not list((tmp_path / "reports").glob("*.dcm"))
    assert _send(store_node.port, pydicom.dcmread(MR)).Status == 0x0000


def test_a_corrupt_dataset_is_cannot_understand(store_node, tmp_path, monkeypatch):
    # valid file meta (so the SCU can send it), then a dataset stream that is not DICOM; pynetdicom's
    # chunked sending (a documented setting) sends the file's bytes after the meta without decoding them
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bad = tmp_path / "corrupt.dcm"
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.save_as(bad, enforce_file_format=True)
    with open(bad, "ab") as f:
        f.write(b"\x08\x00\x16\x00UI\xff\x7f" + b"\x00garbage" * 8)  # (0008,0016) UI claiming 32767 bytes
    status = _send(store_node.port, str(bad), contexts=((MRImageStorage, [ExplicitVRLittleEndian]),))
    assert status.Status == scp.CANNOT_UNDERSTAND
    assert "cannot be decoded" in str(status.ErrorComment)
    assert _send(store_node.port, pydicom.dcmread(MR)).Status == 0x0000


def test_a_dataset_over_max_bytes_is_out_of_resources(defender, tmp_path):
    with DicomNode(NodeConfig(port=0, store=str(tmp_path), max_bytes=4096), defender) as node:
        status = _send(node.port, pydicom.dcmread(MR))  # about 9 kB
        assert status.Status == scp.OUT_OF_RESOURCES == 0xA700
        assert "at most 4,096" in str(status.ErrorComment)
    assert not list(tmp_path.glob("*.dcm"))


def test_wrong_called_ae_title_or_calling_title_is_rejected(defender, tmp_path):
    cfg = NodeConfig(port=0, store=str(tmp_path), calling_aets=("MODALITY",))
    with DicomNode(cfg, defender) as node:
        assoc = _scu(ae_title="MODALITY").associate("127.0.0.1", node.port, ae_title="SOMEONE")
        assert assoc.is_rejected
        assoc = _scu(ae_title="INTRUDER").associate("127.0.0.1", node.port, ae_title="MEDFEDPURE")
        assert assoc.is_rejected
        assoc = _scu(ae_title="MODALITY").associate("127.0.0.1", node.port, ae_title="MEDFEDPURE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()


def test_stop_closes_the_port_and_keeps_a_shared_defender(defender, tmp_path):
    node = DicomNode(NodeConfig(port=0, store=str(tmp_path)), defender).start()
    port = node.port
    node.stop()
    node.stop()  # idempotent
    assoc = _scu().associate("127.0.0.1", port, ae_title="MEDFEDPURE")
    assert not assoc.is_established
    assert defender.run(pydicom.dcmread(MR)).ok  # not closed: the node did not load it
    with pytest.raises(RuntimeError, match="start"):
        _ = node.port


# -- configuration and command line ----------------------------------------------------------------

@pytest.mark.parametrize(("kw", "match"), [
    (dict(store="x", ae_title=""), "AE title"),
    (dict(store="x", ae_title="A" * 17), "AE title"),
    (dict(store="x", ae_title="BAD\\AE"), "AE title"),
    (dict(), "exactly one destination"),
    (dict(store="x", forward=ForwardTarget("h", 104, "PACS")), "exactly one destination"),
    (dict(store="x", bind="0.0.0.0"), "allow_remote"),
    (dict(store="x", port=70000), "port"),
    (dict(store="x", max_bytes=0), "max_bytes"),
    (dict(store="x", policy="always"), "policy"),
    (dict(store="x", calling_aets=("",)), "calling AE title"),
])
def test_bad_config_is_a_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        NodeConfig(**kw)


def test_remote_bind_with_allow_remote_and_forward_parsing():
    assert NodeConfig(store="x", bind="0.0.0.0", allow_remote=True).bind == "0.0.0.0"
    assert parse_host_port("pacs.example.org:104") == ("pacs.example.org", 104)
    assert parse_host_port("[::1]:11112") == ("::1", 11112)
    for bad in ("pacs", "pacs:0", "pacs:x", ":104", "pacs:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_host_port(bad)
    assert ForwardTarget.parse("h:104", " PACS ").ae_title == "PACS"


def test_listen_without_pynetdicom_names_the_dicom_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynetdicom", None)
    res = CliRunner().invoke(app, ["listen", "--port", "0", "--store", str(tmp_path)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "error: this command needs the 'dicom' extra: pip install 'medfedpure[dicom]'"), res.output


@pytest.mark.parametrize(("args", "match"), [
    ([], "exactly one destination"),
    (["--forward", "pacs", "PACS"], "HOST:PORT"),
    (["--store", "d", "--bind", "0.0.0.0"], "--allow-remote"),
    (["--store", "d", "--ae-title", "WAY_TOO_LONG_AE_TITLE"], "AE title"),
])
def test_listen_bad_settings_exit_2(args, match):
    res = CliRunner().invoke(app, ["listen", "--port", "0", *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output


def test_listen_command_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A terminal's Ctrl-C: the node starts with SIGINT at its default even when this test runs as a background
    # job of a non-interactive shell, which starts its children with SIGINT ignored (POSIX).
    proc = subprocess.Popen([sys.executable, "-m", "medfedpure", "listen", "--port", "0", "--ae-title", "NODE",
                             "--store", str(tmp_path)], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()  # a reader thread: select() misses lines already buffered
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        port, deadline = None, time.monotonic() + 120  # a loaded machine starts slowly
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            seen.append(line)
            if line.startswith("medfedpure listen: AE NODE on 127.0.0.1:"):
                port = int(line.split("127.0.0.1:", 1)[1].split(",", 1)[0])
        assert port is not None, "".join(seen)
        assert _send(port, pydicom.dcmread(MR), called="NODE").Status == 0x0000
        assert len(list(tmp_path.glob("*.dcm"))) == 1
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert rc == 0, out
    assert "Traceback" not in out and "interrupted: shutting down" in out and "NODE stopped" in out
    assoc = _scu().associate("127.0.0.1", port, ae_title="NODE")
    assert not assoc.is_established


def test_handler_failure_is_processing_failure_and_logged(defender, tmp_path, caplog, monkeypatch):
    node = DicomNode(NodeConfig(port=0, store=str(tmp_path)), defender)

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(node, "build_report", broken)
    with caplog.at_level(logging.ERROR, logger="medfedpure.node"), node:
        status = _send(node.port, pydicom.dcmread(MR))
    assert status.Status == scp.PROCESSING_FAILURE == 0x0110
    assert "RuntimeError: boom" in str(status.ErrorComment)
    assert any(r.exc_info for r in caplog.records if r.name == "medfedpure.node")


def test_status_dataset_comment_is_one_ascii_line_of_at_most_64_characters():
    ds = scp.status_dataset(0xC000, "a\nb  " + "é" * 100)
    assert ds.Status == 0xC000 and len(ds.ErrorComment) == 64 and ds.ErrorComment.isascii()
    assert "\n" not in ds.ErrorComment and ds.ErrorComment.endswith("...")
    assert "ErrorComment" not in scp.status_dataset(0)


def test_every_decision_is_audited_without_patient_data(store_node, defender, tmp_path):
    import hashlib
    import json

    from medfedpure.runtime.audit import audit_file_handler
    from medfedpure.scan.load import load_scan

    handler = audit_file_handler(tmp_path / "audit.jsonl")
    log = logging.getLogger("medfedpure")
    log.addHandler(handler)
    old = logging.getLogger("medfedpure.audit").level
    logging.getLogger("medfedpure.audit").setLevel(logging.INFO)
    try:
        ds = pydicom.dcmread(MR)
        ds.PatientName = "Doe^Jane"
        assert _send(store_node.port, ds).Status == 0x0000
    finally:
        log.removeHandler(handler)
        handler.close()
        logging.getLogger("medfedpure.audit").setLevel(old)
    text = (tmp_path / "audit.jsonl").read_text()
    (rec,) = [json.loads(line) for line in text.splitlines()]
    assert rec["schema_version"] == 1 and rec["status"] == "ok"
    assert rec["dicom"]["sop_uid"] == str(ds.SOPInstanceUID) and rec["dicom"]["study_uid"] == str(ds.StudyInstanceUID)
    assert rec["pixel_sha256"] == hashlib.sha256(load_scan(MR).pixels.tobytes()).hexdigest()
    assert rec["label"] == store_node.last_outcome.results[0].label and rec["bundle_id"] == defender.bundle.bundle_id
    assert "Doe" not in text and "Jane" not in text
