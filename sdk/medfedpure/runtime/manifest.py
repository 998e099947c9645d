"""The bundle manifest's sections as typed, frozen, validated values, parsed once on load.

``manifest.json`` (``FORMAT_VERSION`` 2) holds, besides the artefact list that
:mod:`medfedpure.runtime.bundle` checks::

    format_version   2
    classes          ["no_tumor", "tumor"]                 the classifier's outputs, in order
    image_size       S                                     side of the square model input
    preprocessing    Preprocessing                         how a scan becomes x [1, S, S]
    mae              MaeSpec                               the detector's patch, K and mask sets
    gate             medfedpure.gate.GateSpec              the site's calibrated gate
    purifier         PurifierSpec                          schedule, ᾱ table, K, sampler
    scope            Scope (optional)                      which scans the bundle is meant for
    provenance       {...}                                 free-form record (read-only here)

:meth:`BundleSpec.from_manifest` turns the JSON into these values and refuses anything the
runtime does not implement (another preprocessing, sampler or gate statistic) rather than
running it wrongly; every error is a :class:`BundleError` naming the field, e.g.
``manifest gate.tau: expected a finite number, got 'x'``. ``to_dict`` gives each section back in
the manifest's JSON form, so the exporter writes exactly what the runtime reads.

The MAE's scoring mask sets (``visible`` [K, Np] bool) are stored compactly: the row-major bits
packed with ``numpy.packbits`` (big-endian bit order, zero padding) and base64-encoded, with the
shape beside them.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from medfedpure.runtime.sampler import SAMPLERS

if TYPE_CHECKING:
    from medfedpure.gate import GateSpec

__all__ = [
    "FORMAT_VERSION",
    "BundleError",
    "Preprocessing",
    "MaeSpec",
    "PurifierSpec",
    "Scope",
    "DEFAULT_SCOPE",
    "ORIENTATIONS",
    "BundleSpec",
    "freeze",
    "thaw",
]

FORMAT_VERSION = 2
MAX_IMAGE_SIZE = 4096  # side of the model input; larger is refused as out of range
SCHEDULES = ("cosine", "linear")
MASK_ENCODING = "packbits-base64"

# What ``medfedpure.scan.preprocess`` implements; a manifest asking for anything else is refused.
PREPROCESS_FUNCTION = "medfedpure.scan.preprocess"
PREPROCESS_GREY = "ITU-R 601 luma"
PREPROCESS_RESIZE = "aspect-preserving bilinear, zero-padded square"
PREPROCESS_RANGE = (0.0, 1.0)


class BundleError(ValueError):
    """A bundle is malformed, tampered with, or does not hold what was asked for."""


# ---------------------------------------------------------------------------------------------
# field readers: each names ``section.key`` in its error
def _need(d: Mapping[str, Any], section: str, key: str) -> Any:
    """``d[key]``; ``section`` is the dotted path of ``d`` in the manifest ("" at the top)."""
    if not isinstance(d, Mapping):
        raise BundleError(f"manifest {section or 'root'}: expected an object, got {type(d).__name__}")
    if key not in d:
        where = f"{section}.{key}" if section else key
        raise BundleError(f"manifest {where}: missing; re-export the bundle with `medfedpure export`")
    return d[key]


def _int(v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise BundleError(f"manifest {where}: expected an integer, got {v!r}")
    if lo is not None and int(v) < lo:
        raise BundleError(f"manifest {where}: expected an integer >= {lo}, got {v!r}")
    if hi is not None and int(v) > hi:
        raise BundleError(f"manifest {where}: expected an integer <= {hi}, got {v!r}")
    return int(v)


def _float(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        raise BundleError(f"manifest {where}: expected a finite number, got {v!r}")
    return float(v)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise BundleError(f"manifest {where}: expected true or false, got {v!r}")
    return bool(v)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise BundleError(f"manifest {where}: expected a non-empty string, got {v!r}")
    return v


def _unknown_keys(d: Mapping[str, Any], section: str, known: tuple[str, ...]) -> None:
    if not isinstance(d, Mapping):
        raise BundleError(f"manifest {section}: expected an object, got {type(d).__name__}")
    extra = sorted(set(d) - set(known))
    if extra:
        raise BundleError(f"manifest {section}: unknown keys {extra} (known: {list(known)}); this runtime does "
                          "not implement them — update medfedpure or re-export the bundle")


def freeze(obj: Any) -> Any:
    """A read-only deep copy of JSON data: objects → ``MappingProxyType``, arrays → tuples."""
    if isinstance(obj, Mapping):
        return MappingProxyType({str(k): freeze(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return tuple(freeze(v) for v in obj)
    return obj


def thaw(obj: Any) -> Any:
    """Inverse of :func:`freeze`: plain dicts and lists again (for JSON)."""
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [thaw(v) for v in obj]
    return obj


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """How a scan becomes the model input x [1, S, S] in [0, 1]: ``medfedpure.scan.preprocess``.

    The fields record what that function does (grey conversion, robust percentile normalisation,
    aspect-preserving resize into a zero-padded square of side ``size``); the runtime implements
    exactly one preprocessing, so any other value is refused instead of silently ignored.
    """

    size: int
    function: str = PREPROCESS_FUNCTION
    grey: str = PREPROCESS_GREY
    percentiles: tuple[float, float] = (0.5, 99.5)
    resize: str = PREPROCESS_RESIZE
    range: tuple[float, float] = PREPROCESS_RANGE

    def __post_init__(self) -> None:
        from medfedpure.scan import PERCENTILES

        _int(self.size, "preprocessing.size", lo=8, hi=MAX_IMAGE_SIZE)
        implemented = {"function": PREPROCESS_FUNCTION, "grey": PREPROCESS_GREY, "resize": PREPROCESS_RESIZE,
                       "percentiles": tuple(float(p) for p in PERCENTILES), "range": PREPROCESS_RANGE}
        for key, want in implemented.items():
            got = getattr(self, key)
            if isinstance(got, list):
                got = tuple(got)
                object.__setattr__(self, key, got)
            if got != want:
                raise BundleError(f"manifest preprocessing.{key}: {got!r} is not implemented by this runtime "
                                  f"(it implements {want!r}); re-export the bundle for this medfedpure")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        _unknown_keys(d, "preprocessing", ("function", "size", "grey", "percentiles", "resize", "range"))
        pct = _need(d, "preprocessing", "percentiles")
        rng = _need(d, "preprocessing", "range")
        for name, v in (("percentiles", pct), ("range", rng)):
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise BundleError(f"manifest preprocessing.{name}: expected two numbers, got {v!r}")
        return cls(
            size=_int(_need(d, "preprocessing", "size"), "preprocessing.size", lo=8),
            function=_str(_need(d, "preprocessing", "function"), "preprocessing.function"),
            grey=_str(_need(d, "preprocessing", "grey"), "preprocessing.grey"),
            percentiles=tuple(_float(v, "preprocessing.percentiles") for v in pct),  # type: ignore[arg-type]
            resize=_str(_need(d, "preprocessing", "resize"), "preprocessing.resize"),
            range=tuple(_float(v, "preprocessing.range") for v in rng),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {"function": self.function, "size": self.size, "grey": self.grey,
                "percentiles": list(self.percentiles), "resize": self.resize, "range": list(self.range)}


def encode_masks(visible: np.ndarray) -> dict[str, Any]:
    """bool [K, Np] → ``{"encoding", "shape", "data"}`` (packbits, base64)."""
    v = np.asarray(visible)
    if v.dtype != np.bool_ or v.ndim != 2:
        raise ValueError(f"visible must be a bool [K, Np] array, got {v.dtype} {v.shape}")
    data = base64.b64encode(np.packbits(v.reshape(-1)).tobytes()).decode("ascii")
    return {"encoding": MASK_ENCODING, "shape": [int(v.shape[0]), int(v.shape[1])], "data": data}


def decode_masks(d: Any, where: str = "mae.visible") -> np.ndarray:
    """Inverse of :func:`encode_masks`, validated (encoding, shape, length, zero padding)."""
    if not isinstance(d, Mapping):
        raise BundleError(f"manifest {where}: expected an object {{encoding, shape, data}}, got "
                          f"{type(d).__name__}; convert a format-1 bundle or re-export it")
    _unknown_keys(d, where, ("encoding", "shape", "data"))
    enc = _need(d, where, "encoding")
    if enc != MASK_ENCODING:
        raise BundleError(f"manifest {where}.encoding: {enc!r} is not implemented (expected {MASK_ENCODING!r})")
    shape = _need(d, where, "shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 2:
        raise BundleError(f"manifest {where}.shape: expected [K, Np], got {shape!r}")
    k, n = (_int(s, f"{where}.shape", lo=1) for s in shape)
    data = _need(d, where, "data")
    try:
        raw = base64.b64decode(_str(data, f"{where}.data"), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BundleError(f"manifest {where}.data: not valid base64 ({e})") from e
    bits = k * n
    if len(raw) != (bits + 7) // 8:
        raise BundleError(f"manifest {where}.data: {len(raw)} bytes, but shape {[k, n]} needs {(bits + 7) // 8}")
    flat = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if flat[bits:].any():
        raise BundleError(f"manifest {where}.data: the padding bits after the {bits} mask bits are not zero")
    return flat[:bits].astype(bool).reshape(k, n)


@dataclass(frozen=True, eq=False)
class MaeSpec:
    """The detector: patch side, number of scoring mask sets K, target and the sets themselves.

    Attributes:
        patch: patch side P in pixels.
        k: number of scoring mask sets K.
        norm_pix: whether the MAE reconstructs normalised patches.
        visible: bool [K, Np] (read-only), True where set k shows patch p to the encoder;
            patches in row-major order. Every patch is hidden by at least one set.
    """

    patch: int
    k: int
    norm_pix: bool
    visible: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        _int(self.patch, "mae.patch", lo=1)
        _int(self.k, "mae.k", lo=1)
        _bool(self.norm_pix, "mae.norm_pix")
        v = np.asarray(self.visible)
        if v.dtype != np.bool_ or v.ndim != 2:
            raise BundleError(f"manifest mae.visible: expected a bool [K, Np] array, got {v.dtype} {v.shape}")
        if v.shape[0] != self.k:
            raise BundleError(f"manifest mae.visible: {v.shape[0]} mask sets, but mae.k is {self.k}")
        never_hidden = np.flatnonzero(v.all(axis=0))
        if never_hidden.size:
            raise BundleError(f"manifest mae.visible: patches {never_hidden[:5].tolist()} are hidden by no mask "
                              "set, so the detector never scores them; re-export the bundle")
        object.__setattr__(self, "visible", _readonly(v))

    @property
    def num_patches(self) -> int:
        return int(self.visible.shape[1])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaeSpec:
        _unknown_keys(d, "mae", ("patch", "k", "norm_pix", "visible"))
        return cls(patch=_int(_need(d, "mae", "patch"), "mae.patch", lo=1),
                   k=_int(_need(d, "mae", "k"), "mae.k", lo=1),
                   norm_pix=_bool(_need(d, "mae", "norm_pix"), "mae.norm_pix"),
                   visible=decode_masks(_need(d, "mae", "visible")))

    def to_dict(self) -> dict[str, Any]:
        return {"patch": self.patch, "k": self.k, "norm_pix": self.norm_pix, "visible": encode_masks(self.visible)}


@dataclass(frozen=True, eq=False)
class PurifierSpec:
    """The purifier: DDPM schedule, its ᾱ table, the sampler and its number of steps K.

    Attributes:
        schedule: β schedule name (``"cosine"`` or ``"linear"``), for rebuilding it in torch.
        num_timesteps: T.
        alphas_cumprod: ᾱ_t, t = 0..T, float64 [T + 1] (read-only); ᾱ_0 = 1, non-increasing, > 0.
        steps: K ≥ 1, the sampler's network evaluations.
        sampler: the algorithm; only ``medfedpure.runtime.sampler.SAMPLER`` is implemented.
    """

    schedule: str
    num_timesteps: int
    alphas_cumprod: np.ndarray = field(repr=False)
    steps: int
    sampler: str

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise BundleError(f"manifest purifier.schedule: {self.schedule!r} is not implemented "
                              f"(expected one of {list(SCHEDULES)})")
        _int(self.num_timesteps, "purifier.num_timesteps", lo=10)
        _int(self.steps, "purifier.steps", lo=1, hi=self.num_timesteps)
        if self.sampler not in SAMPLERS:
            raise BundleError(f"manifest purifier.sampler: {self.sampler!r} is not implemented by this runtime "
                              f"(it implements {list(SAMPLERS)}); re-export the bundle for this medfedpure")
        a = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if a.shape != (self.num_timesteps + 1,):
            raise BundleError(f"manifest purifier.alphas_cumprod: {a.shape[0] if a.ndim == 1 else a.shape} values, "
                              f"expected num_timesteps + 1 = {self.num_timesteps + 1}")
        if not np.isfinite(a).all() or a[0] != 1.0 or (a <= 0).any() or (np.diff(a) > 0).any():
            raise BundleError("manifest purifier.alphas_cumprod: expected finite values with ᾱ_0 = 1, "
                              "non-increasing and > 0")
        object.__setattr__(self, "alphas_cumprod", _readonly(a))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PurifierSpec:
        _unknown_keys(d, "purifier", ("schedule", "num_timesteps", "alphas_cumprod", "steps", "sampler"))
        table = _need(d, "purifier", "alphas_cumprod")
        if not isinstance(table, (list, tuple)):
            raise BundleError(f"manifest purifier.alphas_cumprod: expected a list of numbers, got {type(table).__name__}")
        return cls(schedule=_str(_need(d, "purifier", "schedule"), "purifier.schedule"),
                   num_timesteps=_int(_need(d, "purifier", "num_timesteps"), "purifier.num_timesteps", lo=10),
                   alphas_cumprod=np.array([_float(v, "purifier.alphas_cumprod") for v in table], dtype=np.float64),
                   steps=_int(_need(d, "purifier", "steps"), "purifier.steps", lo=1),
                   sampler=_str(_need(d, "purifier", "sampler"), "purifier.sampler"))

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "num_timesteps": self.num_timesteps,
                "alphas_cumprod": [float(v) for v in self.alphas_cumprod], "steps": self.steps,
                "sampler": self.sampler}


ORIENTATIONS = ("axial", "coronal", "sagittal", "any")
# the patient axis that the slice normal of each orientation runs along (DICOM LPS: x, y, z)
_NORMAL_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def _normal_cosines(iop: Any) -> np.ndarray | None:
    """|unit slice normal| [3] (x, y, z) from ImageOrientationPatient's row × column cosines; None when
    absent, not 6 finite numbers, or degenerate."""
    if iop is None:
        return None
    v = np.asarray(iop, dtype=np.float64).reshape(-1)
    if v.shape != (6,) or not np.isfinite(v).all():
        return None
    normal = np.cross(v[:3], v[3:])
    norm = float(np.linalg.norm(normal))
    return None if norm < 1e-6 else np.abs(normal) / norm


def _tilt(cosines: np.ndarray, orientation: str) -> float:
    """Degrees between the slice normal (``_normal_cosines``) and the axis of ``orientation``."""
    return math.degrees(math.acos(min(1.0, float(cosines[_NORMAL_AXIS[orientation]]))))


def _names(v: Any, where: str) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v:
        raise BundleError(f"manifest {where}: expected a non-empty list of names, got {v!r}")
    out = tuple(_str(x, where).strip().upper() for x in v)
    if not all(out) or len(set(out)) != len(out):
        raise BundleError(f"manifest {where}: expected unique non-empty names, got {list(v)!r}")
    return out


@dataclass(frozen=True)
class Scope:
    """Which scans the bundle is meant for; a scan outside it gets ``status="out_of_scope"``.

    Checked on the attributes a DICOM file carries (:func:`medfedpure.scan.dicom.scope_attributes`),
    compared case-insensitively. An attribute the input does not carry (every non-DICOM input; a DICOM
    file without it) is never guessed: the scan stays in scope for that attribute and the check records
    it as ``"unknown"`` (``Result.scope``), so the caller sees what was not checked.

    Attributes:
        modalities: allowed Modality values (e.g. ``("MR",)``).
        body_parts: allowed BodyPartExamined values (e.g. ``("BRAIN", "HEAD")``).
        image_types: allowed first values of ImageType (``ORIGINAL`` / ``DERIVED``).
        orientation: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"any"``. The slice normal is the
            cross product of ImageOrientationPatient's row and column cosines; the slice has the
            orientation when that normal lies within ``max_tilt_deg`` of the patient axis the
            orientation names (axial: z, head-feet; coronal: y; sagittal: x), in either direction.
        max_tilt_deg: the largest angle in degrees, in [0, 90), between the slice normal and that axis.
    """

    modalities: tuple[str, ...] = ("MR",)
    body_parts: tuple[str, ...] = ("BRAIN", "HEAD")
    image_types: tuple[str, ...] = ("ORIGINAL", "DERIVED")
    orientation: str = "axial"
    max_tilt_deg: float = 30.0

    def __post_init__(self) -> None:
        for key in ("modalities", "body_parts", "image_types"):
            object.__setattr__(self, key, _names(getattr(self, key), f"scope.{key}"))
        if self.orientation not in ORIENTATIONS:
            raise BundleError(f"manifest scope.orientation: {self.orientation!r} is not one of {list(ORIENTATIONS)}")
        tilt = _float(self.max_tilt_deg, "scope.max_tilt_deg")
        if not 0.0 <= tilt < 90.0:
            raise BundleError(f"manifest scope.max_tilt_deg: expected degrees in [0, 90), got {tilt!r}")
        object.__setattr__(self, "max_tilt_deg", tilt)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scope:
        keys = ("modalities", "body_parts", "image_types", "orientation", "max_tilt_deg")
        _unknown_keys(d, "scope", keys)
        return cls(modalities=_names(_need(d, "scope", "modalities"), "scope.modalities"),
                   body_parts=_names(_need(d, "scope", "body_parts"), "scope.body_parts"),
                   image_types=_names(_need(d, "scope", "image_types"), "scope.image_types"),
                   orientation=_str(_need(d, "scope", "orientation"), "scope.orientation"),
                   max_tilt_deg=_float(_need(d, "scope", "max_tilt_deg"), "scope.max_tilt_deg"))

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "body_parts": list(self.body_parts),
                "image_types": list(self.image_types), "orientation": self.orientation,
                "max_tilt_deg": self.max_tilt_deg}

    @staticmethod
    def slice_orientation(iop: Any) -> tuple[str, float] | None:
        """(name, tilt) of the slice with ImageOrientationPatient ``iop`` (6 floats): the closest of axial /
        coronal / sagittal and the angle in degrees between the slice normal and that axis; None when
        ``iop`` is absent or degenerate (parallel or zero cosines)."""
        cosines = _normal_cosines(iop)
        if cosines is None:
            return None
        name = max(_NORMAL_AXIS, key=lambda k: cosines[_NORMAL_AXIS[k]])
        return name, _tilt(cosines, name)

    def check(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Check a scan's metadata (``Scan.meta``) against the scope.

        Returns a JSON-ready record: ``modality``, ``body_part``, ``image_type`` (the first value),
        ``orientation`` (``"axial"`` / ``"coronal"`` / ``"sagittal"`` with the tilt, e.g.
        ``"axial (tilt 12.0°)"``) — each ``"unknown"`` when the input does not carry it — ``in_scope``
        (bool) and ``reason`` (None in scope, else every violated attribute with its value and what the
        scope allows, joined by "; ").
        """
        why: list[str] = []
        modality = meta.get("modality")
        modality = str(modality).strip().upper() if modality else None
        if modality is not None and modality not in self.modalities:
            why.append(f"Modality {modality!r} is not in the bundle's scope {list(self.modalities)}")
        body = meta.get("body_part")
        if body is not None and body not in self.body_parts:
            why.append(f"BodyPartExamined {body!r} is not in the bundle's scope {list(self.body_parts)}")
        types = meta.get("image_type")
        first = types[0] if types else None
        if first is not None and first not in self.image_types:
            why.append(f"ImageType {first!r} (value 1) is not in the bundle's scope {list(self.image_types)}")
        cosines = _normal_cosines(meta.get("orientation"))
        orient = "unknown"
        if cosines is not None:
            name = max(_NORMAL_AXIS, key=lambda k: cosines[_NORMAL_AXIS[k]])
            orient = f"{name} (tilt {_tilt(cosines, name):.1f}°)"
            off = 0.0 if self.orientation == "any" else _tilt(cosines, self.orientation)
            if off > self.max_tilt_deg:
                iop = [round(float(x), 4) for x in meta["orientation"]]
                why.append(f"ImageOrientationPatient {iop} is {orient}: its slice normal is {off:.1f}° from the "
                           f"{self.orientation} axis, outside the bundle's scope ({self.orientation} within "
                           f"{self.max_tilt_deg:g}°)")
        return {"modality": modality or "unknown", "body_part": body or "unknown",
                "image_type": first or "unknown", "orientation": orient,
                "in_scope": not why, "reason": "; ".join(why) or None}


DEFAULT_SCOPE = Scope()


def _gate_from_dict(d: Any) -> GateSpec:
    from medfedpure.gate import GateSpec

    if not isinstance(d, Mapping):
        raise BundleError(f"manifest gate: expected an object, got {type(d).__name__}")
    try:
        return GateSpec.from_dict(d)
    except BundleError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise BundleError(f"manifest gate: {msg}") from e


@dataclass(frozen=True, eq=False)
class BundleSpec:
    """Every manifest section except the artefact list, typed and validated.

    Attributes:
        classes: the classifier's class names, in output order (unique, non-empty).
        image_size: S, the side of the model input.
        preprocessing / mae / purifier / gate: the sections above (gate: ``medfedpure.gate.GateSpec``).
        provenance: free-form record of how the bundle was made (deeply read-only).
        scope: the optional ``scope`` section as written; None when the manifest has none (bundles made
            before it existed), and then :attr:`effective_scope` is :data:`DEFAULT_SCOPE` (MR, brain or
            head, original or derived, axial within 30°).
    """

    classes: tuple[str, ...]
    image_size: int
    preprocessing: Preprocessing
    mae: MaeSpec
    purifier: PurifierSpec
    gate: GateSpec
    provenance: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    scope: Scope | None = None

    @property
    def effective_scope(self) -> Scope:
        """The scope scans are checked against: the manifest's, else :data:`DEFAULT_SCOPE`."""
        return DEFAULT_SCOPE if self.scope is None else self.scope

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        if len(classes) < 2 or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
            raise BundleError(f"manifest classes: expected at least two unique non-empty names, got {list(classes)}")
        object.__setattr__(self, "classes", classes)
        _int(self.image_size, "image_size", lo=8, hi=MAX_IMAGE_SIZE)
        if self.purifier.num_timesteps < self.gate.t_max:
            raise BundleError(f"manifest gate.t_max: {self.gate.t_max} is beyond the purifier's schedule "
                              f"(purifier.num_timesteps = {self.purifier.num_timesteps}); re-calibrate the gate")
        if self.preprocessing.size != self.image_size:
            raise BundleError(f"manifest preprocessing.size: {self.preprocessing.size}, but image_size is "
                              f"{self.image_size}; they must agree")
        if self.image_size % self.mae.patch:
            raise BundleError(f"manifest mae.patch: {self.mae.patch} does not divide image_size {self.image_size}")
        want = (self.image_size // self.mae.patch) ** 2
        if self.mae.num_patches != want:
            raise BundleError(f"manifest mae.visible: {self.mae.num_patches} patches per set, but image_size "
                              f"{self.image_size} / patch {self.mae.patch} gives {want}")
        for key in ("patch", "norm_pix"):  # the gate scores the MAE's patches with its target
            if hasattr(self.gate, key) and getattr(self.gate, key) != getattr(self.mae, key):
                raise BundleError(f"manifest gate.{key}: {getattr(self.gate, key)!r}, but mae.{key} is "
                                  f"{getattr(self.mae, key)!r}; they must agree")
        if not isinstance(self.provenance, MappingProxyType):
            object.__setattr__(self, "provenance", freeze(dict(self.provenance)))

    @classmethod
    def from_manifest(cls, m: Mapping[str, Any]) -> BundleSpec:
        """Parse a manifest's sections (the artefact list is :mod:`medfedpure.runtime.bundle`'s).

        Raises:
            BundleError: a format version other than :data:`FORMAT_VERSION`, or any missing,
                malformed or unimplemented field (the message names it).
        """
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            hint = ("convert it with medfedpure.export.bundle_writer.convert_v1_bundle(src, out) or re-export it "
                    "with `medfedpure export`") if version == 1 else "re-export it with `medfedpure export`"
            raise BundleError(f"bundle format version {version!r} is not supported (this medfedpure reads version "
                              f"{FORMAT_VERSION}): {hint}")
        classes = _need(m, "", "classes")
        if not isinstance(classes, list):
            raise BundleError(f"manifest classes: expected a list of names, got {classes!r}")
        provenance = _need(m, "", "provenance")
        if not isinstance(provenance, Mapping):
            raise BundleError(f"manifest provenance: expected an object, got {type(provenance).__name__}")
        return cls(
            classes=tuple(_str(c, "classes") for c in classes),
            image_size=_int(_need(m, "", "image_size"), "image_size", lo=8, hi=MAX_IMAGE_SIZE),
            preprocessing=Preprocessing.from_dict(_need(m, "", "preprocessing")),
            mae=MaeSpec.from_dict(_need(m, "", "mae")),
            purifier=PurifierSpec.from_dict(_need(m, "", "purifier")),
            gate=_gate_from_dict(_need(m, "", "gate")),
            provenance=freeze(provenance),
            scope=None if m.get("scope") is None else Scope.from_dict(m["scope"]),
        )

    def to_manifest(self) -> dict[str, Any]:
        """The sections as manifest JSON (everything but ``artefacts``)."""
        return {"format_version": FORMAT_VERSION, "classes": list(self.classes), "image_size": self.image_size,
                "preprocessing": self.preprocessing.to_dict(), "mae": self.mae.to_dict(),
                "gate": self.gate.to_dict(), "purifier": self.purifier.to_dict(),
                "provenance": thaw(self.provenance),
                **({} if self.scope is None else {"scope": self.scope.to_dict()})}
