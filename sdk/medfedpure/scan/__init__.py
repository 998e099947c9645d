"""Scan input: load, validate and preprocess any scan the SDK accepts.

This is the only module that touches file formats. Everything downstream (the training data
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
problem and the fix. Size limits are checked from the header *before* any pixel decoding, so a
small file that declares a huge image (a decompression bomb) is refused without decoding it.
The caller's array, image or dataset is never modified; ``Scan.pixels`` never shares memory
with it.
"""

from __future__ import annotations

import io
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

__all__ = [
    "MAX_PIXELS",
    "MAX_SIDE",
    "MIN_SIDE",
    "Scan",
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
    "ScanShapeError",
    "ScanTooLargeError",
    "ScanTooSmallError",
    "ScanTruncatedError",
    "ScanTypeError",
    "load_scan",
    "preprocess",
]

MIN_SIDE = 32  # px; smaller scans carry too little anatomy to classify
MAX_SIDE = 16384  # px per side (decompression-bomb guard)
MAX_PIXELS = 64_000_000  # 64 megapixels (decompression-bomb guard)
MAX_PREPROCESS_SIZE = MAX_SIDE

ARRAY_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 R, G, B weights
PERCENTILES = (0.5, 99.5)

_UNDEFINED_LENGTH = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class ScanError(ValueError):
    """Base class: the input cannot be used as a scan. The message names the problem and the fix."""


class ScanTypeError(ScanError, TypeError):
    """The source is not a type ``load_scan`` accepts."""


class ScanNotFoundError(ScanError, FileNotFoundError):
    """The path does not exist."""


class ScanNotImageError(ScanError):
    """The file or bytes are not a readable image in a supported format."""


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
    """More than ``MAX_PIXELS`` pixels or a side longer than ``MAX_SIDE`` (decompression bombs)."""


class ScanNonFiniteError(ScanError):
    """NaN or infinite pixel values (or values beyond the float32 range)."""


class ScanConstantError(ScanError):
    """The scan has no contrast: every pixel (or 99 % of them) has the same value."""


# --------------------------------------------------------------------------------------------
# The Scan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Scan:
    """A validated scan at native resolution.

    Attributes:
        pixels: float32 array, ``(H, W)`` grey or ``(H, W, 3)`` RGB, finite, read-only, never a
            view of the caller's data. DICOM: modality rescale applied, MONOCHROME1 inverted.
            Values keep their native units (no normalisation; see :func:`preprocess`).
        meta: ``source_kind`` ("array", "pil", "dicom", "path:png", "path:dicom", "bytes:jpeg",
            ...), ``original_shape`` (tuple; includes the frame axis of multi-frame sources),
            ``original_dtype`` (str), ``pixel_spacing`` (``(row, col)`` mm floats or None),
            ``photometric`` (DICOM Photometric Interpretation or the PIL mode, else None),
            ``frame`` (int or None), ``num_frames`` (int), ``modality`` (DICOM, else None).
            Never patient identifiers.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

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

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_rgb(self) -> bool:
        return self.pixels.ndim == 3


def _meta(source_kind: str, **kw: Any) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# Checks shared by every source
# --------------------------------------------------------------------------------------------
def _check_frame_arg(frame: Any) -> int | None:
    if frame is None:
        return None
    if isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or int(frame) < 0:
        raise ScanFrameIndexError(
            f"frame={frame!r} is not a valid frame index: pass a non-negative int (0 = first frame)"
        )
    return int(frame)


def _select_frame(num_frames: int, frame: int | None, what: str) -> int | None:
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


def _check_dims(height: int, width: int, what: str) -> None:
    """Size limits; called from headers before decoding, and on arrays."""
    if height <= 0 or width <= 0:
        raise ScanEmptyError(f"{what} is empty ({height}×{width} pixels): pass an image with pixels")
    if height > MAX_SIDE or width > MAX_SIDE or height * width > MAX_PIXELS:
        raise ScanTooLargeError(
            f"{what} is {height}×{width} pixels ({height * width / 1e6:.1f} megapixels): the limit "
            f"is {MAX_PIXELS / 1e6:.0f} megapixels and {MAX_SIDE} px per side (decompression-bomb "
            "guard); downsample or crop it before loading"
        )
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ScanTooSmallError(
            f"{what} is {height}×{width} pixels: each side must be at least {MIN_SIDE} px; "
            "pass the full-resolution scan, not a thumbnail or patch"
        )


def _shape_error(shape: tuple[int, ...]) -> ScanShapeError:
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


def _validate(arr: np.ndarray, meta: dict[str, Any], *, strict_dtype: bool) -> Scan:
    """Validate a decoded array and turn it into a Scan (always copies).

    Args:
        arr: the pixels as decoded / given; never modified.
        meta: metadata for the Scan.
        strict_dtype: True for caller arrays (only ``ARRAY_DTYPES``); decoders may also yield
            other integer or float dtypes (int32 TIFF, rescaled DICOM float64, ...).
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
    _check_dims(int(arr.shape[0]), int(arr.shape[1]), "scan")

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


# --------------------------------------------------------------------------------------------
# Pillow: PNG, JPEG, TIFF, BMP (and caller PIL images)
# --------------------------------------------------------------------------------------------
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


def _from_pil(img: Image.Image, kind: str, frame: int | None, *, restore: bool) -> Scan:
    """Decode a lazily opened PIL image; sizes are checked before ``load()``.

    ``restore``: the image is the caller's; put its frame position back afterwards.
    """
    width, height = img.size
    _check_dims(int(height), int(width), "image")
    num_frames = int(getattr(img, "n_frames", 1) or 1)
    idx = _select_frame(num_frames, frame, "image")
    pos = img.tell() if restore else 0
    try:
        if idx is not None and idx != img.tell():
            img.seek(idx)
            width, height = img.size  # pages of a TIFF may differ in size
            _check_dims(int(height), int(width), f"frame {idx} of the image")
        try:
            img.load()
            raw = _pil_to_array(img)
        except Image.DecompressionBombError as exc:
            raise ScanTooLargeError(f"image is too large to decode safely: {exc}") from exc
        except ScanError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
                raise ScanTruncatedError(
                    f"image data ends early ({exc}): the file is truncated; re-export or re-copy it"
                ) from exc
            raise ScanNotImageError(f"image data cannot be decoded ({exc}): the file is corrupt") from exc
        mode, bands = img.mode, len(img.getbands())
    finally:
        if restore and img.tell() != pos:
            img.seek(pos)
    meta = _meta(
        kind,
        original_shape=(int(height), int(width)) if bands == 1 else (int(height), int(width), bands),
        original_dtype=raw.dtype.name,
        photometric=mode,
        frame=idx,
        num_frames=num_frames,
    )
    return _validate(raw, meta, strict_dtype=False)


def _open_pil(fp: Any, origin: str, prefix: str, frame: int | None) -> Scan:
    """Open a file or buffer with Pillow (PNG / JPEG / TIFF / BMP only) and decode it."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 89 and 179 megapixels; our own limit (64) is stricter and
            # refuses those images anyway. (catch_warnings is process-global state: harmless here.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ScanTooLargeError(
            f"image header declares more than {MAX_PIXELS / 1e6:.0f} megapixels ({exc}); refused "
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
        return _from_pil(img, f"{prefix}:{fmt}", frame, restore=False)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------
def _is_dicom_magic(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _read_dicom(src: Any, origin: str, total_size: int | None, *, path: bool) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # Large values (the pixel data) are read only when accessed, i.e. after the header checks.
    defer = "1 MB" if path else None
    try:
        try:
            ds = pydicom.dcmread(src, defer_size=defer)
        except InvalidDicomError:
            if not path:
                src.seek(0)
            # A DICOM file without the 128-byte preamble (legal in old files): parse it anyway and
            # require an image-like header below.
            ds = pydicom.dcmread(src, defer_size=defer, force=True)
            if "SOPClassUID" not in ds and "Rows" not in ds:
                raise ScanNotImageError(
                    f"{origin} is not a DICOM file (no 'DICM' marker and no DICOM header): check the file"
                ) from None
    except ScanError:
        raise
    except Exception as exc:  # any parser failure on untrusted input
        raise ScanNotImageError(f"{origin} cannot be parsed as DICOM ({type(exc).__name__}: {exc})") from exc
    _check_dicom_truncation(ds, total_size, origin)
    return ds


def _check_dicom_truncation(ds: Dataset, total_size: int | None, origin: str) -> None:
    """Refuse a dataset whose top-level elements claim more bytes than were read."""
    from pydicom.dataelem import RawDataElement

    for tag in ds.keys():
        # keep_deferred: look at the header of a deferred (large) value without reading it
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
            continue
        if elem.value is None:  # deferred: compare with the file size
            present = elem.length if total_size is None else max(0, total_size - elem.value_tell)
        else:
            present = len(elem.value)
        if present < elem.length:
            raise ScanTruncatedError(
                f"{origin} is truncated: element {elem.tag} declares {elem.length} bytes but the "
                f"file ends after {present} of them; re-export or re-copy the file"
            )


def _rescale_params(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) from the top level, or the enhanced multi-frame functional groups."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = ds.get("RescaleSlope")
        icpt = ds.get("RescaleIntercept")
        return (1.0 if slope is None else float(slope), 0.0 if icpt is None else float(icpt))
    for seq_name, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq is None or len(seq) <= i:
            continue
        pvt = seq[i].get("PixelValueTransformationSequence")
        if pvt:
            item = pvt[0]
            slope = item.get("RescaleSlope")
            icpt = item.get("RescaleIntercept")
            return (1.0 if slope is None else float(slope), 0.0 if icpt is None else float(icpt))
    return None


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality_and_invert(raw: np.ndarray, ds: Dataset, frame: int, photometric: str) -> np.ndarray:
    """Modality LUT / rescale (first), then MONOCHROME1 inversion (exactly once). Returns float64."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        out = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        out_range = None  # a LUT is not affine: invert about the data's own range
    else:
        params = _rescale_params(ds, frame)
        slope, icpt = params if params is not None else (1.0, 0.0)
        out = raw.astype(np.float64) * slope + icpt
        s_lo, s_hi = _stored_range(ds)
        out_range = sorted((s_lo * slope + icpt, s_hi * slope + icpt))
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the minimum is displayed white. x -> lo + hi - x maps the representable
        # range onto itself reversed, so the result reads as MONOCHROME2.
        lo, hi = out_range if out_range is not None else (float(out.min()), float(out.max()))
        out = (lo + hi) - out
    return out


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    def _pair(v: Any) -> tuple[float, float] | None:
        try:
            vals = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            return None
        return vals if len(vals) == 2 and all(np.isfinite(vals)) else None

    if ds.get("PixelSpacing") is not None:
        return _pair(ds.PixelSpacing)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        pm = shared[0].get("PixelMeasuresSequence")
        if pm and pm[0].get("PixelSpacing") is not None:
            return _pair(pm[0].PixelSpacing)
    return None


def _transfer_syntax(ds: Dataset) -> Any:
    """The dataset's Transfer Syntax UID; for files without file meta (no preamble), the
    uncompressed syntax pydicom detected while parsing; None if unknown."""
    from pydicom import uid

    file_meta = getattr(ds, "file_meta", None)
    tsuid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsuid is not None:
        return tsuid
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    if implicit:
        return uid.ImplicitVRLittleEndian if little else None
    return uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian


_IMAGE_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _from_dataset(ds: Dataset, kind: str, frame: int | None, origin: str, *, from_file: bool) -> Scan:
    """Decode one frame of a pydicom Dataset; header limits are checked before decoding."""
    from pydicom.pixels import apply_color_lut, get_decoder

    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
    if not any(t in ds for t in _IMAGE_PIXEL_TAGS):
        if from_file and ("Rows" in ds or "Image Storage" in str(sop_name)):
            raise ScanTruncatedError(
                f"{origin} declares an image ({sop_name}) but ends before its pixel data: the file "
                "is truncated; re-export or re-copy it"
            )
        raise ScanNoPixelDataError(
            f"{origin} has no pixel data ({sop_name}): it is not an image; pass an image object "
            "(e.g. MR Image Storage)"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        num_frames = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ScanNotImageError(
            f"{origin} has pixel data but no valid Rows / Columns / NumberOfFrames ({exc}): "
            "the header is corrupt"
        ) from exc
    _check_dims(rows, cols, origin)
    idx = _select_frame(num_frames, frame, origin)

    tsuid = _transfer_syntax(ds)
    if tsuid is None:
        raise ScanNotImageError(
            f"{origin} has no Transfer Syntax UID: set ds.file_meta.TransferSyntaxUID "
            "(e.g. pydicom.uid.ExplicitVRLittleEndian) so the pixel data can be read"
        )
    ts_desc = f"{tsuid.name} ({tsuid})"
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError as exc:
        raise ScanCompressionError(
            f"{origin} uses transfer syntax {ts_desc}, which has no pixel data decoder: "
            "convert the file to an uncompressed syntax (e.g. dcmdjpeg / gdcmconv --raw)"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise ScanCompressionError(
            f"{origin} is compressed with {ts_desc} and no installed decoder supports it: install "
            f"one of: {missing}; or convert the file to an uncompressed syntax"
        )
    try:
        raw, dmeta = decoder.as_array(ds, index=0 if idx is None else idx)
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise ScanTruncatedError(
                f"{origin} is truncated: {exc.args[0].split(' - ')[0]}; re-export or re-copy the file"
            ) from exc
        raise ScanNotImageError(f"{origin} pixel data cannot be decoded: {exc}") from exc
    except Exception as exc:  # plugin failures on untrusted input
        if tsuid.is_compressed:
            raise ScanCompressionError(
                f"{origin} is compressed with {ts_desc} and the installed decoders failed on it "
                f"({str(exc).splitlines()[0]}): install another decoder ("
                f"{'; '.join(decoder.missing_dependencies) or 'gdcm or pylibjpeg'}) or convert the file"
            ) from exc
        raise ScanNotImageError(f"{origin} pixel data cannot be decoded: {exc}") from exc

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip()
    original_dtype = raw.dtype.name
    frame_i = 0 if idx is None else idx
    try:
        if spp == 1 and photometric == "PALETTE COLOR":
            px = np.asarray(apply_color_lut(raw, ds))
        elif spp == 1:
            px = _modality_and_invert(raw, ds, frame_i, photometric)
        else:
            out_pi = str(dmeta.get("photometric_interpretation", photometric))
            if out_pi.startswith("YBR"):
                from pydicom.pixels import convert_color_space

                raw = convert_color_space(raw, out_pi, "RGB")
            px = raw
        spacing = _pixel_spacing(ds)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise ScanNotImageError(
            f"{origin} has invalid pixel-value attributes (rescale, LUT or palette: {exc}): "
            "the header is corrupt; fix or re-export the file"
        ) from exc
    shape = (rows, cols) if spp == 1 else (rows, cols, spp)
    meta = _meta(
        kind,
        original_shape=((num_frames, *shape) if num_frames > 1 else shape),
        original_dtype=original_dtype,
        pixel_spacing=spacing,
        photometric=photometric,
        frame=idx,
        num_frames=num_frames,
        modality=(str(ds.Modality) if ds.get("Modality") else None),
        transfer_syntax=str(tsuid.name),
    )
    return _validate(px, meta, strict_dtype=False)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
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
    if _is_dicom_magic(head) or p.lower().endswith(DICOM_EXTENSIONS):
        ds = _read_dicom(p, origin, size, path=True)
        return _from_dataset(ds, "path:dicom", frame, origin, from_file=True)
    return _open_pil(p, origin, "path", frame)


def _from_bytes(data: bytes | bytearray | memoryview, frame: int | None) -> Scan:
    buf = bytes(data)
    if len(buf) == 0:
        raise ScanEmptyError("scan bytes are empty: pass the contents of an image file")
    origin = "scan bytes"
    if _is_dicom_magic(buf):
        ds = _read_dicom(io.BytesIO(buf), origin, len(buf), path=False)
        return _from_dataset(ds, "bytes:dicom", frame, origin, from_file=True)
    return _open_pil(io.BytesIO(buf), origin, "bytes", frame)


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
    frame = _check_frame_arg(frame)
    if isinstance(source, Scan):
        _select_frame(1, frame, "scan")
        return source
    if isinstance(source, np.ndarray):
        _select_frame(1, frame, "array")
        meta = _meta(
            "array", original_shape=tuple(int(s) for s in source.shape), original_dtype=source.dtype.name
        )
        return _validate(source, meta, strict_dtype=True)
    if isinstance(source, Image.Image):
        return _from_pil(source, "pil", frame, restore=True)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source, frame)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(source, frame)
    if _is_pydicom_dataset(source):
        return _from_dataset(source, "dicom", frame, "DICOM dataset", from_file=False)
    hint = ""
    if hasattr(source, "numpy") and hasattr(source, "detach"):
        hint = " (for a torch tensor use t.detach().cpu().numpy())"
    raise ScanTypeError(
        f"cannot load a scan from {type(source).__name__}: pass a numpy array, PIL image, file "
        f"path, file bytes or pydicom Dataset{hint}"
    )


# --------------------------------------------------------------------------------------------
# Model input
# --------------------------------------------------------------------------------------------
def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValueError(f"size must be an int >= {MIN_SIDE}, got {size!r}")
    size = int(size)
    if not MIN_SIDE <= size <= MAX_PREPROCESS_SIZE:
        raise ValueError(f"size must be an int in [{MIN_SIDE}, {MAX_PREPROCESS_SIZE}], got {size}")
    return size


def _grey(px: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) float32 -> (H, W) float32 (BT.601 luma; float64 accumulation so that
    extreme but finite values cannot overflow)."""
    if px.ndim == 2:
        return px
    r, g, b = LUMA_601
    grey = px[:, :, 0] * r + px[:, :, 1].astype(np.float64) * g + px[:, :, 2].astype(np.float64) * b
    return grey.astype(np.float32)


def robust_percentiles(a: np.ndarray, q: tuple[float, ...] = PERCENTILES) -> tuple[float, ...]:
    """``np.percentile(a, q)`` (method "linear") for a finite float array, bit for bit, about 2× faster.

    numpy's percentile selects with ``np.partition``, which is slow on scans (many equal
    background values); a full ``np.sort`` is faster there. The order statistics and the
    interpolation (numpy's ``_lerp``, including its ``t ≥ 0.5`` branch) are numpy's, so the result is
    identical (tested against ``np.percentile`` on random and scan-like arrays).
    """
    s = np.sort(a, axis=None)
    n = s.size
    virtual = (n - 1) * (np.asarray(q, dtype=np.float64) / 100)
    prev = np.floor(virtual)
    gamma = virtual - prev
    i = prev.astype(np.intp)
    j = np.minimum(i + 1, n - 1)
    i = np.where(virtual >= n - 1, n - 1, i)
    lo, hi = s[i], s[j]
    diff = hi - lo
    out = np.add(lo, diff * gamma)
    np.subtract(hi, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return tuple(float(v) for v in out)


def _normalise(grey: np.ndarray) -> np.ndarray:
    """(grey - p0.5) / (p99.5 - p0.5) clipped to [0, 1]; float32 (H, W)."""
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = robust_percentiles(grey)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # float32 interpolation overflowed near ±3.4e38
        lo, hi = robust_percentiles(grey.astype(np.float64))
    if not hi > lo:
        raise ScanConstantError(
            f"scan is nearly constant: its {PERCENTILES[0]} and {PERCENTILES[1]} percentiles are both "
            f"{lo:g}, so it has no robust contrast; check the file, frame or window"
        )
    span = hi - lo
    with np.errstate(over="ignore"):
        inv32 = np.float32(1.0 / span)
    if np.isfinite(inv32) and inv32 > 0:
        with np.errstate(over="ignore"):  # overflow to ±inf is clipped to 0 / 1 below
            norm = (grey - np.float32(lo)) * inv32
    else:  # a range too small for float32 arithmetic
        norm = (grey.astype(np.float64) - lo) / span
    return np.clip(norm, 0.0, 1.0).astype(np.float32, copy=False)


def preprocess(scan_or_array: Any, size: int) -> np.ndarray:
    """Make the model input from a scan.

    Steps: (1) grey = ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` for RGB scans;
    (2) ``(grey - p0.5) / (p99.5 - p0.5)`` clipped to [0, 1] (robust to outliers);
    (3) resize (Pillow bilinear, antialiased when shrinking, float ``F`` mode) so the longer side
    becomes ``size`` and the aspect ratio is kept; (4) paste centred on a ``size × size`` canvas
    of zeros.

    Args:
        scan_or_array: a :class:`Scan`, or anything :func:`load_scan` accepts (validated by it).
        size: output side, an int in [32, 16384].

    Returns:
        float32 array ``(1, size, size)`` in [0, 1], C-contiguous, a new array.

    Raises:
        ValueError: bad ``size``. ScanError: bad scan; ScanConstantError if the 0.5 and 99.5
        percentiles coincide (no robust contrast).
    """
    size = _check_size(size)
    scan = scan_or_array if isinstance(scan_or_array, Scan) else load_scan(scan_or_array)
    norm = _normalise(_grey(scan.pixels))
    h, w = norm.shape
    scale = size / max(h, w)
    new_h = min(size, max(1, round(h * scale)))
    new_w = min(size, max(1, round(w * scale)))
    img = Image.fromarray(np.ascontiguousarray(norm))  # float32 (H, W) -> mode "F"
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.zeros((1, size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[0, top : top + new_h, left : left + new_w] = np.clip(resized, 0.0, 1.0)
    return out
