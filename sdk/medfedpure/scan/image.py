"""Pillow reader: PNG, JPEG, TIFF and BMP files or bytes, and caller PIL images.

Only these formats are opened (``PIL_FORMATS``). Image sizes are checked from the header before
decoding; multi-page TIFFs need a frame index, and a caller's image gets its frame position back.
An alpha channel is accepted only when fully opaque. Before ``load()`` the frame's decoded size
(width × height × bands × bytes per band, from the mode in the header) is held to the
decoded-bytes budget of :class:`~medfedpure.scan.limits.ScanLimits`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

from medfedpure.scan.errors import (
    ScanError,
    ScanNotImageError,
    ScanShapeError,
    ScanTooLargeError,
    ScanTruncatedError,
)
from medfedpure.scan.limits import DEFAULT_LIMITS, ScanLimits
from medfedpure.scan.types import Scan, scan_meta
from medfedpure.scan.validate import check_decoded_bytes, check_dims, select_frame, validate_array

__all__ = ["PIL_FORMATS", "from_pil", "open_pil"]

PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Decoded PIL image -> (H, W) or (H, W, 3) array in the image's own dtype (a new array)."""
    mode = img.mode
    if mode == "P":  # palette: expand, keeping transparency if the palette has any
        has_alpha = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    elif mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode in ("LA", "La", "RGBA", "RGBa"):
        full = np.asarray(img.convert("LA" if mode.startswith("L") else "RGBA"))
        if not bool((full[..., -1] == 255).all()):
            raise ScanShapeError(
                f"scan has an alpha channel with transparent pixels (mode {img.mode}): flatten it "
                "onto a background first, e.g. img.convert('RGB') or img.convert('L')"
            )
        return full[..., 0] if full.shape[2] == 2 else full[..., :3]
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return np.asarray(img.convert("RGB"))
    raise ScanNotImageError(
        f"image mode {mode!r} is not supported: convert it to 'L', 'I;16', 'F' or 'RGB' first"
    )


def _check_frame_size(img: Image.Image, what: str, limits: ScanLimits) -> None:
    """Pixel, side and decoded-bytes limits of the current frame, from its header (no decoding)."""
    width, height = (int(v) for v in img.size)
    check_dims(height, width, what, limits)
    mode = img.mode
    try:
        info = ImageMode.getmode(mode)
        samples, itemsize = len(info.bands), np.dtype(info.typestr).itemsize
    except (KeyError, TypeError, ValueError):  # a mode Pillow cannot describe: refused when decoded
        samples, itemsize = 4, 4
    if mode == "P":  # a palette image is expanded to RGB
        samples = 3
    detail = f"{height}×{width} pixels × {samples} samples × {itemsize} bytes, mode {mode}"
    check_decoded_bytes(height * width * samples * itemsize, detail, what, limits)


def from_pil(img: Image.Image, kind: str, frame: int | None, *, restore: bool,
             limits: ScanLimits = DEFAULT_LIMITS) -> Scan:
    """Decode a lazily opened PIL image; sizes and the decoded bytes are checked before ``load()``.

    ``restore``: the image is the caller's; put its frame position back afterwards.
    """
    width, height = img.size
    check_dims(int(height), int(width), "image", limits)
    try:  # a TIFF parses every page header here: untrusted bytes may fail in any way
        num_frames = int(getattr(img, "n_frames", 1) or 1)
    except Exception as exc:
        raise ScanNotImageError(
            f"image pages cannot be counted ({type(exc).__name__}: {exc}): the file is corrupt"
        ) from exc
    idx = select_frame(num_frames, frame, "image")
    pos = img.tell() if restore else 0
    try:
        if idx is not None and idx != img.tell():
            img.seek(idx)
            width, height = img.size  # pages of a TIFF may differ in size
        _check_frame_size(img, "image" if idx is None else f"frame {idx} of the image", limits)
        try:
            img.load()
            raw = _pil_to_array(img)
        except Image.DecompressionBombError as exc:
            raise ScanTooLargeError(f"image is too large to decode safely: {exc}") from exc
        except (ScanError, MemoryError):
            raise
        except Exception as exc:  # any decoder failure on untrusted bytes (Pillow also raises TypeError)
            if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
                raise ScanTruncatedError(
                    f"image data ends early ({exc}): the file is truncated; re-export or re-copy it"
                ) from exc
            raise ScanNotImageError(f"image data cannot be decoded ({exc}): the file is corrupt") from exc
        mode, bands = img.mode, len(img.getbands())
    finally:
        if restore and img.tell() != pos:
            img.seek(pos)
    meta = scan_meta(
        kind,
        original_shape=(int(height), int(width)) if bands == 1 else (int(height), int(width), bands),
        original_dtype=raw.dtype.name,
        photometric=mode,
        frame=idx,
        num_frames=num_frames,
    )
    return validate_array(raw, meta, strict_dtype=False, limits=limits)


def open_pil(fp: Any, origin: str, prefix: str, frame: int | None,
             limits: ScanLimits = DEFAULT_LIMITS) -> Scan:
    """Open a file or buffer with Pillow (PNG / JPEG / TIFF / BMP only) and decode it."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 89 and 179 megapixels; our own limit (64) is stricter and
            # refuses those images anyway. (catch_warnings is process-global state: harmless here.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ScanTooLargeError(
            f"image header declares more than {limits.max_pixels / 1e6:.0f} megapixels ({exc}); refused "
            "before decoding (decompression-bomb guard): downsample it before loading"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ScanNotImageError(
            f"{origin}: not a readable image (supported formats: PNG, JPEG, TIFF, BMP, DICOM); "
            "check the file, or convert it to one of these formats"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ScanNotImageError(f"{origin} cannot be read as an image ({exc}): the file is corrupt") from exc
    with img:
        fmt = (img.format or "image").lower()
        return from_pil(img, f"{prefix}:{fmt}", frame, restore=False, limits=limits)
