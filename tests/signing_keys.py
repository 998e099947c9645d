"""Test fixture: the tests' Ed25519 signing key, and the environment that makes the tests trust it.

The key is derived from a fixed seed, so a bundle signed in one test process verifies in another
and cached tiny bundles stay valid; it is trusted only where :func:`use_test_keys` put its public
key into ``MEDFEDPURE_TRUSTED_KEYS`` (``tests/conftest.py`` does, for the test session). It signs
nothing outside the tests. Torch-free, so that ``conftest.py`` can import it cheaply.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TEST_KEY_NAME = "medfedpure-test"
TEST_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"medfedpure test signing key").digest())


def test_key_files() -> tuple[Path, Path]:
    """(private PEM, public PEM) of the test key, written once per user into the temp folder."""
    base = Path(tempfile.gettempdir()) / f"medfedpure-test-keys-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    priv, pub = base / f"{TEST_KEY_NAME}.pem", base / f"{TEST_KEY_NAME}.pub.pem"
    pem = TEST_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    pub_pem = TEST_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data in ((priv, pem), (pub, pub_pem)):
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
    return priv, pub


def use_test_keys() -> None:
    """Trust the test key (``MEDFEDPURE_TRUSTED_KEYS``) and sign exported bundles with it
    (``MEDFEDPURE_SIGNING_KEY``) in this process and the processes it starts."""
    priv, pub = test_key_files()
    os.environ["MEDFEDPURE_TRUSTED_KEYS"] = str(pub)
    os.environ["MEDFEDPURE_SIGNING_KEY"] = str(priv)
