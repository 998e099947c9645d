"""The id of the embedded default bundle (``bundles/default``): sha256 of its ``manifest.json``.

``Defender.default()`` pins this id, so a manifest edited in place — even one re-signed by a trusted
key — is not silently run as the default. ``medfedpure bundle build``'s install step rewrites the
constant when it installs a new default bundle, and a test checks it against the shipped manifest.
"""

from __future__ import annotations

DEFAULT_BUNDLE_ID = "87a9bdecd73382261921e909e33f047c54915da756b050ae8e9ec67ebbd482bf"
