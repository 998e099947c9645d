"""``ServeConfig``: what ``medfedpure serve`` loads and how it guards the door.

A frozen value, validated on construction (ValueError on a bad field), so a bad command line fails
before the bundle is read. It also travels to uvicorn worker processes as JSON in
``MEDFEDPURE_SERVE_CONFIG`` (each worker builds its own application from it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medfedpure.runtime.defender import POLICIES
from medfedpure.runtime.engines import BACKENDS, DEVICES
from medfedpure.scan.limits import MAX_FILE_BYTES

CONFIG_ENV = "MEDFEDPURE_SERVE_CONFIG"


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one service.

    Attributes:
        bundle: bundle folder; None: the embedded default bundle (pinned to its shipped id).
        backend / device / threads: the engine (as ``medfedpure run``); threads 0: the runtime's default.
        policy: the gate policy when a request names none; None: the bundle's calibrated one.
        max_bytes: largest request body (a scan file) accepted, in bytes; also the Defender's
            ``ScanLimits.max_file_bytes``, so the two limits cannot disagree.
        max_concurrent: inferences running at once in the thread pool; more requests wait their turn
            (the event loop stays free to answer ``/healthz`` and to refuse bad requests).
        expected_id / trusted_keys / allow_unsigned: bundle trust, as ``Defender.load``.
        timeout_s: the Defender's budget per call (an expired call is a 200 with status "unverified").
        audit: JSON-lines file that receives one audit record (:mod:`medfedpure.runtime.audit`) per
            ``/v1/classify`` decision or refusal, appended by every worker process; None: none kept.
            Its folder must exist and it must not be a folder; stored as an absolute path (workers
            resolve it alike). Whether it can be opened is checked when the service starts.
    """

    bundle: str | None = None
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0
    policy: str | None = None
    max_bytes: int = 16 * 2**20
    max_concurrent: int = 4
    expected_id: str | None = None
    trusted_keys: tuple[str, ...] = ()
    allow_unsigned: bool = False
    timeout_s: float = 30.0
    audit: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}: expected one of {', '.join(POLICIES)} (or none: the bundle's)")
        for name, lo in (("threads", 0), ("max_concurrent", 1), ("max_bytes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r}: expected an int ≥ {lo}")
        if self.max_bytes > MAX_FILE_BYTES:
            raise ValueError(f"max_bytes={self.max_bytes:,}: above the scan loader's cap of {MAX_FILE_BYTES:,} bytes")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}: expected a positive number of seconds")
        object.__setattr__(self, "trusted_keys", tuple(str(k) for k in self.trusted_keys))
        if self.audit is not None:
            object.__setattr__(self, "audit", _check_audit_path(self.audit))

    def to_env(self) -> str:
        """JSON for :data:`CONFIG_ENV`."""
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServeConfig:
        """The config a parent process put into :data:`CONFIG_ENV` (the defaults when it is unset)."""
        raw = (os.environ if environ is None else environ).get(CONFIG_ENV)
        if not raw:
            return cls()
        d: dict[str, Any] = json.loads(raw)
        return cls(**{**d, "trusted_keys": tuple(d.get("trusted_keys") or ())})


def _check_audit_path(audit: object) -> str:
    """``audit`` as an absolute path, after checking that its folder exists and that it is not a folder."""
    if not isinstance(audit, (str, os.PathLike)) or not os.fspath(audit):
        raise ValueError(f"audit={audit!r}: expected the path of a JSON-lines file (or None: no audit records)")
    path = Path(os.fspath(audit)).expanduser().absolute()
    if path.is_dir():
        raise ValueError(f"audit={os.fspath(audit)!r} is a folder: name a file in it, e.g. {path / 'audit.jsonl'}")
    if not path.parent.is_dir():
        raise ValueError(f"audit={os.fspath(audit)!r}: its folder {path.parent} does not exist; create it first "
                         "or choose a file in an existing folder")
    return str(path)
