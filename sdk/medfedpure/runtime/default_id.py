"""The id of the embedded default bundle (``bundles/default``): sha256 of its ``manifest.json``.

``Defender.default()`` pins this id, so a manifest edited in place — even one re-signed by a trusted
key — is not silently run as the default. ``medfedpure bundle build``'s install step rewrites the
constant when it installs a new default bundle, and a test checks it against the shipped manifest.
"""

from __future__ import annotations

DEFAULT_BUNDLE_ID = "9a75203d747ecd58567f723f05960bcadd063f324579d447b0ba3ee0d6c75f63"
