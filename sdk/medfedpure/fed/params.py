"""Which tensors travel to the server and which stay at the site.

Split policies (``split`` argument), over a model's ``state_dict()``:

======== ================================================================================
"all"    every floating tensor travels (FedAvg of one global model; MAE, purifier).
"fedbn"  everything but the normalisation layers travels: BatchNorm / GroupNorm / LayerNorm /
         InstanceNorm affine parameters and running statistics stay local (FedBN, Li et al.
         ICLR 2021).
"moe"    only the global expert travels (``model.global_state_dict()`` of
         ``models.moe.MoEClassifier``), minus normalisation running statistics; the local
         expert, the gate and all normalisation statistics stay at the site.
"none"   nothing travels (local-only training).
======== ================================================================================

Integer tensors (e.g. BatchNorm ``num_batches_tracked``) never travel: averaging a counter has no
meaning, and they would come back as floats.

Local tensors are kept in ``context.state`` (an ArrayRecord per phase) and written to
``SITE_DIR/<phase>_local.safetensors`` after each round, so a site restarted mid-federation
(deployment runtime: ``context.state`` is in memory only) resumes with its own local expert.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn

from medfedpure.models.weights import load_tensors, read_metadata, save_tensors

SPLITS = ("all", "fedbn", "moe", "none")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _norm_entries(model: nn.Module) -> set[str]:
    """state_dict names owned by normalisation modules (affine params and running stats)."""
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(prefix + p_name)
            for b_name, _ in mod.named_buffers(recurse=False):
                names.add(prefix + b_name)
    return names


def travelling_names(model: nn.Module, split: str) -> list[str]:
    """Sorted state_dict names that go to the server under policy ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    state = model.state_dict()
    floating = {k for k, v in state.items() if v.is_floating_point()}
    if split == "none":
        return []
    if split == "all":
        return sorted(floating)
    if split == "fedbn":
        return sorted(floating - _norm_entries(model))
    if not hasattr(model, "global_state_dict"):
        raise ValueError(f"split 'moe' needs a model with global_state_dict(); {type(model).__name__} has none")
    global_names = set(model.global_state_dict().keys())
    unknown = global_names - set(state)
    if unknown:
        raise ValueError(f"global_state_dict() names not in state_dict(): {sorted(unknown)[:3]}")
    stats = {k for k in global_names if k.rsplit(".", 1)[-1] in _STAT_SUFFIXES}
    return sorted((global_names & floating) - stats)


def local_names(model: nn.Module, split: str) -> list[str]:
    """Sorted state_dict names that stay at the site (the complement of :func:`travelling_names`)."""
    travel = set(travelling_names(model, split))
    return sorted(k for k in model.state_dict() if k not in travel)


def get_travelling(model: nn.Module, split: str) -> ArrayRecord:
    """The travelling tensors as an ArrayRecord (copies; CPU)."""
    state = model.state_dict()
    return ArrayRecord({k: state[k].detach().cpu().clone() for k in travelling_names(model, split)})


def set_travelling(model: nn.Module, arrays: ArrayRecord, split: str) -> None:
    """Load the server's tensors into ``model``; names must match the policy exactly."""
    expected = set(travelling_names(model, split))
    got = set(arrays.keys())
    if got != expected:
        raise ValueError(
            f"server sent {len(got)} tensors, the '{split}' split expects {len(expected)}: "
            f"missing {sorted(expected - got)[:3]}, unexpected {sorted(got - expected)[:3]} — "
            "server and site must run the same model config"
        )
    sd = arrays.to_torch_state_dict()
    model.load_state_dict(sd, strict=False)


def get_local(model: nn.Module, split: str) -> dict[str, torch.Tensor]:
    """The site-local tensors (copies; CPU, contiguous)."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().contiguous().clone() for k in local_names(model, split)}


def set_local(model: nn.Module, tensors: dict[str, torch.Tensor], split: str) -> None:
    """Restore site-local tensors; names must match the policy exactly."""
    expected = set(local_names(model, split))
    if set(tensors) != expected:
        raise ValueError(
            f"saved local state has names {sorted(set(tensors) ^ expected)[:3]} that do not match the model's "
            f"'{split}' local part — delete the site's *_local.safetensors to start the site afresh"
        )
    own = model.state_dict()
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"saved local tensor {k!r} has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}: "
                "it was written for another model config — delete the site's *_local.safetensors"
            )
    model.load_state_dict(tensors, strict=False)


def save_local(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
    """Write local tensors as safetensors (metadata: JSON under "medfedpure"), atomically."""
    save_tensors(path, tensors, {"medfedpure": json.dumps(meta, sort_keys=True)})


def load_local(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read tensors written by :func:`save_local` → (tensors, metadata dict)."""
    raw = read_metadata(path).get("medfedpure", "{}")
    return load_tensors(path), json.loads(raw)


def load_local_metadata(path: Path) -> dict[str, object]:
    """The metadata :func:`save_local` wrote, without reading the tensors."""
    return json.loads(read_metadata(path).get("medfedpure", "{}"))


def to_arrayrecord(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Local tensors → ArrayRecord for ``context.state``."""
    return ArrayRecord({k: v for k, v in tensors.items()})


def from_arrayrecord(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord from ``context.state`` → tensors."""
    return dict(arrays.to_torch_state_dict())
