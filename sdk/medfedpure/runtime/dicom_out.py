"""DICOM out: a :class:`~medfedpure.runtime.defender.Result` as a Structured Report and Secondary Captures.

Written with highdicom (the ``dicom`` extra), imported inside the functions so that the runtime imports
without it. Every object joins the source's study (same StudyInstanceUID, patient and study modules as
highdicom copies them) in a new series with new UIDs, and carries nothing else of the source: highdicom is
given a reduced copy of the source (its UIDs plus the Patient and Study modules), so the source's
equipment, institution, private tags and acquisition attributes never reach the output.

Structured Report (Comprehensive SR, root container "Diagnostic imaging report", LOINC 18748-4):

- the algorithm (TID 4019: name ``medfedpure``, version, parameters ``bundle_id=…``, ``seed=…``,
  ``policy=…``);
- one IMAGE item per source, "Source image for image processing operation" (DCM 121322), so that the
  source SOP instances are the SR's evidence (Current Requested Procedure Evidence Sequence);
- TEXT "Decision status" (``ok`` / ``unverified`` / ``refused`` / …) and, when there is one, "Reason";
- only when the status is ``ok`` and a label exists: CODE "Finding" (DCM 121071) with the class as a code
  of the private scheme ``99MFP`` (code value ``CLASS<i>``, meaning the class name), and one NUM
  "Probability of <class>" per class (code value ``P<i>``, unit UCUM ``1``). A Result that is not ``ok``
  gets no finding and no probabilities: the report says what happened, never a label;
- whatever the gate produced: CODE "Gate flagged" (SCT Yes / No), NUM "Gate score", "Purification
  strength t*" (unit UCUM ``{step}``), "Gate score quantile";
- TEXT "Gate policy", "Bundle id", "Purification seed" (TEXT: a 63-bit seed does not fit a DS number).

NUM items carry the exact float64 in FloatingPointValue next to the DS text, so a reader gets back the
Result's numbers bit for bit.

Secondary Capture (highdicom ``SCImage``, 8-bit MONOCHROME2, orientation from the source):

- ``"purified"``: ``result.purified`` [1, S, S] in [0, 1] → round(255 · clip(x, 0, 1));
- ``"patch_map"``: ``result.patch_error`` [Np] reshaped to the √Np × √Np patch grid (row-major, as the
  gate numbers patches) → round(255 · e / max e).

The scale is recorded as the Modality LUT (RescaleSlope, RescaleIntercept 0, RescaleType ``US``), so
stored value × slope gives back the image's units, and in DerivationDescription.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pydicom

    from medfedpure.runtime.defender import Result

INSTALL_HINT = "pip install 'medfedpure[dicom]'"
SCHEME = "99MFP"
MANUFACTURER = "medfedpure"
SC_IMAGES = ("purified", "patch_map")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Direction of +x, +y, +z of the patient coordinate system as DICOM patient-orientation letters.
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def _highdicom() -> Any:
    """The highdicom module, or an ImportError that names the extra to install."""
    try:
        import highdicom
    except ImportError as e:
        raise ImportError(f"DICOM output needs highdicom: {INSTALL_HINT}") from e
    return highdicom


def _code(value: str, meaning: str) -> Any:
    return _highdicom().sr.CodedConcept(value, SCHEME, meaning)


def _check_source(ds: Any, what: str) -> None:
    import pydicom

    if not isinstance(ds, pydicom.Dataset):
        raise TypeError(f"{what}: expected a pydicom.Dataset (pydicom.dcmread(path)), got {type(ds).__name__}")
    missing = [k for k in _REQUIRED if not str(ds.get(k, "") or "")]
    if missing:
        raise ValueError(f"{what}: the source lacks {', '.join(missing)}; a DICOM report can only reference a "
                         "source instance that has its SOP, study and series UIDs")


def _reference(source: Any) -> Any:
    """A reduced copy of ``source``: its four UIDs, modality and the Patient and Study modules (as highdicom
    defines them for the source's SOP class), nothing else — what highdicom is given in place of the source."""
    hd = _highdicom()
    ref = hd.SOPClass(study_instance_uid=source.StudyInstanceUID, series_instance_uid=source.SeriesInstanceUID,
                      series_number=1, sop_instance_uid=source.SOPInstanceUID, sop_class_uid=source.SOPClassUID,
                      instance_number=1, modality=str(source.get("Modality", "") or "OT"))
    try:
        ref.copy_patient_and_study_information(source)
    except KeyError as e:
        raise ValueError(f"source SOP class {source.SOPClassUID}: not a storage SOP class highdicom knows, so its "
                         "patient and study modules cannot be copied; pass the image instance itself") from e
    return ref


def _software_version(software_version: str | None) -> str:
    if software_version is None:
        from medfedpure import __version__

        return __version__
    if not isinstance(software_version, str) or not software_version.strip():
        raise ValueError(f"software_version={software_version!r}: expected a non-empty string or None")
    return software_version


def _coding_scheme() -> Any:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return CodingSchemeIdentificationItem(designator=SCHEME, name="medfedpure decision codes",
                                          responsible_organization="medfedpure")


def _content(result: Result, sources: Sequence[Any], version: str, frame: int | None = None) -> Any:
    """The root container of the report (see the module docstring for its items)."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    sr = hd.sr
    rel = sr.RelationshipTypeValues.CONTAINS
    items: list[Any] = []
    params = [f"bundle_id={result.bundle_id}", f"seed={result.seed}", f"policy={result.policy}"]
    items.extend(sr.AlgorithmIdentification(name=MANUFACTURER, version=version, parameters=params))
    for s in sources:
        items.append(sr.ImageContentItem(name=codes.DCM.SourceImageForImageProcessingOperation,
                                         referenced_sop_class_uid=s.SOPClassUID,
                                         referenced_sop_instance_uid=s.SOPInstanceUID, relationship_type=rel,
                                         referenced_frame_numbers=None if frame is None else [frame + 1]))
    items.append(sr.TextContentItem(name=_code("MFP-STATUS", "Decision status"), value=str(result.status),
                                    relationship_type=rel))
    if result.reason:
        items.append(sr.TextContentItem(name=_code("MFP-REASON", "Reason"), value=str(result.reason),
                                        relationship_type=rel))
    if result.status == "ok" and result.label is not None:
        classes = list(result.probabilities)
        if result.label not in classes:
            raise ValueError(f"result label {result.label!r} is not among its probabilities' classes {classes}")
        i = classes.index(result.label)
        items.append(sr.CodeContentItem(name=codes.DCM.Finding, value=_code(f"CLASS{i}", result.label),
                                        relationship_type=rel))
        for j, (cls, p) in enumerate(result.probabilities.items()):
            items.append(sr.NumContentItem(name=_code(f"P{j}", f"Probability of {cls}"), value=float(p),
                                           unit=codes.UCUM.NoUnits, relationship_type=rel))
    if result.flagged is not None:
        items.append(sr.CodeContentItem(name=_code("MFP-FLAGGED", "Gate flagged"),
                                        value=codes.SCT.Yes if result.flagged else codes.SCT.No,
                                        relationship_type=rel))
    if result.score is not None:
        items.append(sr.NumContentItem(name=_code("MFP-SCORE", "Gate score"), value=float(result.score),
                                       unit=codes.UCUM.NoUnits, relationship_type=rel))
    if result.t_star is not None:
        items.append(sr.NumContentItem(name=_code("MFP-TSTAR", "Purification strength t*"),
                                       value=int(result.t_star), unit=sr.CodedConcept("{step}", "UCUM", "step"),
                                       relationship_type=rel))
    if result.score_quantile is not None:
        items.append(sr.NumContentItem(name=_code("MFP-QUANTILE", "Gate score quantile"),
                                       value=float(result.score_quantile), unit=codes.UCUM.NoUnits,
                                       relationship_type=rel))
    scope = getattr(result, "scope", None)
    if isinstance(scope, dict) and scope.get("override"):
        items.append(sr.TextContentItem(name=_code("MFP-SCOPE", "Scope override"),
                                        value=f"outside the bundle's scope, run on override: {scope.get('reason')}",
                                        relationship_type=rel))
    if getattr(result, "pixel_sha256", None):
        items.append(sr.TextContentItem(name=_code("MFP-PIXELS", "Pixel data sha256"),
                                        value=str(result.pixel_sha256), relationship_type=rel))
    if result.policy is not None:
        items.append(sr.TextContentItem(name=_code("MFP-POLICY", "Gate policy"), value=str(result.policy),
                                        relationship_type=rel))
    items.append(sr.TextContentItem(name=_code("MFP-BUNDLE", "Bundle id"), value=str(result.bundle_id),
                                    relationship_type=rel))
    items.append(sr.TextContentItem(name=_code("MFP-SEED", "Purification seed"), value=str(int(result.seed)),
                                    relationship_type=rel))
    root = sr.ContainerContentItem(name=sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = sr.ContentSequence(items)
    return root


def structured_report(result: Result, sources: pydicom.Dataset | Sequence[pydicom.Dataset], *,
                      series_number: int = 900, instance_number: int = 1,
                      software_version: str | None = None, frame: int | None = None) -> pydicom.Dataset:
    """The Result as a Comprehensive SR (highdicom) in the sources' study, referencing every source.

    Args:
        result: one scan's Result (any status; only an ``ok`` one gets a finding).
        sources: the DICOM instance(s) the Result was computed from (headers suffice: ``dcmread(path,
            stop_before_pixels=True)``), all of one study. The first one gives the patient and study modules.
        series_number / instance_number: of the new SR (positive).
        software_version: recorded as the algorithm version and SoftwareVersions (default: the package's).
        frame: the 0-based frame of a multi-frame source the Result is for (recorded as the image reference's
            1-based ReferencedFrameNumber); None: the whole (single-frame) instance.

    Returns:
        a ``highdicom.sr.ComprehensiveSR`` (a pydicom Dataset) with new Series and SOP Instance UIDs;
        ``save_as(path)`` writes it.

    Raises:
        ImportError: highdicom is missing (the ``dicom`` extra).
        TypeError / ValueError: a source that is not a Dataset, lacks its UIDs, or belongs to another study;
            bad series/instance numbers.
    """
    hd = _highdicom()
    import pydicom

    srcs = [sources] if isinstance(sources, pydicom.Dataset) else list(sources)
    if not srcs:
        raise ValueError("sources: empty; give the DICOM instance(s) the Result was computed from")
    for i, s in enumerate(srcs):
        _check_source(s, f"sources[{i}]")
    uids = getattr(result, "dicom_uids", None) or {}
    if uids.get("sop") and uids["sop"] not in {str(s.SOPInstanceUID) for s in srcs}:
        raise ValueError(f"the Result was computed from SOP instance {uids['sop']}, which is not among the "
                         "sources: pass the instance the scan was read from")
    studies = {str(s.StudyInstanceUID) for s in srcs}
    if len(studies) > 1:
        raise ValueError(f"sources span {len(studies)} studies; one report covers one study: write one per study")
    for name, v in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: expected a positive int")
    version = _software_version(software_version)
    if frame is not None:
        n_frames = int(srcs[0].get("NumberOfFrames", 1) or 1)
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < n_frames or len(srcs) != 1:
            raise ValueError(f"frame={frame!r}: expected one source and a frame index in [0, {n_frames})")
    refs = [_reference(s) for s in srcs]
    return hd.sr.ComprehensiveSR(
        evidence=refs, content=_content(result, srcs, version, frame), series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=instance_number,
        manufacturer=MANUFACTURER, is_complete=result.status == "ok", is_final=False, is_verified=False,
        series_description="medfedpure decision", software_versions=version, coding_schemes=[_coding_scheme()])


def _orientation(source: Any) -> tuple[str, str]:
    """Patient orientation (row, column direction letters) from ImageOrientationPatient (the dominant axis of
    each direction cosine), else the source's PatientOrientation; the derived image keeps the source's axes."""
    iop = source.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        v = np.asarray([float(a) for a in iop], dtype=np.float64).reshape(2, 3)
        letters = []
        for d in v:
            ax = int(np.argmax(np.abs(d)))
            letters.append(_AXIS_LETTERS[ax][int(d[ax] > 0)])
        return letters[0], letters[1]
    po = source.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(str(p) for p in po):
        return str(po[0]), str(po[1])
    raise ValueError("source has neither ImageOrientationPatient nor PatientOrientation: the orientation of a "
                     "secondary capture cannot be derived; pass the image instance itself")


def _sc_pixels(result: Result, image: str) -> tuple[np.ndarray, float, str]:
    """(uint8 [rows, cols] pixels, rescale slope, derivation text) of one of :data:`SC_IMAGES`."""
    if image == "purified":
        if result.purified is None:
            raise ValueError("result.purified is None: run the scan with run(..., return_purified=True) to get "
                             "the purified image")
        x = np.asarray(result.purified, dtype=np.float64)
        x = x.reshape(x.shape[-2:]) if x.ndim == 3 and x.shape[0] == 1 else x
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ValueError(f"result.purified: expected a finite [1, S, S] image, got shape {x.shape}")
        px = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        return px, 1.0 / 255.0, "medfedpure purified image, clipped to [0, 1], value = pixel * 1/255"
    if image == "patch_map":
        if result.patch_error is None:
            raise ValueError("result.patch_error is None: run the scan with run(..., return_patch_error=True) "
                             "to get the gate's patch map")
        e = np.asarray(result.patch_error, dtype=np.float64).ravel()
        g = int(np.sqrt(e.size))
        if e.size == 0 or g * g != e.size or not np.isfinite(e).all():
            raise ValueError(f"result.patch_error: expected finite errors of a square patch grid, got {e.size}")
        top = float(e.max())
        scale = top / 255.0 if top > 0 else 1.0
        px = np.rint(np.clip(e, 0.0, None) / scale).clip(0, 255).astype(np.uint8).reshape(g, g)
        return px, scale, f"medfedpure gate patch map {g}x{g}, per-patch error = pixel * {scale!r}"
    raise ValueError(f"image={image!r}: expected one of {', '.join(map(repr, SC_IMAGES))}")


def secondary_capture(result: Result, source: pydicom.Dataset, image: str = "purified", *,
                      series_number: int = 901) -> pydicom.Dataset:
    """A Secondary Capture (highdicom ``SCImage``) of the purified image or the gate's patch map.

    Args:
        result: a Result run with ``return_purified=True`` (``"purified"``) or ``return_patch_error=True``
            (``"patch_map"``).
        source: the DICOM instance the Result was computed from (its study, patient and orientation).
        image: ``"purified"`` (uint8 [S, S]) or ``"patch_map"`` (uint8 [√Np, √Np]); the scale is in
            RescaleSlope and DerivationDescription (module docstring).
        series_number: of the new series (positive).

    Raises:
        ImportError: highdicom is missing. ValueError: the Result lacks the array (the message names the
            ``run()`` option that produces it), an unknown ``image``, a source without UIDs or orientation.
    """
    hd = _highdicom()
    from pydicom.dataset import Dataset
    from pydicom.valuerep import DS

    _check_source(source, "source")
    if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 1:
        raise ValueError(f"series_number={series_number!r}: expected a positive int")
    px, slope, derivation = _sc_pixels(result, image)
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_reference(source), pixel_array=px, photometric_interpretation="MONOCHROME2",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, patient_orientation=orientation,
        series_description=f"medfedpure {image.replace('_', ' ')}", software_versions=_software_version(None))
    sc.RescaleIntercept = "0"
    sc.RescaleSlope = DS(float(slope), auto_format=True)
    sc.RescaleType = "US"
    sc.DerivationDescription = derivation
    src_item = Dataset()
    src_item.ReferencedSOPClassUID = source.SOPClassUID
    src_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [src_item]
    return sc
