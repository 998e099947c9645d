"""Torch modules, one per file: ``moe`` (classifier), ``mae`` (detector), ``unet``/``diffusion`` (purifier).

Import the submodules directly (``from medfedpure.models.moe import MoEClassifier``); this package
does not import torch on its own.
"""
