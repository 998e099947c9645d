"""``load_scan``: dispatch any accepted source to its reader and return a validated :class:`Scan`.

Sources: a :class:`Scan` (returned as is), a numpy array, a PIL image, a path, file bytes or a
``pydicom.Dataset``. Paths and bytes are sniffed: DICOM by the ``DICM`` marker (or, for paths, the
extension), everything else through Pillow.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from medfedpure.scan.dicom import DICOM_EXTENSIONS, from_dataset, is_dicom_magic, read_dicom
from medfedpure.scan.errors import ScanEmptyError, ScanNotFoundError, ScanNotImageError, ScanTypeError
from medfedpure.scan.image import from_pil, open_pil
from medfedpure.scan.types import Scan, scan_meta
from medfedpure.scan.validate import check_frame_arg, select_frame, validate_array

__all__ = ["load_scan"]


def _from_path(path: str | os.PathLike[str], frame: int | None) -> Scan:
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not os.path.exists(p):
        raise ScanNotFoundError(f"no such file: {p!r}; check the path")
    if os.path.isdir(p):
        raise ScanNotImageError(f"{p!r} is a directory: pass one image file")
    origin = f"file {os.path.basename(p)!r}"
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise ScanNotImageError(f"{origin} cannot be read ({exc}): check its permissions") from exc
    if size == 0:
        raise ScanEmptyError(f"{origin} is empty (0 bytes): re-export or re-copy it")
    if is_dicom_magic(head) or p.lower().endswith(DICOM_EXTENSIONS):
        ds = read_dicom(p, origin, size, path=True)
        return from_dataset(ds, "path:dicom", frame, origin, from_file=True)
    return open_pil(p, origin, "path", frame)


def _from_bytes(data: bytes | bytearray | memoryview, frame: int | None) -> Scan:
    buf = bytes(data)
    if len(buf) == 0:
        raise ScanEmptyError("scan bytes are empty: pass the contents of an image file")
    origin = "scan bytes"
    if is_dicom_magic(buf):
        ds = read_dicom(io.BytesIO(buf), origin, len(buf), path=False)
        return from_dataset(ds, "bytes:dicom", frame, origin, from_file=True)
    return open_pil(io.BytesIO(buf), origin, "bytes", frame)


def _is_pydicom_dataset(obj: Any) -> bool:
    if not type(obj).__module__.startswith("pydicom"):
        return False
    from pydicom.dataset import Dataset

    return isinstance(obj, Dataset)


def load_scan(source: Any, *, frame: int | None = None) -> Scan:
    """Load and validate one scan.

    Args:
        source: numpy array ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` (uint8, uint16, int16,
            float32, float64); PIL image; path to a PNG / JPEG / TIFF / BMP / DICOM file; the
            bytes of such a file; a ``pydicom.Dataset``; or a :class:`Scan` (returned as is).
        frame: frame index for multi-frame sources (DICOM, multi-page TIFF); required there,
            refused when out of range.

    Returns:
        A :class:`Scan` with float32 pixels ``(H, W)`` or ``(H, W, 3)`` at native resolution.

    Raises:
        ScanError: a subclass naming the problem and the fix (see the module docstring).
    """
    frame = check_frame_arg(frame)
    if isinstance(source, Scan):
        select_frame(1, frame, "scan")
        return source
    if isinstance(source, np.ndarray):
        select_frame(1, frame, "array")
        meta = scan_meta(
            "array", original_shape=tuple(int(s) for s in source.shape), original_dtype=source.dtype.name
        )
        return validate_array(source, meta, strict_dtype=True)
    if isinstance(source, Image.Image):
        return from_pil(source, "pil", frame, restore=True)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source, frame)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(source, frame)
    if _is_pydicom_dataset(source):
        return from_dataset(source, "dicom", frame, "DICOM dataset", from_file=False)
    hint = ""
    if hasattr(source, "numpy") and hasattr(source, "detach"):
        hint = " (for a torch tensor use t.detach().cpu().numpy())"
    raise ScanTypeError(
        f"cannot load a scan from {type(source).__name__}: pass a numpy array, PIL image, file "
        f"path, file bytes or pydicom Dataset{hint}"
    )
