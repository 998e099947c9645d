"""The ``ScanError`` family: every refusal of a scan input.

Each class is a ``ValueError`` (``ScanTypeError`` is also a ``TypeError``, ``ScanNotFoundError``
also a ``FileNotFoundError``), so callers can catch the family, the builtin or one exact cause.
Messages name the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "ScanCompressionError",
    "ScanConstantError",
    "ScanDtypeError",
    "ScanEmptyError",
    "ScanError",
    "ScanFrameIndexError",
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
]


class ScanError(ValueError):
    """Base class: the input cannot be used as a scan. The message names the problem and the fix."""


class ScanTypeError(ScanError, TypeError):
    """The source is not a type ``load_scan`` accepts."""


class ScanNotFoundError(ScanError, FileNotFoundError):
    """The path does not exist."""


class ScanNotImageError(ScanError):
    """The file or bytes are not a readable image in a supported format."""


class ScanNotRegularFileError(ScanNotImageError):
    """The path is not a regular file (a directory, FIFO, socket or device): never opened for reading,
    since reading a FIFO or device can block forever or never end."""


class ScanTruncatedError(ScanError):
    """The file ends before the data its header declares."""


class ScanNoPixelDataError(ScanError):
    """A DICOM object without pixel data (a report, an RT plan, ...)."""


class ScanCompressionError(ScanError):
    """DICOM pixel data in a compressed transfer syntax that no installed decoder handles."""


class ScanMultiFrameError(ScanError):
    """A multi-frame image was given without choosing a frame."""


class ScanFrameIndexError(ScanError):
    """The requested frame does not exist (or ``frame`` is not a non-negative int)."""


class ScanDtypeError(ScanError):
    """The array's dtype is not supported."""


class ScanShapeError(ScanError):
    """Wrong number of dimensions or channels (or a transparent alpha channel)."""


class ScanEmptyError(ScanError):
    """The scan has no pixels."""


class ScanTooSmallError(ScanError):
    """A side is shorter than ``MIN_SIDE`` pixels."""


class ScanTooLargeError(ScanError):
    """Beyond a :class:`~medfedpure.scan.limits.ScanLimits` limit: a file larger than
    ``max_file_bytes``, a header declaring more than ``max_pixels`` pixels, a side longer than
    ``max_side`` or more than ``max_decoded_bytes`` of decoded pixels (decompression bombs)."""


class ScanNonFiniteError(ScanError):
    """NaN or infinite pixel values (or values beyond the float32 range)."""


class ScanConstantError(ScanError):
    """The scan has no contrast: every pixel (or 99 % of them) has the same value."""
