"""Checkpoints: safetensors with the model's config JSON in the metadata. Never pickles.

A checkpoint rebuilds itself: ``load_model(path)`` reads ``kind`` and ``config`` from the
safetensors header, constructs the model from its registered config class and loads the weights.

Metadata keys (all strings, as safetensors requires): ``kind`` (``"moe"``, ``"mae"``, ``"unet"``…),
``config`` (the config dataclass as JSON), ``format`` (this module's version) and any ``extra``
entries (JSON-encoded).

Training state for resumption (optimizer tensors) is saved with ``save_tensors`` /
``load_tensors``; the scalar part of the state lives in a JSON file beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "register_model",
    "save_model",
    "load_model",
    "read_metadata",
    "save_tensors",
    "load_tensors",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "CheckpointError",
]

FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model being loaded."""


# kind -> (config from dict, model from config). Kinds register lazily so that importing this
# module does not import every model.
_REGISTRY: dict[str, tuple[Callable[[dict], Any], Callable[[Any], torch.nn.Module]]] = {}


def register_model(kind: str, config_from_dict: Callable[[dict], Any], build: Callable[[Any], torch.nn.Module]):
    """Register how to rebuild a model ``kind`` (e.g. the purifier registers ``"unet"``)."""
    _REGISTRY[kind] = (config_from_dict, build)


def _builtin_registry() -> None:
    from medfedpure.models.mae import MAEConfig, MaskedAutoencoder
    from medfedpure.models.moe import MoEClassifier, MoEConfig

    _REGISTRY.setdefault("moe", (MoEConfig.from_dict, MoEClassifier))
    _REGISTRY.setdefault("mae", (MAEConfig.from_dict, MaskedAutoencoder))
    try:  # the purifier's models, when present
        from medfedpure.models.unet import UNet, UNetConfig

        _REGISTRY.setdefault("unet", (lambda d: UNetConfig(**_tuples(d)), UNet))
    except ImportError:
        pass


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _config_json(cfg: Any) -> str:
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
    elif hasattr(cfg, "__dataclass_fields__"):
        from dataclasses import asdict

        d = asdict(cfg)
    else:
        raise TypeError(f"config of type {type(cfg).__name__} is not a dataclass")
    return json.dumps(d, sort_keys=True)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_model(path: str | os.PathLike, model: torch.nn.Module, cfg: Any, kind: str,
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict and ``cfg`` to ``path`` (safetensors), atomically.

    Args:
        path: destination ``*.safetensors`` file; parent folders are created.
        model: the module; its full ``state_dict`` (parameters and persistent buffers) is saved.
        cfg: the model's config dataclass (saved as JSON under ``config``).
        kind: registry name used by ``load_model`` to rebuild the model (``"moe"``, ``"mae"``…).
        extra: more metadata, each value JSON-encoded (e.g. ``{"epoch": 3, "val_accuracy": 0.97}``).
    """
    path = Path(path)
    meta = {"kind": kind, "config": _config_json(cfg), "format": FORMAT_VERSION}
    for k, v in (extra or {}).items():
        if k in meta:
            raise ValueError(f"extra metadata key {k!r} is reserved")
        meta[k] = json.dumps(v)
    # Shared storage (e.g. tied weights) is not allowed by safetensors: clone every tensor.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_save(tensors, path, meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata: ``kind`` (str), ``config`` (dict), ``format`` and decoded extras."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train the model first or check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types on corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "kind" not in raw or "config" not in raw:
        raise CheckpointError(f"{path} has no 'kind'/'config' metadata: not written by save_model")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in ("kind", "format"):
            out[k] = v
        else:
            out[k] = json.loads(v)
    return out


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"):
    """Rebuild a model from a ``save_model`` checkpoint → ``(model, cfg, meta)``; model in eval mode."""
    meta = read_metadata(path)
    _builtin_registry()
    kind = meta["kind"]
    if kind not in _REGISTRY:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; known: {sorted(_REGISTRY)}")
    from_dict, build = _REGISTRY[kind]
    cfg = from_dict(meta["config"])
    model = build(cfg)
    sd = load_file(str(path), device=str(map_location))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match a {kind} model with its saved config "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    model.eval()
    return model, cfg, meta


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Save a flat dict of tensors (e.g. optimizer state) as safetensors, atomically."""
    path = Path(path)
    _atomic_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, path,
                 dict(metadata or {}))
    return path


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no tensor file at {path}")
    return load_file(str(path))


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into tensors (safetensors) and JSON-able scalars.

    Returns ``(tensors, scalars)``; tensors are keyed ``"{param_index}.{name}"``.
    """
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        sc = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v
            else:
                sc[name] = v
        scalars["state"][str(idx)] = sc
    return tensors, scalars


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Inverse of ``optimizer_to_tensors``: load the state into ``opt`` (same parameter layout)."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for idx, sc in scalars.get("state", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
