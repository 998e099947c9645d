"""The id of the embedded default bundle (``bundles/default``): sha256 of its ``manifest.json``.

``Defender.default()`` pins this id, so a manifest edited in place — even one re-signed by a trusted
key — is not silently run as the default. ``medfedpure bundle build``'s install step rewrites the
constant when it installs a new default bundle, and a test checks it against the shipped manifest.
"""

from __future__ import annotations

DEFAULT_BUNDLE_ID = "c36ad82f778c4f7e99c26c1c9be60be6bb53e78be054bfa97f7ec7628f78d6b8"
