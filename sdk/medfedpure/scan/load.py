"""``load_scan``: dispatch any accepted source to its reader and return a validated :class:`Scan`.

Sources: a :class:`Scan` (returned as is), a numpy array, a PIL image, a path, file bytes or a
``pydicom.Dataset``. Paths and bytes are sniffed: DICOM by the ``DICM`` marker (or, for paths, the
extension), everything else through Pillow.

Paths: only regular files are opened. The path is checked with ``os.stat`` (a FIFO, socket, device
or directory is refused without opening it), then opened with ``O_NONBLOCK`` (a FIFO swapped in
after the check cannot block the open) and checked again with ``os.fstat`` on the open descriptor,
which is what the readers then read: the file that was checked is the file that is parsed. Its size
is held to ``ScanLimits.max_file_bytes`` before a byte is read.
"""

from __future__ import annotations

import io
import os
import stat
from typing import IO, Any

import numpy as np
from PIL import Image

from medfedpure.scan.dicom import DICOM_EXTENSIONS, from_dataset, is_dicom_magic, read_dicom
from medfedpure.scan.errors import (
    ScanEmptyError,
    ScanNotFoundError,
    ScanNotImageError,
    ScanNotRegularFileError,
    ScanTooLargeError,
    ScanTypeError,
)
from medfedpure.scan.image import from_pil, open_pil
from medfedpure.scan.limits import ScanLimits, check_limits_arg
from medfedpure.scan.types import Scan, scan_meta
from medfedpure.scan.validate import check_frame_arg, select_frame, validate_array

__all__ = ["load_scan"]


class _OpenFile:
    """A read-only view of an open binary file without a ``name``: pydicom then reads deferred (large)
    values from this very object instead of re-opening a path or a descriptor number by name."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    @property
    def closed(self) -> bool:
        return self._fh.closed


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(st: os.stat_result, p: str, limits: ScanLimits) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ScanNotRegularFileError(
            f"{p!r} is {_kind(st.st_mode)}, not a regular file: it is not opened (reading it could "
            "block or never end); pass one image file"
        )
    if st.st_size > limits.max_file_bytes:
        raise ScanTooLargeError(
            f"file {os.path.basename(p)!r} is {st.st_size:,} bytes: the file-size cap is "
            f"{limits.max_file_bytes:,} bytes; check that it is one scan, or raise ScanLimits.max_file_bytes"
        )


def _open_regular(p: str, limits: ScanLimits) -> tuple[IO[bytes], int]:
    """Open a regular file under the size cap without ever blocking: (binary file object, size)."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ScanNotFoundError(f"no such file: {p!r}; check the path") from None
    except OSError as exc:
        raise ScanNotImageError(f"{p!r} cannot be examined ({exc}): check the path and its permissions") \
            from exc
    _check_regular(st, p, limits)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise ScanNotFoundError(f"no such file: {p!r}; check the path") from None
    except OSError as exc:
        raise ScanNotImageError(
            f"file {os.path.basename(p)!r} cannot be opened ({exc}): check its permissions"
        ) from exc
    try:
        st = os.fstat(fd)  # the object really opened: a FIFO swapped in after os.stat is caught here
        _check_regular(st, p, limits)
        return os.fdopen(fd, "rb"), int(st.st_size)
    except BaseException:
        os.close(fd)
        raise


def _from_path(path: str | os.PathLike[str], frame: int | None, limits: ScanLimits) -> Scan:
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    origin = f"file {os.path.basename(p)!r}"
    fh, size = _open_regular(p, limits)
    with fh:
        if size == 0:
            raise ScanEmptyError(f"{origin} is empty (0 bytes): re-export or re-copy it")
        try:
            head = fh.read(132)
            fh.seek(0)
        except OSError as exc:
            raise ScanNotImageError(f"{origin} cannot be read ({exc}): check the file") from exc
        if is_dicom_magic(head) or p.lower().endswith(DICOM_EXTENSIONS):
            # the open file object: pydicom reads deferred (large) values from it, never re-opens the path
            ds = read_dicom(_OpenFile(fh), origin, size, path=True)
            return from_dataset(ds, "path:dicom", frame, origin, from_file=True, limits=limits)
        return open_pil(fh, origin, "path", frame, limits)


def _from_bytes(data: bytes | bytearray | memoryview, frame: int | None, limits: ScanLimits) -> Scan:
    nbytes = data.nbytes if isinstance(data, memoryview) else len(data)
    if nbytes > limits.max_file_bytes:
        raise ScanTooLargeError(
            f"scan bytes are {nbytes:,} bytes: the file-size cap is {limits.max_file_bytes:,} bytes; "
            "check that they hold one scan, or raise ScanLimits.max_file_bytes"
        )
    buf = bytes(data)
    if len(buf) == 0:
        raise ScanEmptyError("scan bytes are empty: pass the contents of an image file")
    origin = "scan bytes"
    if is_dicom_magic(buf):
        ds = read_dicom(io.BytesIO(buf), origin, len(buf), path=False)
        return from_dataset(ds, "bytes:dicom", frame, origin, from_file=True, limits=limits)
    return open_pil(io.BytesIO(buf), origin, "bytes", frame, limits)


def _is_pydicom_dataset(obj: Any) -> bool:
    if not type(obj).__module__.startswith("pydicom"):
        return False
    from pydicom.dataset import Dataset

    return isinstance(obj, Dataset)


def load_scan(source: Any, *, frame: int | None = None, limits: ScanLimits | None = None) -> Scan:
    """Load and validate one scan.

    Args:
        source: numpy array ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` (uint8, uint16, int16,
            float32, float64); PIL image; path to a PNG / JPEG / TIFF / BMP / DICOM file; the
            bytes of such a file; a ``pydicom.Dataset``; or a :class:`Scan` (returned as is).
        frame: frame index for multi-frame sources (DICOM, multi-page TIFF); required there,
            refused when out of range.
        limits: file-size cap, decoded-bytes budget, pixel and side limits
            (:class:`~medfedpure.scan.limits.ScanLimits`); None: the module defaults.

    Returns:
        A :class:`Scan` with float32 pixels ``(H, W)`` or ``(H, W, 3)`` at native resolution.

    Raises:
        ScanError: a subclass naming the problem and the fix (see the module docstring).
    """
    frame = check_frame_arg(frame)
    limits = check_limits_arg(limits)
    if isinstance(source, Scan):
        select_frame(1, frame, "scan")
        return source
    if isinstance(source, np.ndarray):
        select_frame(1, frame, "array")
        meta = scan_meta(
            "array", original_shape=tuple(int(s) for s in source.shape), original_dtype=source.dtype.name
        )
        return validate_array(source, meta, strict_dtype=True, limits=limits)
    if isinstance(source, Image.Image):
        return from_pil(source, "pil", frame, restore=True, limits=limits)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source, frame, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(source, frame, limits)
    if _is_pydicom_dataset(source):
        return from_dataset(source, "dicom", frame, "DICOM dataset", from_file=False, limits=limits)
    hint = ""
    if hasattr(source, "numpy") and hasattr(source, "detach"):
        hint = " (for a torch tensor use t.detach().cpu().numpy())"
    raise ScanTypeError(
        f"cannot load a scan from {type(source).__name__}: pass a numpy array, PIL image, file "
        f"path, file bytes or pydicom Dataset{hint}"
    )
