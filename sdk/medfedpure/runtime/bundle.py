"""The model bundle: the unit a vendor ships (docs/design.md, "Bundle format").

A bundle is a directory holding ``manifest.json`` and the artefacts it lists::

    BUNDLE/manifest.json
    BUNDLE/classifier.onnx, mae.onnx, denoiser.onnx          FP32 ONNX graphs (dynamic batch)
    BUNDLE/*.fp16.onnx                                       optional FP16 graphs (FP32 inputs/outputs)
    BUNDLE/*.safetensors                                     the torch weights the graphs came from
    BUNDLE/tensorrt/<arch>/*.plan                            optional TensorRT engines

The manifest (``FORMAT_VERSION`` 2) holds the classes, image size and preprocessing, the site's
gate calibration, the purifier schedule and sampler, each artefact's sha256 / size / role /
precision, and provenance (code commit, training-config hash, data-set fingerprint, metrics).
Its sections are parsed once, on load, into the typed values of :mod:`medfedpure.runtime.manifest`
(:attr:`VerifiedBundle.spec`); the runtime reads them from there, never from the JSON.

Security model: :func:`verify_bundle` checks *everything* before anything else looks at an
artefact — the directory may hold only ``manifest.json`` and listed files (no unlisted files, no
symlinks, no special files), every listed path is a plain relative path inside the bundle, and
every file's size and sha256 match. Parsers never open bundle files themselves: they receive the
bytes from :meth:`VerifiedBundle.read_bytes`, which re-hashes exactly the bytes it returns, so a
file swapped after verification (time-of-check / time-of-use) is refused as well. The manifest is
the trust root; ``bundle_id`` is the sha256 of its bytes, so a deployment can pin one exact bundle
with ``verify_bundle(path, expected_id=...)``.

Signatures: the manifest's bytes are signed with Ed25519 (:mod:`medfedpure.runtime.signing`); the
signature is the one extra file ``signature.json`` beside the manifest. A bundle without a signature
by a trusted key is refused unless the caller passes ``allow_unsigned=True``. The signature is
checked on the manifest's raw bytes before the JSON parser sees them; the JSON itself is parsed with
a nesting-depth limit and without the non-standard ``NaN`` / ``Infinity`` constants.

ONNX external data: a graph whose tensors keep their data in another file is accepted only when
that file is a listed, hashed artefact (format ``onnx_data``) of the bundle; the engines hand it to
ONNX Runtime from the verified bytes, never from a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from medfedpure.runtime.manifest import FORMAT_VERSION, BundleError, BundleSpec
from medfedpure.runtime.onnx_graph import OnnxParseError, summarize
from medfedpure.runtime.signing import (
    SIGNATURE_NAME,
    Signer,
    TrustedKeySpec,
    check_signature,
    trusted_key_set,
)

__all__ = ["CARD_ARTEFACT", "FORMAT_VERSION", "MANIFEST_NAME", "SIGNATURE_NAME", "Artefact", "BundleError", "BundleSpec", "Signer",
           "VerifiedBundle", "check_relpath", "default_bundle_path", "sha256_file", "verify_bundle"]

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_MANIFEST_DEPTH = 32  # objects/arrays nested at most this deep (the format needs 7)
# card: the model card, a document (no network); detector: the attack detector of a "learned" gate
ROLES = ("classifier", "mae", "denoiser", "detector", "card")
FORMATS = ("onnx", "onnx_data", "safetensors", "tensorrt", "markdown")  # onnx_data: a graph's external tensor data
PRECISIONS = ("fp32", "fp16", "none")  # none: a document's
CARD_ARTEFACT = "model_card"  # the manifest name of the model card (MODEL_CARD.md), when the bundle has one
_HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_relpath(rel: str) -> PurePosixPath:
    """Validate an artefact path from a manifest: relative, POSIX, normalised, inside the bundle.

    Raises:
        BundleError: absolute paths, ``..`` or ``.`` components, backslashes, empty components,
            NUL bytes or the manifest's own name.
    """
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"artefact path {rel!r} is not a non-empty string")
    if "\\" in rel or "\x00" in rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise BundleError(f"artefact path {rel!r} must be a relative POSIX path inside the bundle")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"artefact path {rel!r} leaves the bundle or is not normalised ('', '.', '..')")
    p = PurePosixPath(rel)
    if str(p) in (MANIFEST_NAME, SIGNATURE_NAME):
        raise BundleError(f"artefact path {rel!r} collides with the bundle's {str(p)}")
    return p


@dataclass(frozen=True)
class Artefact:
    """One manifest entry: a file in the bundle and what it is."""

    name: str  # key in the manifest, e.g. "classifier", "classifier.fp16", "classifier.torch"
    path: str  # relative POSIX path inside the bundle
    sha256: str
    bytes: int
    role: str  # one of ROLES
    format: str  # one of FORMATS
    precision: str  # one of PRECISIONS

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> Artefact:
        keys = ("path", "sha256", "bytes", "role", "format", "precision")
        if not isinstance(d, Mapping):
            raise BundleError(f"manifest artefacts.{name}: expected an object with keys {list(keys)}, got "
                              f"{type(d).__name__}")
        if set(d) != set(keys):
            raise BundleError(f"manifest artefacts.{name}: expected exactly the keys {list(keys)}, got {sorted(d)}")
        for k in keys:
            v = d[k]
            if k == "bytes":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise BundleError(f"manifest artefacts.{name}.bytes: expected an integer, got {v!r}")
            elif not isinstance(v, str):
                raise BundleError(f"manifest artefacts.{name}.{k}: expected a string, got {v!r}")
        a = cls(name=name, path=d["path"], sha256=d["sha256"].lower(), bytes=d["bytes"], role=d["role"],
                format=d["format"], precision=d["precision"])
        check_relpath(a.path)
        if len(a.sha256) != 64 or any(c not in "0123456789abcdef" for c in a.sha256):
            raise BundleError(f"artefact {name!r}: sha256 {a.sha256!r} is not 64 hex digits")
        if a.role not in ROLES or a.format not in FORMATS or a.precision not in PRECISIONS:
            raise BundleError(f"artefact {name!r}: role/format/precision {a.role}/{a.format}/{a.precision} "
                              f"not in {ROLES}/{FORMATS}/{PRECISIONS}")
        if (a.role == "card") != (a.format == "markdown") or (a.role == "card") != (a.precision == "none"):
            raise BundleError(f"artefact {name!r}: role/format/precision {a.role}/{a.format}/{a.precision}: a model "
                              "card is card/markdown/none, and only a model card is")
        if a.bytes < 0:
            raise BundleError(f"artefact {name!r}: negative size")
        return a

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "role": self.role,
                "format": self.format, "precision": self.precision}


def _walk(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file below ``root``; refuses links and special files.

    Uses ``lstat`` semantics throughout (never follows a link).
    """
    found: list[str] = []
    stack: list[tuple[Path, PurePosixPath]] = [(root, PurePosixPath())]
    while stack:
        d, rel = stack.pop()
        with os.scandir(d) as it:
            for entry in it:
                r = rel / entry.name
                if entry.is_symlink():
                    raise BundleError(f"bundle contains a symbolic link {str(r)!r}: links are refused; "
                                      "copy the file into the bundle instead")
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((Path(entry.path), r))
                elif stat.S_ISREG(st.st_mode):
                    found.append(str(r))
                else:
                    raise BundleError(f"bundle contains {str(r)!r}, which is not a regular file or folder")
    return sorted(found)


def _read_small_file(path: Path, limit: int, *, required: bool) -> bytes | None:
    """The bytes of a regular file (never a link) of at most ``limit`` bytes; None if absent and optional."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if required:
            raise BundleError(f"{path.parent} has no {path.name}: not a medfedpure bundle") from None
        return None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file (links are refused)")
    if st.st_size > limit:
        raise BundleError(f"{path} is {st.st_size} bytes; at most {limit} are accepted")
    raw = path.read_bytes()
    if len(raw) > limit:
        raise BundleError(f"{path} grew past {limit} bytes while it was read")
    return raw


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes) -> int:
    """Deepest nesting of objects/arrays in JSON text (strings skipped), without recursion."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(skeleton, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(step).max(initial=0))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"the non-standard constant {name} is not JSON")


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Strict JSON of a manifest: UTF-8, an object, nested at most ``MAX_MANIFEST_DEPTH`` deep, no
    ``NaN`` / ``Infinity``.

    Raises:
        BundleError: naming what is wrong (never a RecursionError, whatever the input).
    """
    depth = json_depth(raw)
    if depth > MAX_MANIFEST_DEPTH:
        raise BundleError(f"{where} nests objects/arrays {depth} deep; at most {MAX_MANIFEST_DEPTH} are accepted")
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{where} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} must hold a JSON object")
    return manifest


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose every file has been checked. Hand artefacts to parsers via :meth:`read_bytes`.

    Attributes:
        root: the bundle directory (resolved).
        manifest: the manifest's JSON as read (treat as read-only; use ``spec``).
        bundle_id: sha256 (hex) of ``manifest.json``'s bytes.
        artefacts: manifest entries by name.
        spec: the typed, validated sections (classes, image size, preprocessing, MAE, gate,
            purifier, provenance).
        signer: the trusted key that signed the manifest; None when the bundle was accepted
            unsigned (``allow_unsigned=True``).
    """

    root: Path
    manifest: dict[str, Any]
    bundle_id: str
    artefacts: dict[str, Artefact]
    spec: BundleSpec
    signer: Signer | None = None

    @property
    def short_id(self) -> str:
        return self.bundle_id[:16]

    def has(self, name: str) -> bool:
        return name in self.artefacts

    def find(self, role: str, fmt: str, precision: str) -> Artefact | None:
        """The artefact with this role, format and precision, or None."""
        for a in self.artefacts.values():
            if (a.role, a.format, a.precision) == (role, fmt, precision):
                return a
        return None

    def read_bytes(self, name: str) -> bytes:
        """The artefact's bytes, re-verified against the manifest's sha256 (defeats a swap after load)."""
        if name not in self.artefacts:
            raise BundleError(f"bundle {self.short_id} has no artefact {name!r}; it has {sorted(self.artefacts)}")
        a = self.artefacts[name]
        path = self.root / a.path
        if os.path.islink(path):
            raise BundleError(f"artefact {a.path!r} became a symbolic link after verification")
        data = path.read_bytes()
        if len(data) != a.bytes or hashlib.sha256(data).hexdigest() != a.sha256:
            raise BundleError(f"artefact {a.path!r} changed after verification (sha256 mismatch): refusing it")
        return data

    @property
    def classes(self) -> tuple[str, ...]:
        """``spec.classes``."""
        return self.spec.classes

    @property
    def image_size(self) -> int:
        """``spec.image_size``."""
        return self.spec.image_size


_REQUIRED_KEYS = ("format_version", "classes", "image_size", "preprocessing", "gate", "mae", "purifier",
                  "artefacts", "provenance")
_OPTIONAL_KEYS = ("scope",)  # absent: the runtime's default (manifest.DEFAULT_SCOPE)


def _check_onnx(a: Artefact, data: bytes, artefacts: Mapping[str, Artefact], classes: tuple[str, ...]) -> None:
    """Refuse an ONNX graph that reads unlisted external data, or a classifier of the wrong width."""
    try:
        g = summarize(data)
    except OnnxParseError as e:
        raise BundleError(f"artefact {a.path!r} is not a well-formed ONNX model ({e})") from e
    by_path = {b.path: b for b in artefacts.values()}
    for ref in g.external:
        loc = ref.location
        target = by_path.get(loc) if isinstance(loc, str) else None
        if target is None or target.format != "onnx_data":
            raise BundleError(f"artefact {a.path!r}: tensor {ref.tensor!r} keeps its data in the external file "
                              f"{loc!r}, which is not an onnx_data artefact listed (and hashed) in the manifest; "
                              "re-export the graph with its data embedded, or list the data file")
        if ref.offset is None or ref.length is None or ref.offset + ref.length > target.bytes:
            raise BundleError(f"artefact {a.path!r}: tensor {ref.tensor!r} needs explicit offset and length inside "
                              f"{loc!r} ({target.bytes} bytes); got offset {ref.offset}, length {ref.length}")
    if a.role == "classifier":
        if len(g.outputs) < 1 or g.outputs[0].dims is None or len(g.outputs[0].dims) != 2:
            raise BundleError(f"artefact {a.path!r}: the classifier graph must declare its output as "
                              f"[batch, classes]; it declares {[o.dims for o in g.outputs]}")
        width = g.outputs[0].dims[1]
        if not isinstance(width, int) or width != len(classes):
            raise BundleError(f"manifest classes: {len(classes)} names {list(classes)}, but the classifier graph "
                              f"{a.path!r} declares {width!r} outputs; they must agree — re-export the bundle")


def verify_bundle(path: str | os.PathLike[str], *, expected_id: str | None = None,
                  trusted_keys: Iterable[TrustedKeySpec] | TrustedKeySpec | None = None,
                  allow_unsigned: bool = False) -> VerifiedBundle:
    """Verify a bundle completely, before anything parses an artefact.

    Args:
        path: the bundle directory.
        expected_id: optional pinned bundle id (full sha256 hex of manifest.json, or a prefix of at
            least 16 hex digits).
        trusted_keys: public keys trusted besides the shipped ones and ``MEDFEDPURE_TRUSTED_KEYS``
            (PEM file paths, PEM bytes or ``Ed25519PublicKey`` objects; see
            :func:`medfedpure.runtime.signing.trusted_key_set`).
        allow_unsigned: accept a bundle without a valid signature by a trusted key (its
            :attr:`VerifiedBundle.signer` is then None). Everything else is still verified.

    Returns:
        A :class:`VerifiedBundle`.

    Raises:
        BundleError: missing or malformed manifest, an unsigned bundle or a signature that is
            malformed, by an untrusted key or not matching the manifest (unless ``allow_unsigned``),
            unsupported format version, a section the runtime does not implement or out of range,
            unlisted file, symbolic link, special file, path leaving the bundle, missing file, size or
            sha256 mismatch, an ONNX graph reading unlisted external data, a classifier whose output
            width is not the number of classes, or a bundle id different from ``expected_id``.
    """
    if not isinstance(allow_unsigned, bool):
        raise TypeError(f"allow_unsigned={allow_unsigned!r}: expected True or False")
    root_in = Path(path)
    if not root_in.exists():
        raise BundleError(f"bundle {str(root_in)!r} does not exist")
    if not root_in.is_dir():
        raise BundleError(f"bundle {str(root_in)!r} is not a directory")
    root = root_in.resolve()
    raw = _read_small_file(root / MANIFEST_NAME, MAX_MANIFEST_BYTES, required=True)
    assert raw is not None
    bundle_id = hashlib.sha256(raw).hexdigest()
    if expected_id is not None:
        e = expected_id.lower()
        if len(e) < 16 or not bundle_id.startswith(e):
            raise BundleError(f"bundle id {bundle_id} does not match the pinned id {expected_id}")
    sig_raw = _read_small_file(root / SIGNATURE_NAME, 1 << 16, required=False)
    signer: Signer | None = None
    if allow_unsigned:
        if sig_raw is not None:  # reported when it checks out; ignored otherwise (the caller opted out)
            try:
                signer = check_signature(raw, sig_raw, trusted_key_set(trusted_keys))
            except BundleError:
                signer = None
    else:
        try:
            signer = check_signature(raw, sig_raw, trusted_key_set(trusted_keys))
        except BundleError:
            if sig_raw is None:  # an older format is never signed: say how to convert it instead
                old = parse_manifest(raw, str(root / MANIFEST_NAME)).get("format_version")
                if old != FORMAT_VERSION:
                    BundleSpec.from_manifest({"format_version": old})
            raise
    manifest = parse_manifest(raw, str(root / MANIFEST_NAME))
    if "format_version" in manifest and manifest["format_version"] != FORMAT_VERSION:
        BundleSpec.from_manifest(manifest)  # raises, saying how to convert or re-export
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"manifest lacks {missing}: rebuild the bundle with `medfedpure export`")
    unknown = sorted(set(manifest) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise BundleError(f"manifest has unknown sections {unknown}: this runtime does not implement them; "
                          "update medfedpure or re-export the bundle")
    spec = BundleSpec.from_manifest(manifest)
    if not isinstance(manifest["artefacts"], dict) or not manifest["artefacts"]:
        raise BundleError("manifest 'artefacts' must be a non-empty object")
    artefacts = {name: Artefact.from_dict(name, d) for name, d in manifest["artefacts"].items()}
    listed: dict[str, str] = {}
    for a in artefacts.values():
        if a.path in listed:
            raise BundleError(f"artefacts {listed[a.path]!r} and {a.name!r} share the path {a.path!r}")
        listed[a.path] = a.name

    present = set(_walk(root))
    unlisted = sorted(present - set(listed) - {MANIFEST_NAME, SIGNATURE_NAME})
    if unlisted:
        raise BundleError(f"bundle holds files the manifest does not list: {unlisted}; "
                          "unlisted files are refused — remove them or re-export the bundle")
    absent = sorted(set(listed) - present)
    if absent:
        raise BundleError(f"bundle lacks files its manifest lists: {absent}")
    for a in artefacts.values():
        p = root / a.path
        if root not in p.resolve().parents:  # defence in depth; check_relpath already refused '..'
            raise BundleError(f"artefact path {a.path!r} resolves outside the bundle")
        size = os.lstat(p).st_size
        if size != a.bytes:
            raise BundleError(f"artefact {a.path!r} is {size} bytes; the manifest says {a.bytes}: tampered or truncated")
        data = p.read_bytes() if a.format == "onnx" else None
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(p)
        if digest != a.sha256:
            raise BundleError(f"artefact {a.path!r} has sha256 {digest[:16]}…; the manifest says "
                              f"{a.sha256[:16]}…: the file was modified — refusing the bundle")
        if data is not None:
            _check_onnx(a, data, artefacts, spec.classes)
    return VerifiedBundle(root=root, manifest=manifest, bundle_id=bundle_id, artefacts=artefacts, spec=spec,
                          signer=signer)


def default_bundle_path() -> Path:
    """Path of the embedded default bundle shipped inside the package."""
    return Path(__file__).resolve().parents[1] / "bundles" / "default"
