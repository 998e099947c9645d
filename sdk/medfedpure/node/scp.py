"""The DICOM node: a pynetdicom Storage SCP that classifies each received MR image and sends a report.

Per association, pynetdicom runs one thread; every C-STORE request of MR Image Storage or Enhanced MR
Image Storage goes through :meth:`DicomNode.handle_store`:

1. the encoded dataset is held to ``max_bytes`` before it is decoded, then decoded completely (every
   element, so a corrupt stream is found here and not halfway through the pipeline);
2. the header must match what was negotiated: the dataset's SOP Class UID and SOP Instance UID equal
   the request's, Modality is ``MR`` and there is pixel data;
3. the one shared :class:`~medfedpure.runtime.defender.Defender` classifies the image (each frame of a
   multi-frame object is one scan), at most ``max_concurrent`` inferences at once across associations;
4. :func:`medfedpure.runtime.dicom_out.structured_report` builds one Structured Report per frame,
   which is C-STOREd to the forward destination or written as ``<SOP Instance UID>.dcm`` under the
   store folder (written to a temporary name first, then renamed, so a reader never sees half a file).

The C-STORE response says how it went, with a status of the Storage service class (PS3.4 B.2.3) or a
general DIMSE status (PS3.7 C), and a short Error Comment; the log ``medfedpure.node`` has the full
reason. A failure never stops the node: the next request is served as usual.

=========  ====================================  =====================================================
status     meaning in the standard               when the node answers it
=========  ====================================  =====================================================
0x0000     Success                               the report was delivered (stored or forwarded)
0xA700     Refused: Out of Resources             the dataset is over ``max_bytes`` or its decoded
                                                 pixels over the Defender's budget
0xA701     Refused: Out of Resources             the forward destination could not be reached or did
                                                 not accept the report (with forward TLS: also when
                                                 its certificate does not verify): a sender may retry
0xA702     Refused: Out of Resources             the report could not be written under the store folder
0xA900     Error: Data Set does not match SOP    the dataset's SOP Class / Instance UID differs from
           Class                                 the request's, its Study or Series Instance UID is
                                                 missing, Modality is not MR, or no pixel data
0xC000     Error: Cannot understand              the dataset cannot be decoded, or the Defender
                                                 refuses it as a scan (truncated pixel data, constant
                                                 image, unsupported compression, …)
0x0110     Processing failure                    the report could not be built, or an unexpected
                                                 failure (logged with its traceback)
=========  ====================================  =====================================================

"Out of resources" is the refusal that senders treat as temporary (they queue and retry), so it is
used exactly where a retry can succeed (a full disk, a destination that is down, a smaller object);
"cannot understand" and "does not match SOP class" are permanent: sending the same object again gives
the same answer. Non-MR SOP classes (CT, …) are not negotiated: their presentation contexts are
rejected at association, so a sender cannot even send them. Verification (C-ECHO) is answered 0x0000.

The shared Defender is safe to call from several association threads at once (see "Thread safety"
in :class:`~medfedpure.runtime.defender.Defender`); the node owns and closes it when it loaded it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage, Verification

from medfedpure import __version__
from medfedpure.node.config import NodeConfig
from medfedpure.runtime.audit import audit_record, log_audit
from medfedpure.runtime.defender import Defender, Result
from medfedpure.scan.errors import ScanError, ScanNoPixelDataError, ScanTooLargeError
from medfedpure.scan.limits import ScanLimits
from medfedpure.scan.load import load_scan

log = logging.getLogger("medfedpure.node")

MR_STORAGE = {str(MRImageStorage): "MR Image Storage", str(EnhancedMRImageStorage): "Enhanced MR Image Storage"}
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
FORWARD_FAILED = 0xA701
STORE_FAILED = 0xA702
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO: at most 64 characters
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# statuses of the forward destination's answer that mean the report was stored
_STORED = (0x0000, 0xB000, 0xB006, 0xB007)


class NodeError(RuntimeError):
    """A report could not be delivered; ``status`` is the C-STORE status the sender gets."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes accepted for MR images: the uncompressed ones, and each compressed one that
    pydicom can decode in this environment (RLE always; JPEG / JPEG-LS / JPEG 2000 with their plugins)."""
    from pydicom.pixels import get_decoder

    out = list(DEFAULT_TRANSFER_SYNTAXES)
    for uid in ALL_TRANSFER_SYNTAXES:
        if uid in out or not UID(uid).is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:  # no decoder for this syntax at all (e.g. video)
            continue
    if str(RLELossless) not in out:  # pydicom's own decoder: always available
        out.append(str(RLELossless))
    return out


def _comment(text: str) -> str:
    """One line of at most :data:`ERROR_COMMENT_MAX` characters for the Error Comment element."""
    line = " ".join(text.split())
    return line if len(line) <= ERROR_COMMENT_MAX else line[: ERROR_COMMENT_MAX - 3] + "..."


def status_dataset(status: int, comment: str | None = None) -> Dataset:
    """The C-STORE response's status: ``Status`` and, on a failure, a short ``ErrorComment``."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = _comment(comment).encode("ascii", "replace").decode("ascii")
    return ds


@dataclass(frozen=True)
class StoreOutcome:
    """What one C-STORE request came to: the status sent back, the reason (None on success), the
    received SOP Instance UID, the Defender's results (one per frame; empty when it did not run) and
    the reports' SOP Instance UIDs (empty unless delivered)."""

    status: int
    reason: str | None
    sop_instance_uid: str
    results: tuple[Result, ...] = ()
    reports: tuple[str, ...] = ()


class DicomNode:
    """A Storage SCP that classifies each received MR image with one shared Defender.

    Use: ``node = DicomNode(config).start()`` (non-blocking; :attr:`port` is the bound port) …
    ``node.stop()``; or ``with DicomNode(config) as node: …``; or :meth:`serve_forever` (blocks until
    Ctrl-C or :meth:`stop`).

    Args:
        config: the node's settings.
        defender: a loaded Defender to share (the caller keeps ownership); None: the node loads the
            one ``config`` names and closes it on :meth:`stop`.

    Attributes:
        last_outcome: the :class:`StoreOutcome` of the most recently answered C-STORE (any association).
    """

    def __init__(self, config: NodeConfig, defender: Defender | None = None) -> None:
        self.config = config
        self.limits = ScanLimits(max_file_bytes=config.max_bytes)
        self._owns_defender = defender is None
        self.defender = load_defender(config, self.limits) if defender is None else defender
        self._slots = threading.BoundedSemaphore(config.max_concurrent)
        self._server: Any = None
        self._ae: AE | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.last_outcome: StoreOutcome | None = None
        # built once here, so a bad TLS file fails before the node listens (the config checked them too)
        self._server_ssl = config.server_ssl_context()
        self._forward_tls = config.forward_ssl_context()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> DicomNode:
        """Listen (non-blocking: associations are served in pynetdicom's threads). Returns self."""
        with self._lock:
            if self._server is not None:
                return self
            if self.config.store is not None:
                Path(self.config.store).mkdir(parents=True, exist_ok=True)
            ae = AE(ae_title=self.config.ae_title)
            ae.maximum_associations = self.config.max_associations
            ae.require_called_aet = self.config.require_called_aet
            ae.require_calling_aet = list(self.config.calling_aets)
            syntaxes = transfer_syntaxes()
            for uid in MR_STORAGE:
                ae.add_supported_context(uid, syntaxes)
            ae.add_supported_context(Verification)
            handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, self.handle_echo)]
            self._server = ae.start_server((self.config.bind, self.config.port), block=False,
                                           evt_handlers=handlers, ssl_context=self._server_ssl)
            self._ae = ae
            self._stopped.clear()
        log.info("DICOM node %s listening on %s:%d%s (bundle %s, reports %s)", self.config.ae_title,
                 self.config.bind, self.port, self.transport, self.defender.bundle.short_id, self.destination)
        return self

    @property
    def port(self) -> int:
        """The TCP port listened on (the system's choice when the config's port is 0)."""
        if self._server is None:
            raise RuntimeError("the node is not listening: call start() first")
        return int(self._server.server_address[1])

    @property
    def destination(self) -> str:
        """Where the reports go, in words."""
        f = self.config.forward
        if f is None:
            return f"under {self.config.store}"
        return f"to {f.ae_title}@{f.host}:{f.port}" + (" over TLS" if self._forward_tls is not None else "")

    @property
    def transport(self) -> str:
        """How the node listens, in words: empty for plain DICOM, else which TLS."""
        if self._server_ssl is None:
            return ""
        if self.config.tls_require_client_cert:
            return " over TLS (client certificate required)"
        return " over TLS" + (" (client certificate verified when presented)" if self.config.tls_ca else "")

    def stop(self) -> None:
        """Stop listening, end open associations and (when the node loaded it) close the Defender.
        Idempotent."""
        with self._lock:
            server, ae, self._server, self._ae = self._server, self._ae, None, None
        if server is not None:
            server.shutdown()
        if ae is not None:
            ae.shutdown()
        if self._owns_defender:
            self.defender.close()
        if server is not None:
            log.info("DICOM node %s stopped", self.config.ae_title)
        self._stopped.set()

    def serve_forever(self) -> None:
        """Start, and block until :meth:`stop` is called from another thread or Ctrl-C (then stop)."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            log.info("interrupted: shutting down")
        finally:
            self.stop()

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers ---------------------------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        """C-ECHO: always success (the node is up and accepting)."""
        log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def handle_store(self, event: Any) -> Dataset:
        """C-STORE: classify, report, deliver; the answer is :func:`status_dataset` of the outcome."""
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
        calling = str(getattr(event.assoc.requestor, "ae_title", "?"))
        try:
            outcome = self.process(event.encoded_dataset(include_meta=False), event.file_meta,
                                   str(event.context.abstract_syntax), uid)
        except Exception as e:  # noqa: BLE001 - the node keeps serving; the sender gets a failure
            log.exception("C-STORE %s from %s: unexpected failure", uid, calling)
            outcome = StoreOutcome(PROCESSING_FAILURE, f"unexpected failure: {type(e).__name__}", uid)
        self.last_outcome = outcome
        if outcome.status == SUCCESS:
            labels = ", ".join(f"{r.status}/{r.label}" for r in outcome.results)
            level = logging.INFO if all(r.ok for r in outcome.results) else logging.WARNING  # unverified
            log.log(level, "C-STORE %s from %s: %s → report %s %s", uid, calling, labels, ", ".join(outcome.reports),
                     self.destination)
        else:
            log.warning("C-STORE %s from %s: status 0x%04X: %s", uid, calling, outcome.status, outcome.reason)
        return status_dataset(outcome.status, outcome.reason)

    # -- the work ---------------------------------------------------------------------------------
    def process(self, encoded: bytes, file_meta: Dataset, sop_class: str, sop_instance: str) -> StoreOutcome:
        """One received dataset (``encoded``: its bytes without file meta, in the transfer syntax that
        ``file_meta`` names) under the negotiated ``sop_class``: checks, classification, reports."""
        if len(encoded) > self.config.max_bytes:
            return StoreOutcome(OUT_OF_RESOURCES, f"dataset is {len(encoded):,} bytes: the node accepts at most "
                                f"{self.config.max_bytes:,} (medfedpure listen --max-bytes)", sop_instance)
        try:
            ds = _decode(encoded, file_meta)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a corrupt dataset
            return StoreOutcome(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {type(e).__name__}: {e}",
                                sop_instance)
        mismatch = _check_header(ds, sop_class, sop_instance)
        if mismatch is not None:
            return StoreOutcome(DATASET_MISMATCH, mismatch, sop_instance)
        try:
            raw_frames = ds.get("NumberOfFrames")
            frames = 1 if raw_frames is None or str(raw_frames).strip() == "" else int(raw_frames)
        except (TypeError, ValueError):
            return StoreOutcome(CANNOT_UNDERSTAND, f"NumberOfFrames {ds.get('NumberOfFrames')!r} is not a number",
                                sop_instance)
        if frames < 1:
            return StoreOutcome(DATASET_MISMATCH, f"NumberOfFrames is {frames}: an image object has at least one",
                                sop_instance)
        results: list[Result] = []
        for i in range(frames):
            try:
                scan = load_scan(ds, frame=i if frames > 1 else None, limits=self.limits)
                with self._slots:
                    results.append(self.defender.run(scan))
                # the audit record of every decision (logger "medfedpure.audit"; no names, no paths)
                log_audit(audit_record(results[-1], self.defender, frame=i if frames > 1 else None))
            except ScanError as e:
                status = (OUT_OF_RESOURCES if isinstance(e, ScanTooLargeError) else
                          DATASET_MISMATCH if isinstance(e, ScanNoPixelDataError) else CANNOT_UNDERSTAND)
                where = f"frame {i + 1} of {frames}: " if frames > 1 else ""
                return StoreOutcome(status, f"{where}scan refused: {type(e).__name__}: {e}", sop_instance,
                                    tuple(results))
        reports: list[Dataset] = []
        for i, r in enumerate(results):
            try:
                reports.append(self.build_report(r, ds, instance_number=i + 1, frame=i if frames > 1 else None))
            except Exception as e:  # noqa: BLE001 - reported as a processing failure
                log.exception("report for %s could not be built", sop_instance)
                return StoreOutcome(PROCESSING_FAILURE, f"report not built: {type(e).__name__}: {e}",
                                    sop_instance, tuple(results))
        try:
            for sr in reports:
                self.deliver(sr)
        except NodeError as e:
            return StoreOutcome(e.status, str(e), sop_instance, tuple(results))
        return StoreOutcome(SUCCESS, None, sop_instance, tuple(results),
                            tuple(str(sr.SOPInstanceUID) for sr in reports))

    def build_report(self, result: Result, source: Dataset, *, instance_number: int = 1,
                     frame: int | None = None) -> Dataset:
        """The Structured Report of ``result`` on ``source`` (the received dataset); ``frame``: the 0-based frame
        of a multi-frame source the result is for (referenced by number in the report)."""
        from medfedpure.runtime.dicom_out import structured_report

        return structured_report(result, [source], instance_number=instance_number,
                                 software_version=__version__, frame=frame)

    def deliver(self, sr: Dataset) -> None:
        """Send ``sr`` where the config says (raises :class:`NodeError` with the status to answer)."""
        if self.config.forward is not None:
            forward_report(sr, self.config, self._forward_tls)
        else:
            store_report(sr, Path(self.config.store or "."))


def _decode(encoded: bytes, file_meta: Dataset) -> Dataset:
    """Decode every element of ``encoded`` (pydicom parses lazily: force it here, so corruption is
    found now) and attach ``file_meta`` so that compressed pixel data can be decoded."""
    from pydicom.filereader import read_dataset

    ts = UID(file_meta.TransferSyntaxUID)
    if ts.is_deflated:
        import zlib

        encoded = zlib.decompress(encoded, -zlib.MAX_WBITS)
    ds = read_dataset(BytesIO(encoded), ts.is_implicit_VR, ts.is_little_endian)
    if not len(ds):
        raise ValueError("the dataset holds no elements")
    for tag in ds.keys():  # pydicom reads a value cut short by the end of the stream without complaint
        raw = ds.get_item(tag)
        length, value = getattr(raw, "length", None), getattr(raw, "value", None)
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) != length:
            raise ValueError(f"element {tag} declares {length:,} bytes but the stream ends after {len(value):,}")
    for _ in ds.iterall():
        pass
    ds.file_meta = file_meta
    return ds


def _check_header(ds: Dataset, sop_class: str, sop_instance: str) -> str | None:
    """Why the header does not match the negotiated SOP class and the request (None: it does)."""
    got_class = str(ds.get("SOPClassUID", ""))
    if got_class != sop_class:
        return (f"dataset SOP Class UID {got_class or '(none)'} differs from the negotiated "
                f"{MR_STORAGE.get(sop_class, sop_class)}")
    got_instance = str(ds.get("SOPInstanceUID", ""))
    if got_instance != sop_instance:
        return f"dataset SOP Instance UID {got_instance or '(none)'} differs from the request's {sop_instance}"
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if not str(ds.get(k, "") or "")]
    if missing:
        return f"{', '.join(missing)} missing: required (Type 1) in every image object"
    modality = str(ds.get("Modality", "") or "")
    if modality != "MR":
        return f"Modality is {modality or '(none)'}: {MR_STORAGE.get(sop_class, sop_class)} holds MR images"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "no pixel data: an MR image object must hold its image"
    return None


def forward_report(sr: Dataset, config: NodeConfig, tls_args: tuple[Any, str] | None = None) -> None:
    """C-STORE ``sr`` to ``config.forward`` from the node's AE title (a new association per report).

    ``tls_args``: pynetdicom's (SSL context, server hostname) for a TLS destination; None: built from
    the config's ``forward_tls_*`` (plain DICOM when they are unset).

    Raises:
        NodeError: status :data:`FORWARD_FAILED` when the association is refused or fails, or the
            destination answers with a failure status.
    """
    target = config.forward
    if target is None:
        raise ValueError("forward_report needs config.forward")
    ae = AE(ae_title=config.ae_title)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, config.forward_timeout_s)
    ae.add_requested_context(str(sr.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{target.ae_title}@{target.host}:{target.port}"
    if tls_args is None:
        tls_args = config.forward_ssl_context()
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        tls = "" if tls_args is None else (f", speaks TLS with a certificate for {tls_args[1]} signed by "
                                           f"--forward-tls-ca ({config.forward_tls_ca})")
        raise NodeError(f"forward destination {where}: association {why}; check that it is up{tls} and "
                        f"accepts AE title {config.ae_title}", FORWARD_FAILED)
    try:
        answer = assoc.send_c_store(sr)
    except Exception as e:  # noqa: BLE001 - a transport or encoding failure while sending
        raise NodeError(f"forward to {where} failed: {type(e).__name__}: {e}", FORWARD_FAILED) from e
    finally:
        assoc.release()
    status = int(answer.get("Status", -1)) if answer else -1
    if status not in _STORED:
        raise NodeError(f"forward destination {where} answered status "
                        f"{'none (timeout)' if status < 0 else f'0x{status:04X}'} for the report", FORWARD_FAILED)


def store_report(sr: Dataset, folder: Path) -> Path:
    """Write ``sr`` as ``folder/<SOP Instance UID>.dcm`` (DICOM file format; a temporary name, then
    renamed). Returns the path.

    Raises:
        NodeError: status :data:`STORE_FAILED` on a bad SOP Instance UID or a failed write.
    """
    uid = str(sr.SOPInstanceUID)
    if not _UID_RE.match(uid) or len(uid) > 64:
        raise NodeError(f"report SOP Instance UID {uid!r} is not a valid UID: not written", STORE_FAILED)
    final = folder / f"{uid}.dcm"
    tmp = folder / f".{uid}.dcm.part"
    try:
        sr.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise NodeError(f"report could not be written to {final}: {e.strerror or e}", STORE_FAILED) from e
    return final


def load_defender(config: NodeConfig, limits: ScanLimits) -> Defender:
    """The Defender ``config`` names (the embedded default bundle when ``config.bundle`` is None)."""
    kw: dict[str, Any] = dict(expected_id=config.expected_id, trusted_keys=list(config.trusted_keys) or None,
                              allow_unsigned=config.allow_unsigned, policy=config.policy,
                              timeout_s=config.timeout_s, limits=limits, threads=config.threads)
    if config.bundle is None:
        return Defender.default(config.backend, config.device, **kw)
    return Defender.load(config.bundle, config.backend, config.device, **kw)
