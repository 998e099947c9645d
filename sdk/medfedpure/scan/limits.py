"""What a scan may be: size limits and the accepted array dtypes.

Size limits are checked from the header *before* any pixel decoding (see
:func:`medfedpure.scan.validate.check_dims`), so a small file that declares a huge image (a
decompression bomb) is refused without decoding it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ARRAY_DTYPES", "MAX_PIXELS", "MAX_PREPROCESS_SIZE", "MAX_SIDE", "MIN_SIDE"]

MIN_SIDE = 32  # px; smaller scans carry too little anatomy to classify
MAX_SIDE = 16384  # px per side (decompression-bomb guard)
MAX_PIXELS = 64_000_000  # 64 megapixels (decompression-bomb guard)
MAX_PREPROCESS_SIZE = MAX_SIDE

ARRAY_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
