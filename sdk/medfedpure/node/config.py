"""``NodeConfig``: what ``medfedpure listen`` loads, where it listens and where its reports go.

A frozen value, validated on construction (ValueError naming the field and the fix), so a bad command
line fails before the bundle is read or a socket is opened.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from medfedpure.node.tls import DEFAULT_HANDSHAKE_TIMEOUT_S, client_context, server_context
from medfedpure.runtime.defender import POLICIES
from medfedpure.runtime.engines import BACKENDS, DEVICES
from medfedpure.runtime.network import is_loopback
from medfedpure.scan.limits import MAX_FILE_BYTES

# DICOM AE titles: 1..16 characters of the default repertoire, no backslash, not only spaces (PS3.5 6.2)
AE_TITLE_MAX = 16


def check_ae_title(value: str, what: str) -> str:
    """``value`` stripped of surrounding spaces, or ValueError when it is not a valid AE title."""
    if not isinstance(value, str):
        raise ValueError(f"{what}={value!r}: expected a string of 1 to {AE_TITLE_MAX} characters")
    title = value.strip()
    if not title or len(title) > AE_TITLE_MAX or "\\" in title or not title.isascii() or not title.isprintable():
        raise ValueError(f"{what}={value!r}: an AE title is 1 to {AE_TITLE_MAX} printable ASCII characters "
                         "without a backslash (e.g. MEDFEDPURE)")
    return title


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 literal as ``[::1]:104``) → (host, port); ValueError on anything else."""
    host, sep, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"forward destination {value!r}: expected HOST:PORT with a port 1-65535 "
                         "(e.g. pacs.example.org:104 or [::1]:11112)")
    return host, int(port_s)


@dataclass(frozen=True)
class ForwardTarget:
    """A Storage SCP that receives the reports: its address and its AE title."""

    host: str
    port: int
    ae_title: str

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("forward host is empty: name the destination's host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"forward port={self.port!r}: expected an int 1-65535")
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "forward AE title"))

    @classmethod
    def parse(cls, address: str, ae_title: str) -> ForwardTarget:
        """From the command line's ``HOST:PORT AET``."""
        host, port = parse_host_port(address)
        return cls(host, port, ae_title)


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one DICOM node.

    Attributes:
        ae_title: the node's own AE title; associations addressed to another title are rejected
            (``require_called_aet``), and it is the calling title when forwarding.
        port: TCP port to listen on (0: a free port chosen by the system, read back from
            :attr:`medfedpure.node.scp.DicomNode.port`).
        bind: address to listen on; a non-loopback one needs ``allow_remote`` (plain DICOM has no
            authentication beyond AE titles: expose the node with TLS and client certificates).
        forward / store: where each Structured Report goes: C-STORE to ``forward``, or a file
            ``<SOP Instance UID>.dcm`` under the folder ``store``. Exactly one is set.
        bundle / backend / device / threads / policy / timeout_s / expected_id / trusted_keys /
            allow_unsigned: the Defender, as ``medfedpure serve``.
        max_bytes: largest encoded dataset classified (also the Defender's file-size cap); a larger
            one is answered "out of resources" before it is decoded.
        max_concurrent: inferences running at once across associations (more wait their turn).
        max_associations: associations served at once (pynetdicom's ``maximum_associations``).
        require_called_aet: reject associations whose called AE title is not ``ae_title``.
        calling_aets: when non-empty, only these calling AE titles may associate.
        forward_timeout_s: connection, ACSE and DIMSE timeout of the forwarding association.
        tls_cert / tls_key: the node's certificate (PEM; may hold its chain) and unencrypted private
            key: the node then speaks DICOM TLS only (PS3.15 Annex B; TLS 1.2 or later). Both or neither.
        tls_ca: CA certificate(s) (PEM) that client certificates are verified against when presented.
        tls_require_client_cert: refuse a TLS client without a certificate from ``tls_ca`` (needs it).
        forward_tls_ca: forward the reports over TLS; the destination's certificate must chain to this
            CA and name ``forward_tls_hostname`` (default: the forward host).
        forward_tls_cert / forward_tls_key: the node's client certificate and key for a destination that
            requires one (both or neither; need ``forward_tls_ca``).
        tls_handshake_timeout_s: how long an accepted connection may take to complete its TLS handshake.

    The TLS files are read and checked here (see :mod:`medfedpure.node.tls`), so a bad PEM fails before
    any socket opens; :meth:`server_ssl_context` / :meth:`forward_ssl_context` build the contexts.
    """

    ae_title: str = "MEDFEDPURE"
    port: int = 11112
    bind: str = "127.0.0.1"
    forward: ForwardTarget | None = None
    store: str | None = None
    bundle: str | None = None
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0
    policy: str | None = None
    timeout_s: float = 30.0
    expected_id: str | None = None
    trusted_keys: tuple[str, ...] = ()
    allow_unsigned: bool = False
    max_bytes: int = 64 * 2**20
    max_concurrent: int = 2
    max_associations: int = 10
    require_called_aet: bool = True
    calling_aets: tuple[str, ...] = ()
    allow_remote: bool = False
    forward_timeout_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_require_client_cert: bool = False
    forward_tls_ca: str | None = None
    forward_tls_cert: str | None = None
    forward_tls_key: str | None = None
    forward_tls_hostname: str | None = None
    tls_handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S

    @property
    def tls(self) -> bool:
        """Whether the node listens with DICOM TLS."""
        return self.tls_cert is not None

    @property
    def forward_tls(self) -> bool:
        """Whether the reports are forwarded over DICOM TLS."""
        return self.forward_tls_ca is not None

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The listening context (None: plain DICOM). ValueError naming a bad file."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return server_context(self.tls_cert, self.tls_key, self.tls_ca,
                              require_client_cert=self.tls_require_client_cert,
                              handshake_timeout_s=self.tls_handshake_timeout_s)

    def forward_ssl_context(self) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for the forward association: (context, server hostname); None: plain."""
        if self.forward_tls_ca is None or self.forward is None:
            return None
        ctx = client_context(self.forward_tls_ca, self.forward_tls_cert, self.forward_tls_key)
        return ctx, self.forward_tls_hostname or self.forward.host

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "ae_title"))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port!r}: expected an int 0-65535 (0: a free port)")
        if not self.bind:
            raise ValueError("bind is empty: name the address to listen on (127.0.0.1 for this machine only)")
        if not is_loopback(self.bind) and not self.allow_remote:
            raise ValueError(f"bind={self.bind!r} is not a loopback address; plain DICOM has no authentication "
                             "beyond AE titles: pass allow_remote (--allow-remote) to listen on the network, and "
                             "expose the node with TLS and client certificates (--tls-cert, --tls-key, --tls-ca, "
                             "--tls-require-client-cert) and calling_aets (--allow-calling-aet) set")
        if (self.forward is None) == (self.store is None):
            raise ValueError("the reports need exactly one destination: forward (--forward HOST:PORT AET) or "
                             "store (--store DIR)")
        if self.store is not None:
            object.__setattr__(self, "store", os.fspath(self.store))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}: expected one of {', '.join(POLICIES)} (or none: the bundle's)")
        for name, lo in (("threads", 0), ("max_concurrent", 1), ("max_bytes", 1), ("max_associations", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r}: expected an int ≥ {lo}")
        if self.max_bytes > MAX_FILE_BYTES:
            raise ValueError(f"max_bytes={self.max_bytes:,}: above the scan loader's cap of {MAX_FILE_BYTES:,} bytes")
        for name in ("timeout_s", "forward_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive number of seconds")
        object.__setattr__(self, "trusted_keys", tuple(str(k) for k in self.trusted_keys))
        object.__setattr__(self, "calling_aets",
                           tuple(check_ae_title(a, "calling AE title") for a in self.calling_aets))
        self._check_tls()

    def _check_tls(self) -> None:
        """Which TLS settings go together, then load every TLS file once (ValueError naming a bad one)."""
        for name in ("tls_cert", "tls_key", "tls_ca", "forward_tls_ca", "forward_tls_cert", "forward_tls_key"):
            v = getattr(self, name)
            if v is not None:
                if not str(v):
                    raise ValueError(f"{name} is empty: pass the path of a PEM file (or leave it unset)")
                object.__setattr__(self, name, os.fspath(v))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs the node's certificate and its key: pass both --tls-cert and --tls-key "
                             f"(got only {'--tls-cert' if self.tls_key is None else '--tls-key'})")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca verifies client certificates of a TLS node: pass --tls-cert and --tls-key too")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise ValueError("--tls-require-client-cert needs the CA that issues the client certificates: "
                             "pass --tls-ca PEM")
        forward_opts = {"forward_tls_ca": "--forward-tls-ca", "forward_tls_cert": "--forward-tls-cert",
                        "forward_tls_key": "--forward-tls-key", "forward_tls_hostname": "--forward-tls-hostname"}
        given = [flag for name, flag in forward_opts.items() if getattr(self, name) is not None]
        if given and self.forward is None:
            raise ValueError(f"{', '.join(given)} set without --forward: TLS options of the forward destination "
                             "need one (--forward HOST:PORT AET)")
        if given and self.forward_tls_ca is None:
            raise ValueError(f"{', '.join(given)} need --forward-tls-ca PEM: the CA that the destination's "
                             "certificate is verified against")
        if self.forward_tls_hostname is not None and not self.forward_tls_hostname.strip():
            raise ValueError("forward_tls_hostname is empty: name the host the destination's certificate is for")
        if not self.tls_handshake_timeout_s > 0:
            raise ValueError(f"tls_handshake_timeout_s={self.tls_handshake_timeout_s!r}: expected a positive "
                             "number of seconds")
        self.server_ssl_context()
        self.forward_ssl_context()
