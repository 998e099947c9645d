"""``medfedpure replay RECORD --scan SRC``: re-run one audit record and say whether the decision is the same.

The record (schema version 1, :mod:`medfedpure.runtime.audit`) is read from a JSON-lines audit file, by
line number (``--line``), by SOP Instance UID (``--sop-uid``) or as the file's only record. The bundle
must be the record's (its id is pinned to the record's ``bundle_id``); the scan is loaded (the record's
``frame``, if any) and its pixel sha256 checked against the record's before any model runs; then it runs
with the record's seed, policy, backend, device, precision and scope override, and every decision field
is compared. Latency and the timestamp are not compared (they are not part of the decision).

Exit code 0: identical; 1: some field differs; 2: bad input (unreadable record, another schema version,
another scan, another bundle, a backend that is not available).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from medfedpure.cli.common import console

# the fields of a decision; compared exactly, or within --atol for the numbers
COMPARED = ("status", "reason", "error", "label", "probabilities", "flagged", "score", "score_quantile", "t_star",
            "policy", "seed", "pixel_sha256", "dicom", "scope", "bundle_id", "backend", "device", "precision",
            "tau", "t_range")


def _same(a: Any, b: Any, atol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
        return a == b or (atol > 0 and math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol)
    return type(a) is type(b) and a == b


def compare_records(recorded: dict[str, Any], replayed: dict[str, Any], *, atol: float = 0.0
                    ) -> list[tuple[str, Any, Any, bool]]:
    """(field, recorded, replayed, same) for every field of :data:`COMPARED`."""
    return [(k, recorded.get(k), replayed.get(k), _same(recorded.get(k), replayed.get(k), atol)) for k in COMPARED]


def _bad(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def replay_command(
    record: Path = typer.Argument(..., dir_okay=False, help="Audit file (JSON lines, `medfedpure run --audit`)."),
    scan: str = typer.Option(..., "--scan", help="The scan the record was made from (checked by pixel sha256)."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one); "
                                       "its id must be the record's."),
    line: int | None = typer.Option(None, "--line", min=1, help="The record on this line of the file (1-based)."),
    sop_uid: str | None = typer.Option(None, "--sop-uid", help="The (last) record of this SOP Instance UID."),
    atol: float = typer.Option(0.0, "--atol", min=0.0, help="Tolerance for numbers (default 0: bit-identical)."),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False,
                                                  help="Also trust this Ed25519 public key (PEM); repeatable."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Accept an unsigned bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object."),
) -> None:
    """Re-run one audit record on its scan with its seed, policy and backend; report field by field.

    Exit code 0: identical; 1: some field differs; 2: bad input (record, scan, bundle or backend).
    """
    from medfedpure.runtime.audit import AuditRecordError, audit_record, read_audit_record
    from medfedpure.runtime.bundle import BundleError
    from medfedpure.runtime.defender import Defender
    from medfedpure.runtime.engines import EngineError
    from medfedpure.scan import ScanError, load_scan

    try:
        rec = read_audit_record(record, line=line, sop_uid=sop_uid)
    except (AuditRecordError, ValueError) as e:
        raise _bad(str(e)) from e
    frame = rec.get("frame")
    try:
        loaded = load_scan(scan, frame=frame)
    except ScanError as e:
        raise _bad(f"the scan cannot be loaded: {type(e).__name__}: {e}") from e
    if rec.get("pixel_sha256") is None:
        raise _bad("the record has no pixel_sha256 (its input was refused before loading): nothing to replay")
    if loaded.sha256 != rec["pixel_sha256"]:
        raise _bad(f"pixel sha256 mismatch: the scan's decoded pixels hash to {loaded.sha256}, the record's to "
                   f"{rec['pixel_sha256']}: this is not the scan the record was made from; pass that scan with --scan")
    trust = dict(expected_id=rec["bundle_id"], trusted_keys=list(trusted_key or []) or None,
                 allow_unsigned=allow_unsigned)
    opts = dict(precision=rec["precision"], policy=rec["policy"])
    try:
        d = (Defender.default(rec["backend"], rec["device"], **trust, **opts) if bundle is None
             else Defender.load(bundle, rec["backend"], rec["device"], **trust, **opts))
    except (BundleError, EngineError, FileNotFoundError, ValueError, TypeError) as e:
        raise _bad(f"cannot load the record's bundle {rec['bundle_id'][:16]}… on {rec['backend']}/{rec['device']}/"
                   f"{rec['precision']}: {e}") from e
    override = bool((rec.get("scope") or {}).get("override"))
    with d:
        try:
            r = d.run(loaded, seed=rec["seed"], allow_out_of_scope=override)
        except (ScanError, ValueError) as e:
            raise _bad(f"the replay failed: {type(e).__name__}: {e}") from e
        again = audit_record(r, d, frame=frame)
    rows = compare_records(rec, again, atol=atol)
    differs = [k for k, _, _, same in rows if not same]
    if as_json:
        typer.echo(json.dumps({"identical": not differs, "differs": differs,
                               "fields": {k: {"recorded": a, "replayed": b, "same": s} for k, a, b, s in rows}},
                              allow_nan=False, default=str))
    else:
        from rich.table import Table

        t = Table(title=f"replay · bundle {rec['bundle_id'][:16]} · {rec['backend']}/{rec['device']}/"
                        f"{rec['precision']} · seed {rec['seed']} · policy {rec['policy']}")
        for col in ("field", "recorded", "replayed", "same"):
            t.add_column(col)
        for k, a, b, same in rows:
            t.add_row(k, json.dumps(a, default=str), json.dumps(b, default=str), "yes" if same else "NO")
        console().print(t)
        typer.echo("identical" if not differs else f"differs: {', '.join(differs)}")
    if differs:
        raise typer.Exit(1)
