"""What a scan may be: size limits and the accepted array dtypes.

Two kinds of limit protect the process from hostile or broken files:

- the **file-size cap** (``ScanLimits.max_file_bytes``): checked with ``os.fstat`` before a byte is
  parsed, so a huge file (a sparse zero-filled ``.dcm``) is refused without reading it;
- the **decoded-bytes budget** (``ScanLimits.max_decoded_bytes``): rows × cols × samples per pixel ×
  bytes per sample × frames decoded, computed from the header (Pillow's lazily opened image, the
  DICOM Rows / Columns / SamplesPerPixel / BitsAllocated / NumberOfFrames) *before* any pixel
  decoding, so a small file that declares a huge image (a decompression bomb) is refused without
  decoding it. Caller arrays are held to the same budget (their ``nbytes``).

The pixel-count and side limits (``max_pixels``, ``max_side``) are checked first, from the same
headers (see :func:`medfedpure.scan.validate.check_dims`). The module-level constants are the
defaults; ``load_scan(source, limits=ScanLimits(...))`` (and ``Defender(..., limits=...)``) use
other ones for one call or one Defender.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ARRAY_DTYPES",
    "DEFAULT_LIMITS",
    "MAX_DECODED_BYTES",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MAX_PREPROCESS_SIZE",
    "MAX_SIDE",
    "MIN_SIDE",
    "ScanLimits",
]

MIN_SIDE = 32  # px; smaller scans carry too little anatomy to classify
MAX_SIDE = 16384  # px per side (decompression-bomb guard)
MAX_PIXELS = 64_000_000  # 64 megapixels (decompression-bomb guard)
MAX_PREPROCESS_SIZE = MAX_SIDE
# A brain-MRI slice is well under 1 MiB (512 × 512 × 2 bytes); these caps leave room for large
# multi-frame DICOM objects while bounding memory: preprocessing holds a few float32 / float64
# copies of the decoded pixels, so its peak is a small multiple of the decoded bytes.
MAX_FILE_BYTES = 128 * 2**20  # bytes on disk
MAX_DECODED_BYTES = 64 * 2**20  # bytes of decoded pixel data (all frames that are decoded)

ARRAY_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(f"ScanLimits.{name}={value!r}: expected a positive int")
    return int(value)


@dataclass(frozen=True)
class ScanLimits:
    """Resource limits for loading one scan (every field a positive int).

    Attributes:
        max_file_bytes: largest file (path sources) or byte string (bytes sources) that is parsed.
        max_decoded_bytes: largest decoded pixel buffer, rows × cols × samples × bytes per sample ×
            frames, computed from the header before decoding (the frames read: every frame of a
            DICOM object, whose pixel data element is read whole; the chosen page of a TIFF).
        max_pixels: largest rows × cols of one frame.
        max_side: longest side of one frame, in pixels.

    Raises:
        ValueError: a field that is not a positive int, or ``max_side`` below ``MIN_SIDE``.
    """

    max_file_bytes: int = MAX_FILE_BYTES
    max_decoded_bytes: int = MAX_DECODED_BYTES
    max_pixels: int = MAX_PIXELS
    max_side: int = MAX_SIDE

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_decoded_bytes", "max_pixels", "max_side"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.max_side < MIN_SIDE:
            raise ValueError(f"ScanLimits.max_side={self.max_side}: must be at least MIN_SIDE = {MIN_SIDE}")


DEFAULT_LIMITS = ScanLimits()


def check_limits_arg(limits: object) -> ScanLimits:
    """``None`` → the defaults; a :class:`ScanLimits` → itself; anything else → TypeError."""
    if limits is None:
        return DEFAULT_LIMITS
    if not isinstance(limits, ScanLimits):
        raise TypeError(f"limits={limits!r}: expected a medfedpure.scan.ScanLimits or None (the defaults)")
    return limits
