"""The bundle build: data → federated training → calibration → export → verification → install.

``medfedpure bundle build`` (``make bundle``) runs :func:`medfedpure.build.pipeline.build_bundle`
with a :class:`BundleBuildConfig`; each step is resumable (:mod:`medfedpure.build.steps`). The top
layer of the package: it may import data, fed, train and export; nothing below imports it.

Importing this package does not import torch: the pipeline module loads on use.
"""

from __future__ import annotations

from medfedpure.build.config import BundleBuildConfig

__all__ = ["BundleBuildConfig"]
