"""The FastAPI application behind ``medfedpure serve``: guarded classification over HTTP.

Endpoints:

- ``POST /v1/classify`` — the body is the raw bytes of one scan file (``application/dicom``,
  ``image/png``, ``image/jpeg``, or ``application/octet-stream`` / no Content-Type: the format is
  sniffed by :func:`medfedpure.load_scan`); query ``seed`` (replay a decision), ``policy``
  (``adaptive`` / ``floor``), ``return_purified`` / ``return_patch_error`` (pixel arrays, off by
  default). Answer: ``Result.to_dict()`` plus ``policy`` and ``medfedpure_version``. An unverified
  result is a 200 with ``status="unverified"`` and no label (fail closed: the caller never gets a
  label the pipeline did not vouch for).
- ``GET /v1/bundle`` — what the service runs: bundle id, classes, image size, gate statistic, τ,
  policy, t* range, purifier steps, a provenance summary (no paths) and the signer, when signed.
- ``GET /healthz`` — liveness and readiness: 200 once the Defender is loaded and its start-up
  self-test (one synthetic scan) gave a verified answer, 503 otherwise.

Errors: every refusal is ``{"error": {"type", "message"}}`` (:mod:`medfedpure.serve.errors`) — 400 a
refused scan, 413 a body over ``max_bytes`` (refused from Content-Length before a byte is read, and
while streaming when the length is not declared), 415 an unsupported media type, 422 a bad query
parameter, 500 an unexpected failure (logged with its traceback on the server; the answer never
carries one), 503 not ready.

One Defender serves every request. It is created in the lifespan (before the first request is
accepted) and closed at shutdown. Sharing it is safe: onnxruntime's ``InferenceSession.run`` is
thread-safe, the Defender's per-call state (inputs, keyed noise, failures, latencies, the per-call
policy) lives in local variables of the call, and its worker pool is created under a lock
(:class:`medfedpure.runtime.defender.Defender`, "Thread safety"). Each inference runs in a worker
thread (``anyio.to_thread.run_sync``) behind a ``CapacityLimiter(max_concurrent)``, so the event
loop stays free to answer ``/healthz`` and to refuse bad requests while models run. Nothing here
imports torch: the core install (numpy + onnxruntime) can serve.

Audit: every ``/v1/classify`` answer that carries a decision or a refusal — ok, unverified, out of
scope, a refused scan (400, 413), a refused request (415, 422) — emits exactly one audit record
(:mod:`medfedpure.runtime.audit`, schema version 1, the record ``medfedpure run --audit`` writes; the
service never has a source path, so none is recorded) on the ``medfedpure.audit`` logger, before the
answer leaves. A scan the Defender refuses is recorded as ``Defender.run_batch`` reports it (its pixel
sha256, UIDs and scope when it was decoded before being refused), exactly as ``run --audit`` would;
the other refusals as :meth:`Defender.refused_result` of their error. With ``ServeConfig.audit`` the
records are appended to that file by a strict :class:`medfedpure.runtime.audit.AuditFileHandler`
(``O_APPEND``, one write per record: the workers of ``--workers N`` share the file without
interleaving). A record is never silently lost: a file that cannot be opened stops the service at
start-up (the lifespan fails; ``medfedpure serve`` checks it first and exits 2), and a record that
cannot be written turns the answer into a 500 ``AuditUnavailableError`` (the decision is withheld, the
cause logged). Not recorded: 503 (no Defender), 404/405 (not a classification) and 500 failures.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medfedpure import __version__
from medfedpure.runtime.audit import (
    AUDIT_LOGGER,
    AuditFileHandler,
    AuditWriteError,
    audit_file_handler,
    audit_record,
    log_audit,
)
from medfedpure.runtime.defender import POLICIES, STATUS_REFUSED, Defender, Result
from medfedpure.scan.dicom import is_dicom_magic
from medfedpure.scan.errors import ScanError, ScanTooLargeError
from medfedpure.scan.limits import ScanLimits
from medfedpure.serve.config import ServeConfig
from medfedpure.serve.errors import (
    AuditUnavailableError,
    BadParameterError,
    InternalError,
    NotReadyError,
    ServeError,
    UnsupportedMediaTypeError,
    error_response,
    scan_error_status,
)

log = logging.getLogger("medfedpure.serve")

SEED_MAX = (1 << 63) - 1
# media type → (format name, signature test); None: sniffed by load_scan
MEDIA_TYPES: dict[str, tuple[str, Callable[[bytes], bool]] | None] = {
    "application/dicom": ("DICOM", is_dicom_magic),
    "image/png": ("PNG", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    "image/jpeg": ("JPEG", lambda b: b.startswith(b"\xff\xd8\xff")),
    "application/octet-stream": None,
}
SELF_TEST_SEED = 0
CLASSIFY_PATH = "/v1/classify"
# provenance entries shown by /v1/bundle (identifiers and hashes; never paths or training data)
PROVENANCE_KEYS = ("run", "site", "code_commit", "created_utc", "dataset_fingerprint", "training_config_sha256",
                   "calibration_sha256", "versions")


def self_test_scan(size: int) -> np.ndarray:
    """A deterministic synthetic slice float32 [size, size] in [0, 1]: a bright disc on a dark ramp."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    disc = (xx**2 + yy**2 < 0.35**2).astype(np.float32) * 0.7
    return np.clip(disc + 0.1 * (xx + 0.5) + 0.05 * np.cos(12 * xx) * np.sin(9 * yy), 0.0, 1.0)


@dataclass
class ServiceState:
    """What the lifespan set up: the shared Defender, the inference limiter, the self-test's outcome and
    the audit file's handler (None without ``config.audit``)."""

    config: ServeConfig
    defender: Defender
    limiter: anyio.CapacityLimiter
    self_test: dict[str, Any] = field(default_factory=dict)
    audit: AuditFileHandler | None = None

    @property
    def ready(self) -> bool:
        return self.self_test.get("status") == "ok"

    def record(self, r: Result) -> None:
        """Emit the audit record of ``r`` (no source: the service has none) on the ``medfedpure.audit``
        logger, hence into ``config.audit`` when set.

        Raises:
            AuditUnavailableError: the record could not be written; the answer must not be sent.
        """
        try:
            log_audit(audit_record(r, self.defender))
        except AuditWriteError as e:
            log.error("a %s decision was not answered: its audit record could not be written: %s", r.status, e)
            raise AuditUnavailableError(
                "the decision could not be written to the service's audit file, so it is not answered; the server "
                "log names the cause (disk full, permissions, ...): fix the audit file and retry") from e

    def record_refusal(self, error: BaseException, seed: int | None) -> None:
        """Record a request refused before the Defender ran (a body too large, a bad media type or
        parameter) as :meth:`Defender.refused_result` of ``error``."""
        self.record(self.defender.refused_result(error, seed=seed))


def load_defender(config: ServeConfig) -> Defender:
    """The Defender the config names (the embedded default bundle when ``config.bundle`` is None)."""
    kw: dict[str, Any] = dict(expected_id=config.expected_id, trusted_keys=list(config.trusted_keys) or None,
                              allow_unsigned=config.allow_unsigned, policy=config.policy,
                              timeout_s=config.timeout_s, limits=ScanLimits(max_file_bytes=config.max_bytes),
                              threads=config.threads)
    if config.bundle is None:
        return Defender.default(config.backend, config.device, **kw)
    return Defender.load(config.bundle, config.backend, config.device, **kw)


def run_self_test(defender: Defender) -> dict[str, Any]:
    """One inference on :func:`self_test_scan` (seed fixed): readiness means a verified answer."""
    try:
        r = defender.run(self_test_scan(defender.image_size), seed=SELF_TEST_SEED)
    except Exception as e:  # noqa: BLE001 - a failed self-test is reported by /healthz, not raised
        log.exception("start-up self-test failed")
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return {"status": r.status, "reason": r.reason, "label": r.label, "latency_ms": r.latency_ms.get("total")}


def result_body(r: Result, policy: str, *, with_arrays: bool) -> dict[str, Any]:
    """The JSON answer of one classification: ``Result.to_dict()`` (arrays only when asked) + policy, version."""
    d = r.to_dict()
    if not with_arrays:
        d.pop("purified", None)
        d.pop("patch_error", None)
    d["policy"] = policy
    d["medfedpure_version"] = __version__
    return d


def bundle_body(defender: Defender, policy: str) -> dict[str, Any]:
    """The ``/v1/bundle`` answer (see the module docstring)."""
    vb = defender.bundle
    gate = vb.spec.gate.to_dict()
    prov = vb.manifest.get("provenance") or {}
    summary = {k: prov[k] for k in PROVENANCE_KEYS
               if k in prov and not (isinstance(prov[k], str) and ("/" in prov[k] or "\\" in prov[k]))}
    signer = getattr(vb, "signer", None)
    return {
        "bundle_id": vb.bundle_id,
        "classes": list(vb.classes),
        "image_size": vb.image_size,
        "gate_statistic": gate.get("stat"),
        "tau": gate["tau"],
        "tau_high": gate.get("tau_high"),
        "policy": policy,
        "calibrated_policy": gate.get("policy"),
        "t_star_range": [gate["t_min"], gate["t_max"]],
        "purifier_steps": vb.spec.purifier.steps,
        "provenance": summary,
        "signer": None if signer is None else {"key_id": signer.key_id, "name": signer.name},
        "engine": defender.engine.describe(),
        "medfedpure_version": __version__,
    }


def media_type(request: Request) -> str:
    """The request's media type (lower case, parameters dropped); no Content-Type: octet-stream."""
    raw = request.headers.get("content-type")
    if raw is None or not raw.strip():
        return "application/octet-stream"
    mt = raw.split(";", 1)[0].strip().lower()
    if mt not in MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            f"Content-Type {mt!r} is not a scan type: send the file's bytes as {', '.join(MEDIA_TYPES)}")
    return mt


def check_signature(mt: str, body: bytes) -> None:
    """Refuse a body whose leading bytes contradict its declared media type (an empty body is left to
    the loader, which refuses it as ``ScanEmptyError``)."""
    expect = MEDIA_TYPES.get(mt)
    if expect is None or not body:
        return
    name, test = expect
    if not test(body):
        raise UnsupportedMediaTypeError(
            f"Content-Type is {mt} but the body does not start with the {name} signature: send the file's "
            "bytes unchanged with its own type, or application/octet-stream to let the server detect it")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes: refused from Content-Length before reading, and while
    streaming once the running total passes the limit (a chunked upload declares no length)."""
    if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise UnsupportedMediaTypeError("Content-Encoding is not supported: send the scan file's bytes uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ScanTooLargeError(f"the request body is {int(declared):,} bytes: the service accepts at most "
                                f"{limit:,} bytes per scan (medfedpure serve --max-bytes)")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ScanTooLargeError(f"the request body passed {limit:,} bytes while streaming: the service "
                                    f"accepts at most {limit:,} bytes per scan (medfedpure serve --max-bytes)")
    return bytes(buf)


def _state(request: Request) -> ServiceState:
    st: ServiceState | None = getattr(request.app.state, "service", None)
    if st is None:
        raise NotReadyError("the Defender is not loaded yet: retry after GET /healthz answers 200")
    return st


def create_app(config: ServeConfig | None = None, *,
               defender_factory: Callable[[ServeConfig], Defender] | None = None) -> FastAPI:
    """The application for ``config`` (default: :class:`ServeConfig`'s defaults).

    ``defender_factory``: builds the Defender at start-up (default :func:`load_defender`); the
    application closes it at shutdown.
    """
    config = ServeConfig() if config is None else config
    factory = load_defender if defender_factory is None else defender_factory

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the audit file first: one that cannot be opened stops the start before the bundle is read
        audit = None if config.audit is None else audit_file_handler(config.audit, strict=True)
        audit_log = logging.getLogger(AUDIT_LOGGER)
        old_level = audit_log.level
        handlers: list[logging.Handler] = []
        if audit is not None:
            # a handler on "medfedpure" ends logging's last-resort stderr output of the service's warnings
            # and errors (the audit handler drops them): without a root handler, keep them on stderr
            handlers = [audit] + ([] if logging.getLogger().handlers else [_stderr_handler()])
            for h in handlers:
                logging.getLogger("medfedpure").addHandler(h)
            audit_log.setLevel(logging.INFO)  # whatever the log level, the records are kept
        try:
            defender = await anyio.to_thread.run_sync(factory, config)
        except BaseException:
            _detach(handlers, audit_log, old_level)
            raise
        try:
            st = ServiceState(config, defender, anyio.CapacityLimiter(config.max_concurrent), audit=audit)
            st.self_test = await anyio.to_thread.run_sync(run_self_test, defender)
            log.info("medfedpure serve: bundle %s, policy %s, self-test %s", defender.bundle.short_id,
                     defender.policy, st.self_test.get("status"))
            app.state.service = st
            yield
        finally:
            app.state.service = None
            defender.close()
            _detach(handlers, audit_log, old_level)

    app = FastAPI(title="medfedpure", version=__version__, lifespan=lifespan,
                  summary="Adversarially robust brain-MRI tumour classification (guarded by a gated purifier).")

    @app.exception_handler(ScanError)
    async def _scan_error(request: Request, e: ScanError) -> JSONResponse:
        status = scan_error_status(e)
        return error_response(status, type(e).__name__, str(e), {"Connection": "close"} if status == 413 else None)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError) -> JSONResponse:
        return error_response(e.status_code, type(e).__name__, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "query")
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
        refusal = BadParameterError("; ".join(parts) + "; see GET /docs for the parameters")
        st: ServiceState | None = getattr(request.app.state, "service", None)
        if st is not None and request.method == "POST" and request.url.path == CLASSIFY_PATH:
            try:  # a refused classification request is recorded (its seed is unknown: a fresh one)
                await anyio.to_thread.run_sync(st.record_refusal, refusal, None)
            except AuditUnavailableError as ae:
                return error_response(ae.status_code, type(ae).__name__, str(ae))
        return error_response(422, BadParameterError.__name__, str(refusal))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        name = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(e.status_code, "HTTPError")
        return error_response(e.status_code, name, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected failure in %s %s", request.method, request.url.path, exc_info=e)
        return error_response(500, InternalError.__name__, "the service failed unexpectedly; the server log has the "
                              "details. The scan was not classified: retry, or report the time of the request")

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        st: ServiceState | None = getattr(request.app.state, "service", None)
        if st is None:
            return JSONResponse({"live": True, "ready": False, "reason": "the Defender is not loaded"}, 503)
        body = {"live": True, "ready": st.ready, "bundle_id": st.defender.bundle.bundle_id,
                "policy": st.defender.policy, "self_test": st.self_test, "medfedpure_version": __version__}
        return JSONResponse(body, 200 if st.ready else 503)

    @app.get("/v1/bundle")
    async def bundle(request: Request) -> dict[str, Any]:
        st = _state(request)
        return bundle_body(st.defender, st.defender.policy)

    @app.post(CLASSIFY_PATH)
    async def classify(
        request: Request,
        seed: int | None = Query(None, ge=0, le=SEED_MAX, description="Purification RNG key (replays a decision)."),
        policy: str | None = Query(None, description="Gate policy for this call: adaptive or floor."),
        return_purified: bool = Query(False, description="Include the purified image [1, S, S]."),
        return_patch_error: bool = Query(False, description="Include the per-patch reconstruction error."),
    ) -> dict[str, Any]:
        st = _state(request)
        try:
            if policy is not None and policy not in POLICIES:
                raise BadParameterError(f"policy={policy!r}: expected {' or '.join(POLICIES)} (or omit it: "
                                        f"the service's {st.defender.policy!r})")
            mt = media_type(request)
            body = await read_body(request, st.config.max_bytes)
            check_signature(mt, body)
        except (ScanError, ServeError) as e:  # refused before the Defender ran: recorded, then answered
            await anyio.to_thread.run_sync(st.record_refusal, e, seed)
            raise

        def infer() -> Result:
            try:
                r = st.defender.run(body, seed=seed, policy=policy, return_purified=return_purified,
                                    return_patch_error=return_patch_error)
            except ScanError as e:
                # the refused Result that run_batch (and so `run --audit`) gives these bytes: it carries
                # what the load saw (pixel sha256, UIDs, scope) when the scan was refused after decoding;
                # no model runs on a refused scan, so this costs one more load
                again = st.defender.run_batch([body], seeds=None if seed is None else [seed])[0]
                st.record(again if again.status == STATUS_REFUSED else st.defender.refused_result(e, seed=seed))
                raise
            st.record(r)
            return r

        r = await anyio.to_thread.run_sync(infer, limiter=st.limiter)
        return result_body(r, policy or st.defender.policy, with_arrays=return_purified or return_patch_error)

    return app


def _detach(handlers: list[logging.Handler], audit_log: logging.Logger, old_level: int) -> None:
    """Undo the lifespan's audit set-up: its handlers off the ``medfedpure`` logger and closed."""
    if not handlers:
        return
    for h in handlers:
        logging.getLogger("medfedpure").removeHandler(h)
        h.close()
    audit_log.setLevel(old_level)


def _stderr_handler() -> logging.Handler:
    """WARNING and above of the ``medfedpure`` loggers on stderr, as logging's last resort prints them."""
    h = logging.StreamHandler()
    h.setLevel(logging.WARNING)
    h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return h


def app_from_env() -> FastAPI:
    """The uvicorn factory (``medfedpure.serve.app:app_from_env``): the config from ``MEDFEDPURE_SERVE_CONFIG``."""
    return create_app(ServeConfig.from_env())
