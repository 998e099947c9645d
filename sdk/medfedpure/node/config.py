"""``NodeConfig``: what ``medfedpure listen`` loads, where it listens and where its reports go.

A frozen value, validated on construction (ValueError naming the field and the fix), so a bad command
line fails before the bundle is read or a socket is opened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
        bind: address to listen on; a non-loopback one needs ``allow_remote`` (DICOM has no
            authentication beyond AE titles and this node no TLS).
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "ae_title"))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port!r}: expected an int 0-65535 (0: a free port)")
        if not self.bind:
            raise ValueError("bind is empty: name the address to listen on (127.0.0.1 for this machine only)")
        if not is_loopback(self.bind) and not self.allow_remote:
            raise ValueError(f"bind={self.bind!r} is not a loopback address; the node has no TLS and DICOM no "
                             "authentication beyond AE titles: pass allow_remote (--allow-remote) to listen on "
                             "the network anyway, ideally with calling_aets (--allow-calling-aet) set")
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
