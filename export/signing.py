"""Bundle signatures, signing side: Ed25519 key pairs and ``signature.json`` (``cryptography``).

A bundle is signed by signing its ``manifest.json`` bytes (the manifest lists every artefact's
sha256); :mod:`medfedpure.runtime.signing` verifies. Private keys are PKCS#8 PEM files written with
mode 0600 and never inside a bundle (verification would refuse the unlisted file anyway). The
project's release key is held offline; see docs/design.md, "Bundle format".

The exporter signs when it is given a key (``signing_key=``) or when the environment variable
``MEDFEDPURE_SIGNING_KEY`` names a private key file; ``medfedpure bundle sign`` re-signs a bundle
after its manifest changed (e.g. a recalibration).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from medfedpure.runtime.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    VerifiedBundle,
    verify_bundle,
)
from medfedpure.runtime.signing import TrustedKey, key_id, read_key_file, signature_document

__all__ = ["SIGNING_KEY_ENV", "PrivateKeySpec", "generate_key_pair", "load_private_key", "resolve_signing_key",
           "sign_bundle", "sign_manifest", "trusted"]

SIGNING_KEY_ENV = "MEDFEDPURE_SIGNING_KEY"

PrivateKeySpec = Union[Ed25519PrivateKey, str, "os.PathLike[str]"]


def _inside_bundle(path: Path) -> Path | None:
    """The bundle folder (one holding a manifest.json) that ``path`` is in or is, if any."""
    p = path.resolve()
    for d in (p, *p.parents):
        if (d / MANIFEST_NAME).is_file():
            return d
    return None


def generate_key_pair(out_dir: str | os.PathLike[str], name: str = "medfedpure-signing") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``OUT/NAME.pem`` (private, mode 0600) and ``OUT/NAME.pub.pem``.

    Returns:
        (private key path, public key path).

    Raises:
        ValueError: a name that is not a plain file-name stem, or ``out_dir`` inside a bundle.
        FileExistsError: either file exists already (keys are never overwritten).
    """
    if not name or "/" in name or "\\" in name or name.startswith(".") or name.endswith((".pem", ".pub")):
        raise ValueError(f"key name {name!r}: expected a plain name such as 'medfedpure-release'")
    out = Path(out_dir)
    bundle = _inside_bundle(out) if out.exists() else None
    if bundle is not None:
        raise ValueError(f"{out} is inside the bundle {bundle}: a private key never goes in a bundle; choose "
                         "another folder")
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.pem", out / f"{name}.pub.pem"
    for p in (priv_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} exists: keys are never overwritten; choose another --name or folder")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(priv_path, 0o600)  # whatever the umask
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(spec: PrivateKeySpec) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object or an unencrypted PKCS#8 PEM file.

    Raises:
        ValueError: the file is missing, too large, not a PEM private key, or not Ed25519.
    """
    if isinstance(spec, Ed25519PrivateKey):
        return spec
    p = Path(spec)
    data = read_key_file(p, what="private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p} is not an unencrypted PEM private key ({e}); create one with "
                         "`medfedpure keys generate`") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{p} holds a {type(key).__name__}; bundles are signed with Ed25519 keys")
    return key


def resolve_signing_key(spec: PrivateKeySpec | None) -> Ed25519PrivateKey | None:
    """``spec``, else the key named by ``MEDFEDPURE_SIGNING_KEY``, else None (the bundle stays unsigned)."""
    if spec is not None:
        return load_private_key(spec)
    env = os.environ.get(SIGNING_KEY_ENV, "").strip()
    return load_private_key(env) if env else None


def sign_manifest(manifest_raw: bytes, key: Ed25519PrivateKey) -> bytes:
    """The ``signature.json`` bytes for these exact manifest bytes."""
    return signature_document(key_id(key.public_key()), key.sign(manifest_raw))


def trusted(key: Ed25519PrivateKey, name: str = "signing key") -> TrustedKey:
    """The public half of ``key`` as a :class:`TrustedKey` (to verify what was just signed)."""
    return TrustedKey.from_public_key(key.public_key(), name)


def sign_bundle(bundle: str | os.PathLike[str], key: PrivateKeySpec) -> VerifiedBundle:
    """(Re-)sign a bundle in place: verify everything but the signature, write ``signature.json``.

    The manifest is not touched, so the bundle id stays the same; an old signature is replaced.

    Returns:
        The bundle verified against the new signature (``signer`` is the key used).

    Raises:
        BundleError: the bundle is not intact (any check other than the signature fails).
        ValueError: the key cannot be loaded.
    """
    k = load_private_key(key)
    vb = verify_bundle(bundle, allow_unsigned=True)
    raw = (vb.root / MANIFEST_NAME).read_bytes()
    if hashlib.sha256(raw).hexdigest() != vb.bundle_id:
        raise BundleError(f"{vb.root / MANIFEST_NAME} changed while it was being signed; sign again")
    doc = sign_manifest(raw, k)
    fd, tmp = tempfile.mkstemp(prefix=".signature-", dir=vb.root)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(doc)
        os.chmod(tmp, 0o644)
        os.replace(tmp, vb.root / SIGNATURE_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return verify_bundle(vb.root, expected_id=vb.bundle_id, trusted_keys=[trusted(k)])
