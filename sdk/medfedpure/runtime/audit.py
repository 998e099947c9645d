"""The audit record of one decision (schema version 1) and its JSON-lines logging.

A record says what was decided, by what, on which pixels, so that it can be kept, searched and
replayed (``medfedpure replay``), and holds no patient identifiers::

    schema_version      1
    medfedpure_version  the package version that decided
    timestamp           UTC, ISO 8601 with milliseconds ("2026-01-31T12:00:00.123Z")
    bundle_id, signer   the bundle (sha256 of its manifest) and the trusted key that signed it
                        ({"name", "key_id"}, or None for an unsigned bundle accepted on request)
    backend, device, precision
    policy, tau, t_range    the gate policy, τ and [t_min, t_max] of the bundle's gate
    pixel_sha256        sha256 of the decoded pixels before preprocessing (medfedpure.scan.Scan.sha256)
    frame               the frame of a multi-frame input, else None
    dicom               {"study_uid", "series_uid", "sop_uid"} of a DICOM input, else None
    scope               the scope check (Result.scope: observed attributes, in_scope, override)
    seed, status, reason, error, label, probabilities, flagged, score, score_quantile, t_star
    latency_ms          stage → milliseconds
    source              only with include_source=True: the input as the caller named it

Without ``include_source`` a record holds no path: where a reason (a refused file's message) quotes
the source or its file name, that text is replaced by ``"<source>"``. The DICOM reader never puts
patient attributes (name, id, birth date) on a scan, so none can reach a record.

Logging: records go to the ``"medfedpure.audit"`` logger (a child of the ``"medfedpure"`` logger) at
INFO, the JSON text as the message and the record itself as the log record's ``audit`` attribute.
:class:`JsonLinesFormatter` writes one JSON object per line (the audit record as is; any other log
record as ``{"timestamp", "level", "logger", "message"}``); :func:`audit_file_handler` is a file
handler with that formatter that keeps audit records only, so the file is a JSON-lines list of records.

Several processes may append to one file (``medfedpure serve --workers N``): the handler opens it with
``O_APPEND`` and writes each record, newline included, with one ``os.write`` call, so the kernel places
every record whole at the end of the file and records never interleave within a line. A buffered text
stream gives no such promise (a record may leave it in pieces). With ``strict=True`` a record that cannot
be written raises :class:`AuditWriteError` out of :func:`log_audit` instead of going to ``logging``'s
error report, so a caller that must not lose a record (the HTTP service) can refuse to answer.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfedpure.runtime.defender import Defender, Result

__all__ = [
    "AUDIT_SCHEMA_VERSION",
    "AUDIT_FIELDS",
    "AUDIT_LOGGER",
    "AuditFileHandler",
    "AuditRecordError",
    "AuditWriteError",
    "JsonLinesFormatter",
    "audit_file_handler",
    "audit_record",
    "log_audit",
    "read_audit_record",
    "utc_timestamp",
]

AUDIT_SCHEMA_VERSION = 1
AUDIT_LOGGER = "medfedpure.audit"
AUDIT_FIELDS = (
    "schema_version", "medfedpure_version", "timestamp", "bundle_id", "signer", "backend", "device",
    "precision", "policy", "tau", "t_range", "pixel_sha256", "frame", "dicom", "scope", "seed",
    "status", "reason", "error", "label", "probabilities", "flagged", "score", "score_quantile", "t_star",
    "latency_ms",
)
_REDACTED = "<source>"


class AuditRecordError(ValueError):
    """An audit record cannot be read: not JSON, another schema version, or not found in its file."""


class AuditWriteError(OSError):
    """An audit record could not be written to its file (disk full, file system gone read-only, ...):
    raised by a ``strict`` :class:`AuditFileHandler`; ``errno``/``strerror`` are the failed write's."""


def utc_timestamp(now: _dt.datetime | None = None) -> str:
    """UTC time as ISO 8601 with milliseconds and a ``Z`` suffix."""
    now = _dt.datetime.now(_dt.timezone.utc) if now is None else now.astimezone(_dt.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _redact(text: str | None, source: str | None) -> str | None:
    """``text`` with the source path and its file name replaced by ``"<source>"`` (longest first)."""
    if text is None or not source:
        return text
    for needle in sorted({source, os.path.abspath(source), os.path.basename(source)}, key=len, reverse=True):
        if needle:
            text = text.replace(needle, _REDACTED)
    return text


def audit_record(result: Result, defender: Defender, *, source: str | os.PathLike[str] | None = None,
                 frame: int | None = None, include_source: bool = False, timestamp: str | None = None) -> dict[str, Any]:
    """The audit record (schema version 1, module docstring) of ``result``, made by ``defender``.

    Args:
        source: the input as the caller named it; written as ``source`` only with ``include_source``,
            otherwise used to take it out of the reason.
        frame: the frame index of a multi-frame input.
        include_source: also record ``source`` (paths can name patients: off by default).
        timestamp: override the record's time (ISO 8601); None: now.
    """
    from medfedpure import __version__

    spec = defender.engine.gate_spec
    signer = defender.bundle.signer
    src = None if source is None else os.fspath(source)
    uids = result.dicom_uids
    rec: dict[str, Any] = {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "medfedpure_version": __version__,
        "timestamp": timestamp or utc_timestamp(),
        "bundle_id": result.bundle_id,
        "signer": None if signer is None else {"name": signer.name, "key_id": signer.key_id},
        "backend": result.backend,
        "device": result.device,
        "precision": result.precision,
        "policy": result.policy or defender.policy,
        "tau": float(spec.tau),
        "t_range": [int(spec.t_min), int(spec.t_max)],
        "pixel_sha256": result.pixel_sha256,
        "frame": frame,
        "dicom": None if not uids else {"study_uid": uids.get("study"), "series_uid": uids.get("series"),
                                        "sop_uid": uids.get("sop")},
        "scope": None if result.scope is None else dict(result.scope),
        "seed": int(result.seed),
        "status": result.status,
        "reason": result.reason if include_source else _redact(result.reason, src),
        "error": result.error,
        "label": result.label,
        "probabilities": dict(result.probabilities),
        "flagged": result.flagged,
        "score": result.score,
        "score_quantile": result.score_quantile,
        "t_star": result.t_star,
        "latency_ms": dict(result.latency_ms),
    }
    if include_source and src is not None:
        rec["source"] = src
    return rec


def log_audit(record: Mapping[str, Any], logger: logging.Logger | None = None) -> None:
    """Emit ``record`` on the ``"medfedpure.audit"`` logger at INFO (the JSON text as the message)."""
    log = logging.getLogger(AUDIT_LOGGER) if logger is None else logger
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps(record, allow_nan=False, sort_keys=True), extra={"audit": dict(record)})


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per log record, on one line: an audit record as is, anything else as
    ``{"timestamp", "level", "logger", "message"}`` (plus ``exception`` when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if isinstance(audit, Mapping):
            return json.dumps(audit, allow_nan=False, sort_keys=True)
        out: dict[str, Any] = {
            "timestamp": utc_timestamp(_dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, allow_nan=False, default=str)


class _AuditOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return isinstance(getattr(record, "audit", None), Mapping)


class AuditFileHandler(logging.Handler):
    """Appends audit records, one JSON object per line, to a file opened with ``O_APPEND``.

    Each record (its line and the newline) leaves in one ``os.write`` call: processes appending to the
    same file never interleave within a line. ``strict``: a failed write raises :class:`AuditWriteError`
    (out of :func:`log_audit`) instead of being reported by ``logging.Handler.handleError``.
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: str = "a", strict: bool = False) -> None:
        if mode not in ("a", "w"):
            raise ValueError(f"mode={mode!r}: expected 'a' (append) or 'w' (overwrite)")
        super().__init__(logging.INFO)
        self.baseFilename = os.path.abspath(os.fspath(path))
        self.strict = bool(strict)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self.fd: int | None = os.open(self.baseFilename, flags | (os.O_TRUNC if mode == "w" else 0), 0o666)
        self.setFormatter(JsonLinesFormatter())
        self.addFilter(_AuditOnly())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8")
            if self.fd is None:
                raise AuditWriteError(f"the audit file {self.baseFilename} is closed")
            n = os.write(self.fd, data)
            while n < len(data):  # a short write (only when the disk fills up): finish the line
                n += os.write(self.fd, data[n:])
        except OSError as e:
            if not self.strict:
                self.handleError(record)
                return
            if isinstance(e, AuditWriteError):
                raise
            raise AuditWriteError(e.errno, f"cannot append to the audit file {self.baseFilename}: "
                                           f"{e.strerror or e}") from e
        except Exception:  # noqa: BLE001 - formatting failures: as logging does, unless strict
            if self.strict:
                raise
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        finally:
            self.release()
            super().close()


def audit_file_handler(path: str | os.PathLike[str], *, mode: str = "a", strict: bool = False) -> AuditFileHandler:
    """A handler writing audit records only, one JSON object per line, to ``path`` (appended by
    default; ``mode="w"`` starts the file afresh): :class:`AuditFileHandler`. Attach it to
    ``logging.getLogger("medfedpure")``.

    Raises:
        OSError: the file cannot be opened for appending (a missing folder, no permission, ...).
        ValueError: a bad ``mode``.
    """
    return AuditFileHandler(path, mode=mode, strict=strict)


def read_audit_record(path: str | os.PathLike[str], *, line: int | None = None,
                      sop_uid: str | None = None) -> dict[str, Any]:
    """One audit record from a JSON-lines file: the record on ``line`` (1-based), or the last one whose
    ``dicom.sop_uid`` is ``sop_uid``, or the only record of a one-record file.

    Raises:
        AuditRecordError: the file cannot be read, the line is not a JSON object, the record has another
            ``schema_version``, or no record matches.
        ValueError: both ``line`` and ``sop_uid`` given.
    """
    if line is not None and sop_uid is not None:
        raise ValueError("give a line number or a SOP Instance UID, not both")
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AuditRecordError(f"cannot read the audit file {p}: {e}") from e
    numbered = [(i + 1, text) for i, text in enumerate(lines) if text.strip()]
    if line is not None:
        chosen = [(n, t) for n, t in numbered if n == line]
        if not chosen:
            raise AuditRecordError(f"{p} has no record on line {line} (it has {len(lines)} lines)")
    elif sop_uid is None:
        if len(numbered) != 1:
            raise AuditRecordError(f"{p} holds {len(numbered)} records: choose one with a line number or a "
                                   "SOP Instance UID")
        chosen = numbered
    else:
        chosen = numbered
    records = []
    for n, text in chosen:
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise AuditRecordError(f"{p} line {n} is not JSON ({e.msg}): is it an audit file?") from e
        if not isinstance(rec, dict):
            raise AuditRecordError(f"{p} line {n} is not a JSON object: is it an audit file?")
        if sop_uid is not None and (rec.get("dicom") or {}).get("sop_uid") != sop_uid:
            continue
        if rec.get("schema_version") != AUDIT_SCHEMA_VERSION:
            raise AuditRecordError(f"{p} line {n}: schema_version {rec.get('schema_version')!r} is not the one "
                                   f"this medfedpure reads ({AUDIT_SCHEMA_VERSION})")
        missing = [k for k in AUDIT_FIELDS if k not in rec]
        if missing:
            raise AuditRecordError(f"{p} line {n}: the record lacks {missing}: it is not a complete audit record")
        records.append(rec)
    if not records:
        raise AuditRecordError(f"{p} has no record with SOP Instance UID {sop_uid!r}")
    return records[-1]
