"""Scan input: load, validate and preprocess any scan the SDK accepts.

This is the only package that touches file formats. Everything downstream (the training data
loader, ``Defender.run``) goes through :func:`load_scan` and :func:`preprocess`.

``load_scan(source, *, frame=None) -> Scan`` accepts

- a numpy array: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``; dtype uint8, uint16, int16,
  float32 or float64;
- a PIL image;
- a path (``str`` or ``os.PathLike``) to a PNG, JPEG, TIFF or BMP file, or to a DICOM file
  (recognised by a ``.dcm`` / ``.dicom`` / ``.dic`` extension or by ``DICM`` at byte 128);
- the raw bytes of such a file (``bytes``, ``bytearray``, ``memoryview``; sniffed the same way);
- a ``pydicom.Dataset``.

and returns a :class:`Scan`: float32 pixels at native resolution, ``(H, W)`` grey or
``(H, W, 3)`` RGB, plus metadata without patient identifiers. DICOM pixels have the modality
rescale (slope / intercept or Modality LUT) applied first, then MONOCHROME1 is inverted once.

``preprocess(scan, size) -> ndarray float32 (1, size, size)`` in [0, 1] is the model input:
ITU-R BT.601 luma for RGB, robust 0.5 / 99.5 percentile normalisation (clipped), an
aspect-preserving Pillow bilinear (antialiased) resize into a centred square canvas padded
with 0.

Every refusal is a :class:`ScanError` (a ``ValueError``) subclass whose message names the
problem and the fix. Only regular files are opened (never a FIFO, socket or device), a file larger
than the file-size cap is refused before it is read, and the size limits and the decoded-bytes
budget (:class:`ScanLimits`; ``load_scan(..., limits=...)``) are checked from the header *before*
any pixel decoding, so a small file that declares a huge image (a decompression bomb) is refused
without decoding it.
The caller's array, image or dataset is never modified; ``Scan.pixels`` never shares memory
with it.

Layout (each module imports only those listed before it):

- ``errors``: the :class:`ScanError` family;
- ``limits``: :class:`ScanLimits` (file-size cap, decoded-bytes budget, pixel and side limits), its
  module-level defaults and the accepted array dtypes;
- ``types``: the :class:`Scan` value and its metadata;
- ``validate``: checks shared by every source (frame argument, sizes, dtype, shape, finiteness);
- ``image``: the Pillow reader (PNG, JPEG, TIFF, BMP, PIL images);
- ``dicom``: the pydicom reader (files, bytes, datasets);
- ``load``: :func:`load_scan`, which dispatches a source to its reader;
- ``preprocessing``: :func:`preprocess` and :func:`robust_percentiles`.
"""

from __future__ import annotations

from medfedpure.scan.dicom import DICOM_EXTENSIONS
from medfedpure.scan.errors import (
    ScanCompressionError,
    ScanConstantError,
    ScanDtypeError,
    ScanEmptyError,
    ScanError,
    ScanFrameIndexError,
    ScanMultiFrameError,
    ScanNonFiniteError,
    ScanNoPixelDataError,
    ScanNotFoundError,
    ScanNotImageError,
    ScanNotRegularFileError,
    ScanShapeError,
    ScanTooLargeError,
    ScanTooSmallError,
    ScanTruncatedError,
    ScanTypeError,
)
from medfedpure.scan.image import PIL_FORMATS
from medfedpure.scan.limits import (
    ARRAY_DTYPES,
    DEFAULT_LIMITS,
    MAX_DECODED_BYTES,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MAX_PREPROCESS_SIZE,
    MAX_SIDE,
    MIN_SIDE,
    ScanLimits,
)
from medfedpure.scan.load import load_scan
from medfedpure.scan.preprocessing import LUMA_601, PERCENTILES, preprocess, robust_percentiles
from medfedpure.scan.types import Scan

__all__ = [
    "ARRAY_DTYPES",
    "DEFAULT_LIMITS",
    "DICOM_EXTENSIONS",
    "LUMA_601",
    "MAX_DECODED_BYTES",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MAX_PREPROCESS_SIZE",
    "MAX_SIDE",
    "MIN_SIDE",
    "PERCENTILES",
    "PIL_FORMATS",
    "Scan",
    "ScanCompressionError",
    "ScanConstantError",
    "ScanDtypeError",
    "ScanEmptyError",
    "ScanError",
    "ScanFrameIndexError",
    "ScanLimits",
    "ScanMultiFrameError",
    "ScanNoPixelDataError",
    "ScanNonFiniteError",
    "ScanNotFoundError",
    "ScanNotImageError",
    "ScanNotRegularFileError",
    "ScanShapeError",
    "ScanTooLargeError",
    "ScanTooSmallError",
    "ScanTruncatedError",
    "ScanTypeError",
    "load_scan",
    "preprocess",
    "robust_percentiles",
]
