"""Inputs beyond one file: folder/glob expansion, DICOM series grouping and slice ordering, series aggregation.

A DICOM series is the set of files sharing a SeriesInstanceUID. Its slices are ordered by
ImagePositionPatient projected on the slice normal (the cross product of the two ImageOrientationPatient
direction cosines), so the order follows the anatomy rather than file names; a series where any slice lacks
a usable position or orientation is ordered by InstanceNumber instead. Only the header is read for grouping
(``stop_before_pixels=True``): pixels are decoded once, by :func:`medfedpure.load_scan`, when the slice runs.

Aggregation rule (:func:`aggregate`), a series-level "any positive slice" rule:

- ``status`` is ``"ok"`` only if every slice's Result is ok; otherwise ``"unverified"`` and ``reason``
  names the failing slices (their source and their own reason).
- ``p_tumor`` is the maximum p(tumor) over the ok slices (the series score; None if no slice is ok).
- ``label`` is ``"tumor"`` if some ok slice has p(tumor) ≥ 0.5, else ``"no_tumor"``; None when the series
  is unverified (fail closed, as a slice's Result).
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfedpure.runtime.defender import Result

POSITIVE_THRESHOLD = 0.5  # a slice is positive when its p(tumor) is at least this
_GLOB_CHARS = frozenset("*?[")


class SeriesError(ValueError):
    """An input cannot be grouped into a DICOM series (no readable header or no SeriesInstanceUID)."""


def expand_inputs(items: Iterable[str]) -> list[str]:
    """Paths as the caller typed them: a folder becomes every regular file under it (recursively, sorted,
    joined onto the folder as typed: no absolute path is added); a pattern with ``*``, ``?`` or ``[`` that
    is not an existing path is expanded with :func:`glob.glob` (``**`` recursive, sorted); anything else is
    kept as is (a missing file is then refused where it is loaded). A pattern matching nothing is kept as
    is too, so it is reported rather than silently dropped."""
    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found: list[str] = []
            for root, dirs, files in os.walk(item):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in sorted(files))
            out.extend(found)
        elif not os.path.lexists(item) and _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            out.extend(matches if matches else [item])
        else:
            out.append(item)
    return out


def parse_frame_range(text: str) -> range:
    """``"A"`` → frame A only; ``"A:B"`` → frames A … B-1 (0-based, B exclusive, as Python slices).

    Raises:
        ValueError: not ``A`` or ``A:B`` with 0 ≤ A < B (e.g. ``--frame 0:2``).
    """
    parts = text.split(":")
    try:
        if len(parts) == 1:
            a = int(parts[0])
            b = a + 1
        elif len(parts) == 2:
            a, b = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"frame range {text!r}: expected A or A:B (0-based, B exclusive), e.g. 0:2") from None
    if a < 0 or b <= a:
        raise ValueError(f"frame range {text!r}: expected 0 <= A < B, e.g. 0:2")
    return range(a, b)


@dataclass(frozen=True)
class SliceHeader:
    """The header fields that group and order one DICOM file (no pixels read)."""

    source: str
    series_uid: str
    position: float | None  # ImagePositionPatient · slice normal (mm); None without both tags
    instance: int | None  # InstanceNumber


def _slice_position(ds: Any) -> float | None:
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        p = [float(v) for v in ipp]
        o = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(p) != 3 or len(o) != 6:
        return None
    r, c = o[:3], o[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    z = sum(a * b for a, b in zip(p, n, strict=True))
    return z if math.isfinite(z) and any(n) else None


def read_header(source: str) -> SliceHeader:
    """Read one file's grouping header with pydicom (``stop_before_pixels=True``).

    Raises:
        SeriesError: not a readable DICOM file, or without a SeriesInstanceUID.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as e:
        raise SeriesError(f"{source}: not a readable DICOM file ({type(e).__name__}: {e}); pass only DICOM "
                          "slices to run_series, or use run_batch for other images") from e
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
        raise SeriesError(f"{source}: no SeriesInstanceUID in the header; such a file cannot be grouped, "
                          "run it on its own with Defender.run")
    inst = ds.get("InstanceNumber")
    try:
        instance = int(inst) if inst not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    return SliceHeader(source, uid, _slice_position(ds), instance)


def group_series(headers: Sequence[SliceHeader]) -> dict[str, list[SliceHeader]]:
    """SeriesInstanceUID → its slices in anatomical order; series in order of first appearance.

    Order: by position on the slice normal when every slice of the series has one, else by InstanceNumber
    (slices without one last); ties keep the input order (a stable sort)."""
    groups: dict[str, list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault(h.series_uid, []).append(h)
    for uid, hs in groups.items():
        if all(h.position is not None for h in hs):
            groups[uid] = sorted(hs, key=lambda h: h.position)  # type: ignore[arg-type, return-value]
        else:
            groups[uid] = sorted(hs, key=lambda h: (h.instance is None, h.instance or 0))
    return groups


@dataclass
class SeriesResult:
    """One DICOM series' decision (the module docstring's rule) with its per-slice Results.

    Attributes:
        series_uid: the SeriesInstanceUID.
        sources: the slice files in anatomical order.
        positions: each slice's position on the normal (mm), None where ordered by InstanceNumber.
        slices: one Result per slice, in the order of ``sources``.
        label / p_tumor / status / reason: the aggregate (module docstring).
    """

    series_uid: str
    sources: list[str]
    positions: list[float | None]
    slices: list[Result] = field(repr=False)
    label: str | None
    p_tumor: float | None
    status: str
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, each slice as its source plus its Result's dict."""
        return {"series_uid": self.series_uid, "label": self.label, "p_tumor": self.p_tumor,
                "status": self.status, "reason": self.reason,
                "slices": [{"source": s, "position": p, **r.to_dict()}
                           for s, p, r in zip(self.sources, self.positions, self.slices, strict=True)]}


def aggregate(series_uid: str, sources: Sequence[str], positions: Sequence[float | None],
              results: Sequence[Result]) -> SeriesResult:
    """Apply the series rule (module docstring) to the ordered slices' Results."""
    ok = [r for r in results if r.status == "ok"]
    failing = [f"{s} ({r.status}: {r.reason})" for s, r in zip(sources, results, strict=True)
               if r.status != "ok"]
    p = max((float(r.probabilities.get("tumor", 0.0)) for r in ok), default=None)
    if failing or not results:
        label, status = None, "unverified"
        reason = ("failing slices: " + "; ".join(failing)) if failing else "the series has no slices"
    else:
        label = "tumor" if p is not None and p >= POSITIVE_THRESHOLD else "no_tumor"
        status, reason = "ok", None
    return SeriesResult(series_uid, list(sources), list(positions), list(results), label, p, status, reason)
