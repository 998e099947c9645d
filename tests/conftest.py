"""Shared test set-up: ``tests/`` on ``sys.path`` so that fixture modules (``tiny_bundle``) import by name, and
the tests' signing key trusted and used by the exporter (``signing_keys.use_test_keys``)."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import signing_keys  # noqa: E402

signing_keys.use_test_keys()
