"""DICOM TLS (PS3.15 Annex B, the secure transport connection profiles) for the node.

Two contexts, both TLS 1.2 or later, no TLS compression:

* :func:`server_context`: what the node listens with (``medfedpure listen --tls-cert/--tls-key``). With
  a CA (``--tls-ca``) a client certificate is verified against it when one is presented, and required
  with ``require_client_cert`` (mutual TLS: only holders of a certificate from that CA can associate).
* :func:`client_context`: what the node forwards its reports with (``--forward-tls-ca``): the
  destination's certificate must chain to the CA and name the host (hostname checking on); with a
  certificate and key the node also authenticates itself to the destination.

Every PEM is read with ``cryptography`` first, so a missing, unreadable, malformed, encrypted or
expired file is a ValueError naming that file and the fix, raised while the configuration is built
(before any socket opens), instead of OpenSSL's terse "PEM lib".

pynetdicom wraps each accepted socket in the listener's own thread; with a context's default
``do_handshake_on_connect`` the handshake would run there, so one client that connects and stays
silent would stop the node accepting anybody else. The server context returned here defers the
handshake to the association's thread (it happens on the first read, under a timeout), so a stalled
or plain-DICOM caller only ever holds its own association.
"""

from __future__ import annotations

import datetime as _dt
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("medfedpure.node")

DEFAULT_HANDSHAKE_TIMEOUT_S = 30.0
MIN_VERSION = ssl.TLSVersion.TLSv1_2
_MAKE_CERT = ("make one with e.g. `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
              "-keyout key.pem -out cert.pem -subj /CN=host`, or ask your PKI")


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {path!r}: no such file; pass the path of a PEM file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path!r}: cannot be read ({e.strerror or e}); check its permissions") from e


def load_certificates(path: str, what: str) -> list[x509.Certificate]:
    """The certificates of the PEM file ``path`` (at least one), or ValueError naming ``what`` and the file."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        hint = " (it holds a private key: swap the certificate and key arguments)" if b"PRIVATE KEY-----" in data \
            else ""
        raise ValueError(f"{what} {path!r}: not a PEM certificate (-----BEGIN CERTIFICATE-----){hint}; "
                         f"{_MAKE_CERT}") from e
    return certs


def check_private_key(path: str, what: str) -> None:
    """ValueError unless ``path`` is an unencrypted PEM private key (naming ``what``, the file and the fix)."""
    data = _read(path, what)
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted: the node runs unattended and cannot ask for a passphrase
        raise ValueError(f"{what} {path!r}: the key is encrypted; the node cannot prompt for a passphrase: "
                         f"decrypt it (`openssl pkey -in {path} -out key.pem`) and protect the file with "
                         "its permissions instead") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        hint = " (it holds a certificate: swap the certificate and key arguments)" if b"CERTIFICATE-----" in data \
            else ""
        raise ValueError(f"{what} {path!r}: not a PEM private key (-----BEGIN PRIVATE KEY-----){hint}; "
                         f"{_MAKE_CERT}") from e


def _check_own_certificate(path: str, what: str, now: _dt.datetime | None = None) -> None:
    """ValueError when the first certificate of ``path`` is expired or not yet valid: every peer would
    refuse it, so the node fails at start rather than at each association."""
    cert = load_certificates(path, what)[0]
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise ValueError(f"{what} {path!r}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                         "renew it")
    if now < cert.not_valid_before_utc:
        raise ValueError(f"{what} {path!r}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                         "check this machine's clock or reissue it")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, what: str) -> None:
    _check_own_certificate(cert, f"{what} certificate")
    check_private_key(key, f"{what} key")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ValueError(f"{what} key {key!r} does not belong to the certificate {cert!r} ({e.reason or e}); "
                         "pass the key the certificate was issued for") from e


def _load_ca(ctx: ssl.SSLContext, ca: str, what: str) -> None:
    load_certificates(ca, what)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:  # pragma: no cover - parsed above; OpenSSL may still refuse an odd one
        raise ValueError(f"{what} {ca!r}: OpenSSL refuses it ({e.reason or e}); pass the CA certificate in PEM") \
            from e


class _HandshakeOnFirstRead(ssl.SSLSocket):
    """An accepted TLS socket that completes its handshake on the first ``recv`` (in the association's
    thread, under the socket timeout set at accept), then reads without a timeout, as pynetdicom's plain
    sockets do. A failed handshake (a plain-DICOM caller, no or an untrusted client certificate, a
    timeout) is one warning line on the ``medfedpure.node`` logger and reads as a closed connection, so
    pynetdicom ends the association quietly instead of logging a traceback per refused caller."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if not self.__dict__.get("_shaken"):
            self._shaken = True
            try:
                host, port = self.getpeername()[:2]
                peer = f"{host}:{port}"
            except OSError:
                peer = "?"
            try:
                self.do_handshake()
            except (ssl.SSLError, OSError) as e:
                why = getattr(e, "reason", None) or str(e) or type(e).__name__
                log.warning("TLS handshake with %s refused: %s", peer, why)
                return b""
            self.settimeout(None)
            cert = self.getpeercert() or {}
            subject = ", ".join("=".join(kv) for rdn in cert.get("subject", ()) for kv in rdn) or "none"
            log.debug("TLS %s with %s, client certificate: %s", self.version(), peer, subject)
        return super().recv(buflen, flags)


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets shake hands on their first read, in the association's thread,
    with a socket timeout of ``handshake_timeout_s`` (see the module docstring)."""

    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    sslsocket_class = _HandshakeOnFirstRead

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | None = None,
                    session: Any = None) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.handshake_timeout_s)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION


def server_context(cert: str, key: str, ca: str | None = None, *, require_client_cert: bool = False,
                   handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> ssl.SSLContext:
    """The node's listening context: its certificate ``cert`` (PEM, may hold the chain after it) and
    unencrypted ``key``; client certificates verified against ``ca`` when given, and required with
    ``require_client_cert``. ValueError (naming the file and the fix) on any bad input."""
    if require_client_cert and ca is None:
        raise ValueError("require_client_cert needs the CA that issues the client certificates (--tls-ca PEM)")
    if not handshake_timeout_s > 0:
        raise ValueError(f"handshake_timeout_s={handshake_timeout_s!r}: expected a positive number of seconds")
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.handshake_timeout_s = float(handshake_timeout_s)
    _harden(ctx)
    _load_chain(ctx, cert, key, "TLS")
    if ca is not None:
        _load_ca(ctx, ca, "TLS CA")
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The forwarding context: the destination must present a certificate that chains to ``ca`` and
    names the host connected to (the caller passes it as ``server_hostname``); ``cert``/``key``: the
    node's own client certificate, for destinations that require one. ValueError on any bad input."""
    if (cert is None) != (key is None):
        raise ValueError("a forward client certificate needs its key and a key its certificate: pass both "
                         "--forward-tls-cert and --forward-tls-key, or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    _harden(ctx)
    _load_ca(ctx, ca, "forward TLS CA")
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key, "forward TLS")
    return ctx
