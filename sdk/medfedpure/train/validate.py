"""Range checks shared by the training-job configs (frozen dataclasses that validate themselves)."""

from __future__ import annotations

from typing import Any

__all__ = ["freeze_tuples", "require_at_least", "require_non_negative", "require_positive"]


def require_at_least(cfg: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    """Raise ``ValueError`` naming the first field of ``names`` below ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"{name}={value}: must be >= {minimum}")


def require_positive(cfg: Any, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first field of ``names`` that is not > 0 (NaN included)."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"{name}={value}: must be > 0")


def require_non_negative(cfg: Any, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first field of ``names`` that is negative (or NaN)."""
    for name in names:
        value = getattr(cfg, name)
        if not value >= 0:
            raise ValueError(f"{name}={value}: must be >= 0")


def freeze_tuples(cfg: Any, names: tuple[str, ...]) -> None:
    """Turn list-valued fields (e.g. from JSON) into tuples, so the frozen config stays hashable."""
    for name in names:
        if isinstance(getattr(cfg, name), list):
            object.__setattr__(cfg, name, tuple(getattr(cfg, name)))
