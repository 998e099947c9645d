"""Bundle signatures, verification side: Ed25519 over ``manifest.json``'s bytes (``cryptography``).

The manifest lists every artefact's sha256, so one signature over its exact bytes covers the whole
bundle. The signature lives in one extra file beside the manifest, ``signature.json``::

    {"algorithm": "ed25519", "key_id": "<sha256 hex of the raw 32-byte public key>",
     "signature": "<base64 of the 64-byte signature>"}

Which keys are trusted: the public keys shipped with the package (``medfedpure/keys/*.pub.pem``,
the project's release key), those named by the environment variable ``MEDFEDPURE_TRUSTED_KEYS``
(PEM files separated by ``os.pathsep``), and those passed as ``trusted_keys=`` to
:func:`medfedpure.runtime.bundle.verify_bundle` / ``Defender.load`` (PEM files, PEM bytes or
``Ed25519PublicKey`` objects). A key's name is its file name without ``.pub.pem`` / ``.pem``.

Signing (private keys, key generation, ``medfedpure bundle sign``) is the exporter's:
:mod:`medfedpure.export.signing`. A deployment needs only public keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfedpure.runtime.manifest import BundleError

__all__ = ["ALGORITHM", "SIGNATURE_NAME", "TRUSTED_KEYS_ENV", "Signer", "TrustedKey", "TrustedKeySpec",
           "check_signature", "key_id", "parse_signature", "shipped_keys_dir", "signature_document",
           "trusted_key_set"]

SIGNATURE_NAME = "signature.json"
ALGORITHM = "ed25519"
TRUSTED_KEYS_ENV = "MEDFEDPURE_TRUSTED_KEYS"
MAX_SIGNATURE_BYTES = 4096
MAX_KEY_FILE_BYTES = 16384
_SIGNATURE_KEYS = ("algorithm", "key_id", "signature")

TrustedKeySpec = Union[str, "os.PathLike[str]", bytes, Ed25519PublicKey, "TrustedKey"]


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key: how a signature names its signer."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def read_key_file(path: str | os.PathLike[str], *, what: str, error: type[Exception] = ValueError) -> bytes:
    """The bytes of a PEM key file, refusing a missing or oversized one with ``error`` before reading.

    One bounded read for both halves of a key pair: trusted public keys here, private signing keys in
    ``medfedpure.export.signing``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise error(f"{what} {str(p)!r} cannot be read ({e.strerror})") from e
    if size > MAX_KEY_FILE_BYTES:
        raise error(f"{what} {str(p)!r} is {size} bytes; a PEM Ed25519 key is far smaller")
    return p.read_bytes()


def _key_name(path: Path) -> str:
    name = path.name
    for suffix in (".pub.pem", ".pem", ".pub"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class TrustedKey:
    """A public key that may sign bundles, with the name reports show for it."""

    name: str
    key_id: str
    public_key: Ed25519PublicKey = field(repr=False, compare=False)

    @classmethod
    def from_public_key(cls, public_key: Ed25519PublicKey, name: str) -> TrustedKey:
        if not isinstance(public_key, Ed25519PublicKey):
            raise BundleError(f"trusted key {name!r} is a {type(public_key).__name__}, not an Ed25519 public key")
        return cls(name=name, key_id=key_id(public_key), public_key=public_key)

    @classmethod
    def from_pem(cls, data: bytes, name: str) -> TrustedKey:
        """A PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) block."""
        if b"PRIVATE KEY" in data:
            raise BundleError(f"trusted key {name!r} holds a private key: pass the public key (*.pub.pem); "
                              "keep the private key offline")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise BundleError(f"trusted key {name!r} is not a PEM public key ({e}); generate one with "
                              "`medfedpure keys generate`") from e
        return cls.from_public_key(key, name)  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrustedKey:
        p = Path(path)
        return cls.from_pem(read_key_file(p, what="trusted key file", error=BundleError), _key_name(p))


@dataclass(frozen=True)
class Signer:
    """Who signed a verified bundle: the trusted key's id and name."""

    key_id: str
    name: str


def shipped_keys_dir() -> Path:
    """The folder of public keys shipped with the package (the project's release key)."""
    return Path(__file__).resolve().parents[1] / "keys"


def _as_trusted(spec: TrustedKeySpec) -> TrustedKey:
    if isinstance(spec, TrustedKey):
        return spec
    if isinstance(spec, Ed25519PublicKey):
        return TrustedKey.from_public_key(spec, "key " + key_id(spec)[:16])
    if isinstance(spec, bytes):
        return TrustedKey.from_pem(spec, "key given as PEM bytes")
    if isinstance(spec, (str, os.PathLike)):
        return TrustedKey.from_file(spec)
    raise BundleError(f"trusted key {spec!r}: expected a PEM file path, PEM bytes, an Ed25519PublicKey or a "
                      "TrustedKey")


def trusted_key_set(extra: Iterable[TrustedKeySpec] | TrustedKeySpec | None = None, *,
                    environ: Mapping[str, str] | None = None) -> dict[str, TrustedKey]:
    """The trusted keys by key id: the shipped ones, ``MEDFEDPURE_TRUSTED_KEYS``, then ``extra``.

    Raises:
        BundleError: a key file that cannot be read or is not an Ed25519 public key.
    """
    env = os.environ if environ is None else environ
    keys: list[TrustedKey] = []
    shipped = shipped_keys_dir()
    if shipped.is_dir():
        keys.extend(TrustedKey.from_file(p) for p in sorted(shipped.glob("*.pub.pem")))
    for part in env.get(TRUSTED_KEYS_ENV, "").split(os.pathsep):
        if part.strip():
            keys.append(TrustedKey.from_file(part.strip()))
    if extra is not None:
        items = [extra] if isinstance(extra, (str, bytes, os.PathLike, Ed25519PublicKey, TrustedKey)) else extra
        keys.extend(_as_trusted(k) for k in items)
    out: dict[str, TrustedKey] = {}
    for k in keys:
        out.setdefault(k.key_id, k)
    return out


def signature_document(key: str, signature: bytes) -> bytes:
    """The bytes of a ``signature.json`` (canonical JSON, trailing newline)."""
    doc = {"algorithm": ALGORITHM, "key_id": key, "signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def parse_signature(raw: bytes) -> tuple[str, bytes]:
    """``signature.json``'s bytes → (key id, 64-byte signature), strictly validated.

    Raises:
        BundleError: oversized, not a JSON object, unknown or missing keys, another algorithm, a key
            id that is not 64 hex digits, or a signature that is not 64 bytes of base64.
    """
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{SIGNATURE_NAME} is {len(raw)} bytes; at most {MAX_SIGNATURE_BYTES}")
    try:
        doc: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{SIGNATURE_NAME} is not valid UTF-8 JSON ({e}): re-sign the bundle with "
                          "`medfedpure bundle sign`") from e
    if not isinstance(doc, dict) or set(doc) != set(_SIGNATURE_KEYS):
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise BundleError(f"{SIGNATURE_NAME}: expected exactly the keys {list(_SIGNATURE_KEYS)}, got {got}")
    if doc["algorithm"] != ALGORITHM:
        raise BundleError(f"{SIGNATURE_NAME}.algorithm: {doc['algorithm']!r} is not supported (expected "
                          f"{ALGORITHM!r})")
    kid = doc["key_id"]
    if not isinstance(kid, str) or len(kid) != 64 or any(c not in "0123456789abcdef" for c in kid):
        raise BundleError(f"{SIGNATURE_NAME}.key_id: expected 64 lower-case hex digits, got {kid!r}")
    sig_b64 = doc["signature"]
    try:
        sig = base64.b64decode(sig_b64, validate=True) if isinstance(sig_b64, str) else b""
    except (binascii.Error, ValueError):
        sig = b""
    if len(sig) != 64:
        raise BundleError(f"{SIGNATURE_NAME}.signature: expected base64 of a 64-byte Ed25519 signature")
    return kid, sig


def check_signature(manifest_raw: bytes, signature_raw: bytes | None,
                    trusted: Mapping[str, TrustedKey]) -> Signer:
    """Verify ``signature.json`` against the manifest's exact bytes and the trusted keys.

    Raises:
        BundleError: no signature, a malformed signature file, a signer that is not trusted, or a
            signature that does not match the manifest (the manifest was modified after signing).
    """
    if signature_raw is None:
        raise BundleError(f"the bundle is unsigned (no {SIGNATURE_NAME}): sign it with `medfedpure bundle sign "
                          "BUNDLE --key PRIVATE_KEY`, or pass allow_unsigned=True (--allow-unsigned) to accept it")
    kid, sig = parse_signature(signature_raw)
    key = trusted.get(kid)
    if key is None:
        raise BundleError(f"the bundle is signed by key {kid[:16]}…, which is not trusted (trusted: "
                          f"{sorted(f'{k.name} {k.key_id[:16]}…' for k in trusted.values()) or 'none'}); add "
                          "its public key with trusted_keys= / --trusted-key FILE / MEDFEDPURE_TRUSTED_KEYS")
    try:
        key.public_key.verify(sig, manifest_raw)
    except InvalidSignature:
        raise BundleError(f"signature mismatch: manifest.json is not what key {key.name!r} ({kid[:16]}…) signed — "
                          "the manifest was modified after signing; refusing the bundle") from None
    return Signer(key_id=kid, name=key.name)
