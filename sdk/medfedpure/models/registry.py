"""Model kinds: the one table from a checkpoint's ``kind`` to its config class and model class.

A saved model (``medfedpure.models.weights``) records its ``kind`` and its config as JSON; this
registry says how to turn those back into a module::

    kind    config                                  model
    "moe"   medfedpure.models.moe.MoEConfig          MoEClassifier      (the classifier)
    "mae"   medfedpure.models.mae.MAEConfig          MaskedAutoencoder  (the detector)
    "unet"  medfedpure.models.unet.UNetConfig        UNet               (the purifier's denoiser)
    "detector" medfedpure.models.detector.DetectorConfig AttackDetector (the learned attack detector)

The built-in kinds are imported on first lookup, so importing this module imports no model.
Presets stay with their config classes (``MoEConfig.preset`` …); the registry only rebuilds.
Training (through ``medfedpure.models.weights``) and the torch runtime (rebuilding from a bundle's
verified bytes) both use it, so a kind is added in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelKind", "register", "lookup", "kinds"]


@dataclass(frozen=True)
class ModelKind:
    """How to rebuild one kind of model.

    Attributes:
        name: the ``kind`` string stored in a checkpoint's metadata.
        config_from_dict: the config's JSON dict → the config object (raises ValueError on bad values).
        build: the config object → a freshly initialised ``torch.nn.Module``.
    """

    name: str
    config_from_dict: Callable[[Mapping[str, Any]], Any]
    build: Callable[[Any], Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model kind name {self.name!r}: expected a non-empty string")
        if not callable(self.config_from_dict) or not callable(self.build):
            raise ValueError(f"model kind {self.name!r}: config_from_dict and build must be callables")


_KINDS: dict[str, ModelKind] = {}
_BUILTINS_LOADED = False


def register(name: str, config_from_dict: Callable[[Mapping[str, Any]], Any],
             build: Callable[[Any], Any]) -> ModelKind:
    """Register (or replace) how to rebuild model ``name``; returns the entry."""
    entry = ModelKind(name, config_from_dict, build)
    _KINDS[name] = entry
    return entry


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    from medfedpure.models.detector import AttackDetector, DetectorConfig
    from medfedpure.models.mae import MAEConfig, MaskedAutoencoder
    from medfedpure.models.moe import MoEClassifier, MoEConfig
    from medfedpure.models.unet import UNet, UNetConfig

    for entry in (ModelKind("moe", MoEConfig.from_dict, MoEClassifier),
                  ModelKind("mae", MAEConfig.from_dict, MaskedAutoencoder),
                  ModelKind("unet", UNetConfig.from_dict, UNet),
                  ModelKind("detector", DetectorConfig.from_dict, AttackDetector)):
        _KINDS.setdefault(entry.name, entry)  # an explicit register() before first use wins
    _BUILTINS_LOADED = True


def lookup(name: str) -> ModelKind:
    """The entry for ``name``.

    Raises:
        KeyError: an unknown kind (the message lists the known ones).
    """
    _load_builtins()
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known kinds: {sorted(_KINDS)} "
                       "(register new ones with medfedpure.models.registry.register)") from None


def kinds() -> tuple[str, ...]:
    """The registered kind names, sorted."""
    _load_builtins()
    return tuple(sorted(_KINDS))
