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
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from medfedpure.runtime.manifest import FORMAT_VERSION, BundleError, BundleSpec

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Artefact", "BundleError", "BundleSpec", "VerifiedBundle",
           "check_relpath", "default_bundle_path", "sha256_file", "verify_bundle"]

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
ROLES = ("classifier", "mae", "denoiser")
FORMATS = ("onnx", "safetensors", "tensorrt")
PRECISIONS = ("fp32", "fp16")
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
    if str(p) == MANIFEST_NAME:
        raise BundleError(f"artefact path {rel!r} collides with the manifest")
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
        try:
            a = cls(
                name=name,
                path=str(d["path"]),
                sha256=str(d["sha256"]).lower(),
                bytes=int(d["bytes"]),
                role=str(d["role"]),
                format=str(d["format"]),
                precision=str(d["precision"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest artefact {name!r} is malformed ({e}); expected keys "
                              "path, sha256, bytes, role, format, precision") from e
        check_relpath(a.path)
        if len(a.sha256) != 64 or any(c not in "0123456789abcdef" for c in a.sha256):
            raise BundleError(f"artefact {name!r}: sha256 {a.sha256!r} is not 64 hex digits")
        if a.role not in ROLES or a.format not in FORMATS or a.precision not in PRECISIONS:
            raise BundleError(f"artefact {name!r}: role/format/precision {a.role}/{a.format}/{a.precision} "
                              f"not in {ROLES}/{FORMATS}/{PRECISIONS}")
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


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    mpath = root / MANIFEST_NAME
    try:
        st = os.lstat(mpath)
    except FileNotFoundError:
        raise BundleError(f"{root} has no {MANIFEST_NAME}: not a medfedpure bundle") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{mpath} is not a regular file (links are refused)")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is {st.st_size} bytes; manifests are at most {MAX_MANIFEST_BYTES}")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object")
    return manifest, raw


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
    """

    root: Path
    manifest: dict[str, Any]
    bundle_id: str
    artefacts: dict[str, Artefact]
    spec: BundleSpec

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


def verify_bundle(path: str | os.PathLike[str], *, expected_id: str | None = None) -> VerifiedBundle:
    """Verify a bundle completely, before anything parses an artefact.

    Args:
        path: the bundle directory.
        expected_id: optional pinned bundle id (full sha256 hex of manifest.json, or a prefix of at
            least 16 hex digits).

    Returns:
        A :class:`VerifiedBundle`.

    Raises:
        BundleError: missing or malformed manifest, unsupported format version, a section the
            runtime does not implement, unlisted file, symbolic link, special file, path leaving
            the bundle, missing file, size or sha256 mismatch, or a bundle id different from
            ``expected_id``.
    """
    root_in = Path(path)
    if not root_in.exists():
        raise BundleError(f"bundle {str(root_in)!r} does not exist")
    if not root_in.is_dir():
        raise BundleError(f"bundle {str(root_in)!r} is not a directory")
    root = root_in.resolve()
    manifest, raw = _read_manifest(root)
    bundle_id = hashlib.sha256(raw).hexdigest()
    if expected_id is not None:
        e = expected_id.lower()
        if len(e) < 16 or not bundle_id.startswith(e):
            raise BundleError(f"bundle id {bundle_id} does not match the pinned id {expected_id}")
    if "format_version" in manifest and manifest["format_version"] != FORMAT_VERSION:
        BundleSpec.from_manifest(manifest)  # raises, saying how to convert or re-export
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"manifest lacks {missing}: rebuild the bundle with `medfedpure export`")
    unknown = sorted(set(manifest) - set(_REQUIRED_KEYS))
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
    unlisted = sorted(present - set(listed) - {MANIFEST_NAME})
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
        digest = sha256_file(p)
        if digest != a.sha256:
            raise BundleError(f"artefact {a.path!r} has sha256 {digest[:16]}…; the manifest says "
                              f"{a.sha256[:16]}…: the file was modified — refusing the bundle")
    return VerifiedBundle(root=root, manifest=manifest, bundle_id=bundle_id, artefacts=artefacts, spec=spec)


def default_bundle_path() -> Path:
    """Path of the embedded default bundle shipped inside the package."""
    return Path(__file__).resolve().parents[1] / "bundles" / "default"
