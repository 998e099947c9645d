"""Typed HTTP errors of the service and the one JSON shape every error answer has.

Every error body is ``{"error": {"type": "<name>", "message": "<problem and fix>"}}``. Scan refusals
keep the :class:`medfedpure.scan.ScanError` subclass name (``ScanNotImageError``, ``ScanTooLargeError``,
…) so a client sees the same type as the library would raise; the service's own refusals are below.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from medfedpure.scan.errors import ScanError, ScanTooLargeError


class ServeError(Exception):
    """Base class: a request the service refuses, with its HTTP status."""

    status_code = 400


class UnsupportedMediaTypeError(ServeError):
    """The Content-Type is not a scan type, or the body is not what the Content-Type says."""

    status_code = 415


class BadParameterError(ServeError):
    """A query parameter is malformed or out of range."""

    status_code = 422


class NotReadyError(ServeError):
    """The Defender is not loaded, or its start-up self-test did not give a verified answer."""

    status_code = 503


class AuditUnavailableError(ServeError):
    """The decision (or refusal) could not be written to the audit file: it is not answered, so the
    service never gives an answer it has no record of (the cause is in the server log)."""

    status_code = 500


class InternalError(ServeError):
    """An unexpected failure inside the service (details go to the server log only)."""

    status_code = 500


def scan_error_status(e: ScanError) -> int:
    """413 for a scan that is too large (bytes or decoded pixels), 400 for every other refused scan."""
    return 413 if isinstance(e, ScanTooLargeError) else 400


def error_response(status: int, type_name: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"type": type_name, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)
