"""Checks shared by every source: the frame argument, size limits, dtype, shape, finiteness, contrast.

Readers call :func:`check_dims` on header sizes before decoding and hand the decoded pixels to
:func:`validate_array`, which turns them into a :class:`~medfedpure.scan.types.Scan` (always a
copy; the caller's data is never modified).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from medfedpure.scan.errors import (
    ScanConstantError,
    ScanDtypeError,
    ScanEmptyError,
    ScanFrameIndexError,
    ScanMultiFrameError,
    ScanNonFiniteError,
    ScanShapeError,
    ScanTooLargeError,
    ScanTooSmallError,
)
from medfedpure.scan.limits import ARRAY_DTYPES, DEFAULT_LIMITS, MIN_SIDE, ScanLimits
from medfedpure.scan.types import Scan

__all__ = ["check_decoded_bytes", "check_dims", "check_frame_arg", "select_frame", "validate_array"]


def check_frame_arg(frame: Any) -> int | None:
    if frame is None:
        return None
    if isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or int(frame) < 0:
        raise ScanFrameIndexError(
            f"frame={frame!r} is not a valid frame index: pass a non-negative int (0 = first frame)"
        )
    return int(frame)


def select_frame(num_frames: int, frame: int | None, what: str) -> int | None:
    """Frame index to decode (None for single-frame sources without a frame)."""
    if num_frames > 1 and frame is None:
        raise ScanMultiFrameError(
            f"{what} has {num_frames} frames: choose one with load_scan(..., frame=i), 0 <= i < {num_frames}"
        )
    if frame is not None and frame >= num_frames:
        raise ScanFrameIndexError(
            f"frame={frame} is out of range: {what} has {num_frames} frame(s), "
            f"valid indices are 0..{num_frames - 1}"
        )
    return frame


def check_dims(height: int, width: int, what: str, limits: ScanLimits = DEFAULT_LIMITS) -> None:
    """Size limits of one frame; called from headers before decoding, and on arrays."""
    if height <= 0 or width <= 0:
        raise ScanEmptyError(f"{what} is empty ({height}×{width} pixels): pass an image with pixels")
    if height > limits.max_side or width > limits.max_side or height * width > limits.max_pixels:
        raise ScanTooLargeError(
            f"{what} is {height}×{width} pixels ({height * width / 1e6:.1f} megapixels): the limit "
            f"is {limits.max_pixels / 1e6:.0f} megapixels and {limits.max_side} px per side "
            "(decompression-bomb guard); downsample or crop it before loading, or raise "
            "ScanLimits.max_pixels / max_side"
        )
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ScanTooSmallError(
            f"{what} is {height}×{width} pixels: each side must be at least {MIN_SIDE} px; "
            "pass the full-resolution scan, not a thumbnail or patch"
        )


def check_decoded_bytes(nbytes: int, detail: str, what: str, limits: ScanLimits = DEFAULT_LIMITS) -> None:
    """Refuse a decoded pixel buffer larger than ``limits.max_decoded_bytes``.

    ``nbytes`` = rows × cols × samples × bytes per sample × frames, from the header (before
    decoding) or an array's shape; ``detail`` spells that product out for the message.
    """
    if nbytes > limits.max_decoded_bytes:
        raise ScanTooLargeError(
            f"{what} decodes to {nbytes:,} bytes ({detail}): the decoded-bytes budget is "
            f"{limits.max_decoded_bytes:,} bytes (decompression-bomb guard); downsample it, choose "
            "fewer frames, or raise ScanLimits.max_decoded_bytes"
        )


def _shape_error(shape: tuple[int, ...]) -> ScanShapeError:
    if len(shape) == 0:
        return ScanShapeError(
            "scan is a 0-d array (a single number, shape ()): expected grey (H, W) or RGB (H, W, 3); "
            "pass the image array, not a scalar"
        )
    names = {1: "(N,)", 2: "(H, W)", 3: f"(H, W, {shape[-1]})", 4: "(B, H, W, C)"}
    sym = names.get(len(shape), f"{len(shape)}-D")
    fix = "pass one 2-D slice as (H, W) or an RGB image as (H, W, 3)"
    if len(shape) == 3 and shape[0] in (1, 3) and shape[2] > 4:
        fix = "it looks channels-first: use np.moveaxis(a, 0, -1)"
    elif len(shape) == 3 and shape[2] == 4:
        fix = "drop the alpha channel with a[..., :3]"
    elif len(shape) == 3 and shape[2] == 2:
        fix = "drop the alpha channel with a[..., 0]"
    elif len(shape) == 3:
        fix = "pass one 2-D slice, e.g. a[:, :, k], as (H, W)"
    elif len(shape) >= 4:
        fix = "pass one scan at a time as (H, W) or (H, W, 3)"
    elif len(shape) == 1:
        fix = "reshape it to (H, W)"
    dims = "dimension" if len(shape) == 1 else "dimensions"
    return ScanShapeError(
        f"scan has {len(shape)} {dims} {sym} = {tuple(shape)}: expected grey (H, W) or RGB (H, W, 3); {fix}"
    )


def validate_array(arr: np.ndarray, meta: dict[str, Any], *, strict_dtype: bool,
                   limits: ScanLimits = DEFAULT_LIMITS) -> Scan:
    """Validate a decoded array and turn it into a Scan (always copies).

    Args:
        arr: the pixels as decoded / given; never modified.
        meta: metadata for the Scan.
        strict_dtype: True for caller arrays (only ``ARRAY_DTYPES``); decoders may also yield
            other integer or float dtypes (int32 TIFF, rescaled DICOM float64, ...).
        limits: pixel-count, side and decoded-bytes limits; for caller arrays (``strict_dtype``)
            the array's ``nbytes`` is held to ``max_decoded_bytes`` before it is copied.
    """
    native = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in ("=", "|") else arr.dtype
    if strict_dtype:
        ok = any(native == np.dtype(d) for d in ARRAY_DTYPES)
    else:
        ok = native.kind in "uif" and native.itemsize <= 8
    if not ok:
        allowed = ", ".join(np.dtype(d).name for d in ARRAY_DTYPES)
        raise ScanDtypeError(
            f"scan has dtype {arr.dtype}: supported are {allowed}; convert it, e.g. a.astype(np.float32)"
        )
    if arr.size == 0:
        raise ScanEmptyError(f"scan is empty (shape {tuple(arr.shape)}): pass an image with pixels")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise _shape_error(tuple(arr.shape))
    check_dims(int(arr.shape[0]), int(arr.shape[1]), "scan", limits)
    if strict_dtype:  # decoders checked their header's size before decoding
        detail = f"shape {tuple(arr.shape)} × {arr.dtype.itemsize} bytes"
        check_decoded_bytes(int(arr.nbytes), detail, "array", limits)

    if native.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan = int(np.isnan(arr).sum())
            raise ScanNonFiniteError(
                f"scan contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values: replace "
                "them (e.g. np.nan_to_num) or fix the source before loading"
            )
    with np.errstate(over="ignore"):
        px = np.array(arr, dtype=np.float32, copy=True, order="C")
    if not np.isfinite(px).all():
        raise ScanNonFiniteError(
            "scan has values beyond the float32 range (|x| > 3.4e38): rescale it before loading"
        )
    lo, hi = float(px.min()), float(px.max())
    if lo == hi:
        raise ScanConstantError(
            f"scan is constant (every pixel is {lo:g}): it has no image content; check that the "
            "right file, frame or window was exported"
        )
    px.flags.writeable = False
    return Scan(pixels=px, meta=meta)
