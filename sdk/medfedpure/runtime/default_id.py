"""The id of the embedded default bundle (``bundles/default``): sha256 of its ``manifest.json``.

``Defender.default()`` pins this id, so a manifest edited in place — even one re-signed by a trusted
key — is not silently run as the default. ``medfedpure bundle build``'s install step rewrites the
constant when it installs a new default bundle, and a test checks it against the shipped manifest.
"""

from __future__ import annotations

DEFAULT_BUNDLE_ID = "cd175fb4e0b909f76463938dcf97bbce113fb8f57d34e49c5ec9d70feff87993"
