"""Checkpoints: safetensors with the model's config JSON in the metadata. Never pickles.

The file format, the save/load code and the kind → (config, model) registry live below the
runtime, in :mod:`medfedpure.models.weights` and :mod:`medfedpure.models.registry`, so training
and the torch runtime read and write one format; this module keeps the training-side names.
``load_model(path)`` reads ``kind`` and ``config`` from the safetensors header, constructs the
model from its registered config class and loads the weights.

Metadata keys (all strings, as safetensors requires): ``kind`` (``"moe"``, ``"mae"``, ``"unet"``…),
``config`` (the config dataclass as JSON), ``format`` (the weights format version) and any
``extra`` entries (JSON-encoded).

Training state for resumption (the optimizer's tensors, from ``train.loop.optimizer_state``) is
saved with ``save_tensors`` / ``load_tensors``; the loop's counters live in a JSON file beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from medfedpure.models import registry, weights
from medfedpure.models.weights import WEIGHTS_FORMAT as FORMAT_VERSION
from medfedpure.models.weights import WeightsError as CheckpointError
from medfedpure.models.weights import save_model

__all__ = [
    "register_model",
    "save_model",
    "load_model",
    "read_metadata",
    "save_tensors",
    "load_tensors",
    "CheckpointError",
    "FORMAT_VERSION",
]


def register_model(kind: str, config_from_dict: Callable[[Mapping[str, Any]], Any],
                   build: Callable[[Any], torch.nn.Module]) -> None:
    """Register how to rebuild a model ``kind`` (:func:`medfedpure.models.registry.register`)."""
    registry.register(kind, config_from_dict, build)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata: ``kind`` (str), ``config`` (dict), ``format`` and decoded extras."""
    return weights.model_metadata(Path(path))


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"):
    """Rebuild a model from a ``save_model`` checkpoint → ``(model, cfg, meta)``; model in eval mode."""
    return weights.load_model(path, map_location=map_location)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Save a flat dict of tensors (e.g. optimizer state) as safetensors, atomically."""
    return weights.save_tensors(path, tensors, metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_tensors`` file (CPU)."""
    return weights.load_tensors(path)
