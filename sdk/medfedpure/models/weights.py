"""Safetensors with metadata: the one convention for every weights file the project writes.

A weights file is a safetensors file (no pickles) whose header ``__metadata__`` holds strings
only, as safetensors requires. Two layers use this module:

- plain tensors with string metadata (:func:`save_tensors` / :func:`read_metadata`): optimizer
  state, a federated site's local tensors;
- a whole model (:func:`save_model` / :func:`load_model` / :func:`model_from_bytes`): metadata
  ``kind`` (a :mod:`medfedpure.models.registry` name), ``config`` (the config dataclass as JSON),
  ``format`` (:data:`WEIGHTS_FORMAT`) and any extra entries, each JSON-encoded. The model is
  rebuilt from ``kind`` + ``config`` and its full ``state_dict`` (parameters and persistent
  buffers) is loaded strictly.

:func:`read_metadata` and :func:`model_from_bytes` take bytes as well as paths, so the runtime can
rebuild a model from the verified bytes of a bundle artefact without ever opening a path.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "WEIGHTS_FORMAT",
    "WeightsError",
    "save_tensors",
    "load_tensors",
    "read_metadata",
    "save_model",
    "model_metadata",
    "load_model",
    "model_from_bytes",
]

WEIGHTS_FORMAT = "1"
_RESERVED = ("kind", "config", "format")
_MAX_HEADER = 100_000_000


class WeightsError(ValueError):
    """A weights file is missing, malformed, or does not match the model it claims to hold."""


def _atomic_save(tensors: Mapping[str, Any], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata=dict(metadata))
    os.replace(tmp, path)


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write a flat dict of tensors as safetensors, atomically (temporary file, then rename).

    Every tensor is detached, moved to the CPU, made contiguous and cloned (safetensors refuses
    shared storage such as tied weights). ``metadata`` values must be strings.
    """
    path = Path(path)
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; offending keys {bad[:3]}: json.dumps the values")
    _atomic_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, path, meta)
    return path


def load_tensors(path: str | os.PathLike[str], *, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file (``device``: where to put them)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no tensor file at {path}: check the path")
    return load_file(str(path), device=device)


def _parse_header(head: bytes, where: str) -> dict[str, str]:
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{where}: the safetensors header is not UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{where}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WeightsError(f"{where}: __metadata__ must map strings to strings")
    return dict(meta)


def read_metadata(source: bytes | str | os.PathLike[str]) -> dict[str, str]:
    """The raw ``__metadata__`` (str → str) of a safetensors blob (``bytes``) or file (path).

    The header is read by hand (8-byte little-endian length, then JSON), so a path is read only
    up to the end of its header.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "safetensors bytes"
        if len(data) < 8:
            raise WeightsError(f"{where}: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8 or n > _MAX_HEADER:
            raise WeightsError(f"{where}: header length {n} exceeds the blob ({len(data)} bytes)")
        return _parse_header(data[8:8 + n], where)
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}: train the model first or check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise WeightsError(f"{path} is not a safetensors file: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", first)
        if n > size - 8 or n > _MAX_HEADER:
            raise WeightsError(f"{path} is not a safetensors file: header length {n} exceeds the file")
        return _parse_header(f.read(n), str(path))


def _config_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    raise TypeError(f"config of type {type(cfg).__name__} is not a dataclass: give the model's config object")


def save_model(path: str | os.PathLike[str], model: Any, cfg: Any, kind: str,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s full state dict with ``kind`` and ``cfg`` in the metadata, atomically.

    Args:
        path: destination ``*.safetensors`` file; parent folders are created.
        model: the ``torch.nn.Module``.
        cfg: its config dataclass (saved as JSON under ``config``).
        kind: the registry name that rebuilds it (``"moe"``, ``"mae"``, ``"unet"``).
        extra: more metadata, each value JSON-encoded (e.g. ``{"epoch": 3}``).
    """
    meta = {"kind": kind, "config": json.dumps(_config_dict(cfg), sort_keys=True), "format": WEIGHTS_FORMAT}
    for k, v in (extra or {}).items():
        if k in meta:
            raise ValueError(f"extra metadata key {k!r} is reserved ({_RESERVED}): rename it")
        meta[k] = json.dumps(v)
    return save_tensors(path, model.state_dict(), meta)


def _decode(raw: Mapping[str, str], where: str) -> dict[str, Any]:
    if "kind" not in raw or "config" not in raw:
        raise WeightsError(f"{where} has no 'kind'/'config' metadata: not written by save_model")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in ("kind", "format"):
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{where}: metadata {k!r} is not JSON ({e})") from e
    return out


def model_metadata(source: bytes | str | os.PathLike[str]) -> dict[str, Any]:
    """A saved model's metadata, decoded: ``kind`` and ``format`` (str), ``config`` (dict), extras."""
    where = "safetensors bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    return _decode(read_metadata(source), where)


def _rebuild(meta: Mapping[str, Any], state: Mapping[str, Any], where: str) -> tuple[Any, Any]:
    from medfedpure.models.registry import lookup

    try:
        entry = lookup(meta["kind"])
    except KeyError as e:
        raise WeightsError(f"{where}: {e.args[0]}") from None
    try:
        cfg = entry.config_from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: the saved {entry.name} config is invalid ({e})") from e
    model = entry.build(cfg)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise WeightsError(f"{where}: weights do not match a {entry.name} model with its saved config "
                           f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    return model.eval(), cfg


def load_model(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild a :func:`save_model` file → ``(model in eval mode, cfg, decoded metadata)``."""
    meta = model_metadata(path)
    model, cfg = _rebuild(meta, load_tensors(path, device=str(map_location)), str(path))
    return model, cfg, meta


def model_from_bytes(data: bytes) -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild a :func:`save_model` blob from bytes → ``(model in eval mode, cfg, decoded metadata)``."""
    from safetensors.torch import load as load_bytes

    meta = model_metadata(data)
    try:
        state = load_bytes(bytes(data))
    except Exception as e:  # safetensors raises several types on corrupt data
        raise WeightsError(f"safetensors bytes are not readable: {e}") from e
    model, cfg = _rebuild(meta, state, "safetensors bytes")
    return model, cfg, meta
