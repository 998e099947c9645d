"""Write a bundle directory (DESIGN.md §6) and verify it with the same reader the runtime uses.

The writer copies artefacts into a fresh directory, hashes them, writes ``manifest.json`` last
(canonical JSON: sorted keys, 2-space indent, trailing newline) and then runs
:func:`medfedpure.runtime.bundle.verify_bundle` on the result, so a bundle that leaves the writer is a
bundle the runtime accepts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfedpure.runtime.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Artefact,
    BundleError,
    VerifiedBundle,
    check_relpath,
    verify_bundle,
)


@dataclass(frozen=True)
class ArtefactSource:
    """An artefact to put in a bundle: its bytes (or a file to copy) and what it is."""

    path: str  # relative POSIX path inside the bundle
    role: str
    format: str
    precision: str
    data: bytes | None = None
    source: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        check_relpath(self.path)
        if (self.data is None) == (self.source is None):
            raise ValueError(f"artefact {self.path!r}: give exactly one of data= or source=")


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON accepts: non-finite floats become the strings "inf",
    "-inf", "nan" (training metrics hold e.g. an unbounded update norm), tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_bundle(
    out: str | os.PathLike[str],
    artefacts: Mapping[str, ArtefactSource],
    *,
    classes: tuple[str, ...],
    image_size: int,
    preprocessing: Mapping[str, Any],
    gate: Mapping[str, Any],
    mae: Mapping[str, Any],
    purifier: Mapping[str, Any],
    provenance: Mapping[str, Any],
    overwrite: bool = False,
) -> VerifiedBundle:
    """Write a bundle directory and return it verified.

    Args:
        out: destination directory; must not exist or be empty, unless ``overwrite`` (then it is
            removed first — it must itself look like a bundle, holding a manifest.json).
        artefacts: manifest name → :class:`ArtefactSource`.
        classes, image_size, preprocessing, gate, mae, purifier, provenance: manifest sections
            (see :mod:`medfedpure.runtime.bundle`).

    Raises:
        FileExistsError: ``out`` exists and is not empty, without ``overwrite``.
        BundleError: the written bundle fails verification.
    """
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty: pass overwrite=True (--overwrite) or "
                                  "choose another folder")
        if not (root / MANIFEST_NAME).is_file():
            raise FileExistsError(f"refusing to overwrite {root}: it does not look like a bundle "
                                  f"(no {MANIFEST_NAME})")
    # Written into a sibling folder and moved into place at the end, so a failure never leaves a
    # half-written bundle behind.
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for name, src in artefacts.items():
            dest = stage / src.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.data is not None:
                dest.write_bytes(src.data)
            else:
                shutil.copyfile(src.source, dest)  # type: ignore[arg-type]
            data = dest.read_bytes()
            entry = Artefact(name=name, path=src.path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                             role=src.role, format=src.format, precision=src.precision)
            Artefact.from_dict(name, entry.to_dict())  # validates role/format/precision
            entries[name] = entry.to_dict()
        manifest = {
            "format_version": FORMAT_VERSION,
            "classes": list(classes),
            "image_size": int(image_size),
            "preprocessing": dict(preprocessing),
            "gate": dict(gate),
            "mae": dict(mae),
            "purifier": dict(purifier),
            "artefacts": entries,
            "provenance": json_safe(dict(provenance)),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        (stage / MANIFEST_NAME).write_text(text, encoding="utf-8")
        verify_bundle(stage)
        if root.exists():
            shutil.rmtree(root)
        os.replace(stage, root)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        return verify_bundle(root)
    except BundleError as e:  # pragma: no cover - would be a writer bug
        raise BundleError(f"the bundle just written to {root} fails verification: {e}") from e
