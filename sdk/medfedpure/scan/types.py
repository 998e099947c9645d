"""The :class:`Scan` value: validated float32 pixels at native resolution plus metadata.

A ``Scan`` is immutable: its pixels are a private read-only copy (never a view of the caller's
array, image or dataset) and its metadata never holds patient identifiers. Build scans with
:func:`medfedpure.scan.load_scan`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from medfedpure.scan.errors import ScanDtypeError, ScanNonFiniteError, ScanShapeError

__all__ = ["Scan", "pixel_sha256", "scan_meta"]


@dataclass(frozen=True, eq=False)
class Scan:
    """A validated scan at native resolution.

    Attributes:
        pixels: float32 array, ``(H, W)`` grey or ``(H, W, 3)`` RGB, finite, read-only, never a
            view of the caller's data. DICOM: modality rescale applied, MONOCHROME1 inverted.
            Values keep their native units (no normalisation; see :func:`medfedpure.scan.preprocess`).
        meta: ``source_kind`` ("array", "pil", "dicom", "path:png", "path:dicom", "bytes:jpeg",
            ...), ``original_shape`` (tuple; includes the frame axis of multi-frame sources),
            ``original_dtype`` (str), ``pixel_spacing`` (``(row, col)`` mm floats or None),
            ``photometric`` (DICOM Photometric Interpretation or the PIL mode, else None),
            ``frame`` (int or None), ``num_frames`` (int), ``modality`` (DICOM, else None);
            DICOM only: ``body_part``, ``image_type``, ``orientation``
            (:func:`medfedpure.scan.dicom.scope_attributes`). Never patient identifiers.
        dicom_uids: a DICOM input's ``{"study", "series", "sop"}`` Instance UIDs, else None. Kept out of
            ``meta`` on purpose: they link the scan to the archive, so only the audit record carries them.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    dicom_uids: dict[str, str | None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        px = self.pixels
        if not isinstance(px, np.ndarray) or px.dtype != np.float32:
            raise ScanDtypeError(
                f"Scan.pixels must be a float32 numpy array, got {type(px).__name__}"
                f"{'' if not isinstance(px, np.ndarray) else ' of ' + str(px.dtype)}: "
                "build scans with load_scan()"
            )
        if not (px.ndim == 2 or (px.ndim == 3 and px.shape[2] == 3)):
            raise ScanShapeError(
                f"Scan.pixels has shape {px.shape}: expected grey (H, W) or RGB (H, W, 3); "
                "build scans with load_scan()"
            )
        if not np.isfinite(px).all():
            raise ScanNonFiniteError("Scan.pixels contains NaN or Inf: build scans with load_scan()")
        if px.flags.writeable:  # a private, read-only copy: the Scan is immutable
            px = px.copy()
            px.flags.writeable = False
            object.__setattr__(self, "pixels", px)
        object.__setattr__(self, "meta", dict(self.meta))
        if self.dicom_uids is not None:
            object.__setattr__(self, "dicom_uids", dict(self.dicom_uids))

    @cached_property
    def sha256(self) -> str:
        """sha256 (hex) of the decoded pixels the models see before preprocessing: the bytes of
        ``pixels`` as C-ordered little-endian float32 (shape and dtype are not hashed; the audit
        record carries the shape beside it). Computed once per Scan."""
        return pixel_sha256(self.pixels)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_rgb(self) -> bool:
        return self.pixels.ndim == 3


def pixel_sha256(pixels: np.ndarray) -> str:
    """sha256 (hex) of an array's values as C-ordered little-endian float32 bytes (what ``Scan.sha256`` is)."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype="<f4").tobytes()).hexdigest()


def scan_meta(source_kind: str, **kw: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "source_kind": source_kind,
        "original_shape": None,
        "original_dtype": None,
        "pixel_spacing": None,
        "photometric": None,
        "frame": None,
        "num_frames": 1,
        "modality": None,
    }
    meta.update(kw)
    return meta
