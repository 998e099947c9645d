"""DICOM reader (pydicom, imported lazily): files, bytes and ``pydicom.Dataset`` objects.

A file is DICOM when its name ends in ``DICOM_EXTENSIONS`` or it has ``DICM`` at byte 128; files
without the preamble are parsed when their header looks like an image. Rows / Columns / frames and
the decoded bytes (rows × cols × samples × bytes per sample × frames, held to
:class:`~medfedpure.scan.limits.ScanLimits`) are checked before the pixel data is read, truncated
elements are refused, and compressed transfer syntaxes need an installed decoder plugin. Pixels get
the modality rescale (slope / intercept or Modality LUT) first, then MONOCHROME1 is inverted once;
metadata keeps the pixel spacing, modality, transfer syntax, the attributes a bundle's scope is checked
against (BodyPartExamined, ImageType, ImageOrientationPatient: :func:`scope_attributes`), never patient
identifiers; the Study / Series / SOP Instance UIDs go on ``Scan.dicom_uids`` (:func:`instance_uids`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from medfedpure.scan.errors import (
    ScanCompressionError,
    ScanError,
    ScanNoPixelDataError,
    ScanNotImageError,
    ScanTruncatedError,
)
from medfedpure.scan.limits import DEFAULT_LIMITS, ScanLimits
from medfedpure.scan.types import Scan, scan_meta
from medfedpure.scan.validate import check_decoded_bytes, check_dims, select_frame, validate_array

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

__all__ = ["DICOM_EXTENSIONS", "from_dataset", "is_dicom_magic", "instance_uids", "read_dicom",
           "scope_attributes"]

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def is_dicom_magic(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_dicom(src: Any, origin: str, total_size: int | None, *, path: bool) -> Dataset:
    """Parse a DICOM header from ``src`` (a seekable binary file object; ``path``: an open file, whose
    large values are read lazily from that same object, which must stay open until decoding)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    # Large values (the pixel data) are read only when accessed, i.e. after the header checks.
    defer = "1 MB" if path else None
    try:
        try:
            ds = pydicom.dcmread(src, defer_size=defer)
        except InvalidDicomError:
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


def _clean_str(v: Any) -> str | None:
    """A DICOM code string as an upper-case, stripped str; None when absent or empty."""
    if v is None:
        return None
    text = str(v).strip().upper()
    return text or None


def _orientation(ds: Dataset, frame: int) -> tuple[float, ...] | None:
    """ImageOrientationPatient (row and column direction cosines, 6 floats) from the top level, else the
    enhanced multi-frame functional groups (per-frame first, then shared); None when absent or malformed."""
    def _six(v: Any) -> tuple[float, ...] | None:
        try:
            vals = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            return None
        return vals if len(vals) == 6 and all(np.isfinite(vals)) else None

    if ds.get("ImageOrientationPatient") is not None:
        return _six(ds.ImageOrientationPatient)
    for seq_name, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq is None or len(seq) <= i:
            continue
        po = seq[i].get("PlaneOrientationSequence")
        if po and po[0].get("ImageOrientationPatient") is not None:
            return _six(po[0].ImageOrientationPatient)
    return None


def scope_attributes(ds: Dataset, frame: int = 0) -> dict[str, Any]:
    """The attributes a bundle's scope is checked against (``Scan.meta``).

    Returns ``body_part`` (BodyPartExamined, upper case), ``image_type`` (ImageType values, upper case,
    as a tuple) and ``orientation`` (ImageOrientationPatient, 6 floats); each is None when the file does
    not carry it (the scope check then records it as "unknown").
    """
    image_type = ds.get("ImageType")
    if image_type is None:
        types = None
    else:
        values = [image_type] if isinstance(image_type, (str, bytes)) else list(image_type)
        types = tuple(t for t in (_clean_str(v) for v in values) if t is not None) or None
    return {
        "body_part": _clean_str(ds.get("BodyPartExamined")),
        "image_type": types,
        "orientation": _orientation(ds, frame),
    }


def instance_uids(ds: Dataset) -> dict[str, str | None] | None:
    """``{"study", "series", "sop"}``: the Study / Series / SOP Instance UIDs (None where absent), or None
    when the dataset has none. They identify the instance and link it to the archive, so they travel on
    ``Scan.dicom_uids`` (for the audit record), never in ``Scan.meta``, which callers may log freely."""
    uids = {key: (str(ds.get(tag)).strip() if ds.get(tag) else None)
            for key, tag in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
                             ("sop", "SOPInstanceUID"))}
    return uids if any(uids.values()) else None


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


def _bytes_per_sample(ds: Dataset) -> int:
    """Bytes per decoded sample: 4 / 8 for float pixel data, else ceil(BitsAllocated / 8) (1-bit data is
    unpacked to one byte per pixel)."""
    if "DoubleFloatPixelData" in ds:
        return 8
    if "FloatPixelData" in ds:
        return 4
    return max(1, -(-int(ds.get("BitsAllocated") or 16) // 8))


def from_dataset(ds: Dataset, kind: str, frame: int | None, origin: str, *, from_file: bool,
                 limits: ScanLimits = DEFAULT_LIMITS) -> Scan:
    """Decode one frame of a pydicom Dataset (see :func:`_from_dataset`).

    pydicom converts each element's raw bytes when it is first read, so on untrusted input any
    attribute access can raise (an unknown VR, a bad number, a malformed sequence): everything but
    a ``ScanError`` (or ``MemoryError``) becomes a ``ScanNotImageError`` naming the cause.
    """
    try:
        return _from_dataset(ds, kind, frame, origin, from_file=from_file, limits=limits)
    except (ScanError, MemoryError):
        raise
    except Exception as exc:
        cause = (str(exc).splitlines() or [""])[0]
        raise ScanNotImageError(
            f"{origin} has a corrupt DICOM header ({type(exc).__name__}: {cause}): fix or re-export the file"
        ) from exc


def _from_dataset(ds: Dataset, kind: str, frame: int | None, origin: str, *, from_file: bool,
                  limits: ScanLimits = DEFAULT_LIMITS) -> Scan:
    """Decode one frame of a pydicom Dataset; size limits and the decoded bytes of every frame (the
    pixel data element is read whole) are checked from the header before decoding."""
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
        itemsize = _bytes_per_sample(ds)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ScanNotImageError(
            f"{origin} has pixel data but no valid Rows / Columns / NumberOfFrames / SamplesPerPixel / "
            f"BitsAllocated ({exc}): "
            "the header is corrupt"
        ) from exc
    check_dims(rows, cols, origin, limits)
    if num_frames < 1 or spp < 1:
        raise ScanNotImageError(
            f"{origin} declares {num_frames} frame(s) of {spp} sample(s) per pixel: the header is corrupt"
        )
    detail = f"{rows}×{cols} pixels × {spp} samples × {itemsize} bytes × {num_frames} frames"
    check_decoded_bytes(rows * cols * spp * itemsize * num_frames, detail, origin, limits)
    idx = select_frame(num_frames, frame, origin)

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
    meta = scan_meta(
        kind,
        original_shape=((num_frames, *shape) if num_frames > 1 else shape),
        original_dtype=original_dtype,
        pixel_spacing=spacing,
        photometric=photometric,
        frame=idx,
        num_frames=num_frames,
        modality=(str(ds.Modality) if ds.get("Modality") else None),
        transfer_syntax=str(tsuid.name),
        **scope_attributes(ds, frame_i),
    )
    scan = validate_array(px, meta, strict_dtype=False, limits=limits)
    return replace(scan, dicom_uids=instance_uids(ds))
