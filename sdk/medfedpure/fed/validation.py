"""Server-side checks on every client update before it reaches the aggregator.

A federated server must not trust what a site sends back: a crashed optimiser (NaN/Inf), a site
running another model version (wrong names or shapes), or a malicious site (a huge update meant to
drag the average) would otherwise poison the global model in one round. Every reply is checked
against the arrays the server sent in that round:

1. the reply carries exactly one ArrayRecord with exactly the names that were sent;
2. every array has the shape and a floating dtype of the array that was sent;
3. every value is finite;
4. the update ``Δ = w_reply − w_sent`` has L2 norm (over all tensors together)
   ``‖Δ‖₂ ≤ max_update_norm`` and ``‖Δ‖₂ ≤ max_relative_norm · ‖w_sent‖₂``.

A reply that fails is dropped and logged with the reason; the round goes on with the others. The
norm bound is a coarse first line; robust aggregation (FedMedian / FedTrimmedAvg / Krum,
``strategies.py``) handles bounded but adversarial updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

LOG = logging.getLogger("medfedpure.fed")


@dataclass(frozen=True)
class UpdateValidationConfig:
    """Bounds for :func:`check_update`.

    max_update_norm:   absolute bound on ‖w_reply − w_sent‖₂ over all travelling tensors (> 0;
                       ``inf`` disables it).
    max_relative_norm: bound on ‖w_reply − w_sent‖₂ / ‖w_sent‖₂ (> 0; ``inf`` disables it).
                       One round of local training moves a network by a few percent of its norm;
                       a default of 1.0 (the update as large as the model itself) only rejects
                       updates no honest optimiser produces.
    """

    max_update_norm: float = math.inf
    max_relative_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_update_norm", "max_relative_norm"):
            value = getattr(self, name)
            if not (value > 0):  # also catches NaN
                raise ValueError(f"{name}={value!r}: must be > 0 (use math.inf to disable the bound)")


@dataclass(frozen=True)
class UpdateCheck:
    """Outcome of :func:`check_update`: ``ok`` and, when not ok, the reason; the norms measured."""

    ok: bool
    reason: str = ""
    update_norm: float = float("nan")
    relative_norm: float = float("nan")


def check_update(
    sent: Mapping[str, np.ndarray],
    reply: Mapping[str, np.ndarray],
    cfg: UpdateValidationConfig,
) -> UpdateCheck:
    """Check one client's reply ``reply`` against the arrays ``sent`` to it this round.

    Both map tensor names to arrays of any shape. Returns an :class:`UpdateCheck`; never raises on
    bad client data (a bad update is a normal event for the server).
    """
    missing = sorted(set(sent) - set(reply))
    extra = sorted(set(reply) - set(sent))
    if missing or extra:
        return UpdateCheck(False, f"tensor names differ from the global model: missing {missing[:3]}, unexpected {extra[:3]}")
    sq_delta = 0.0
    sq_ref = 0.0
    for name, ref in sent.items():
        arr = np.asarray(reply[name])
        ref = np.asarray(ref)
        if arr.shape != ref.shape:
            return UpdateCheck(False, f"tensor {name!r} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype.kind != ref.dtype.kind:
            return UpdateCheck(False, f"tensor {name!r} has dtype {arr.dtype}, expected {ref.dtype}")
        if arr.dtype.kind not in "fc":
            # Integer buffers (e.g. BatchNorm's num_batches_tracked) are compared exactly-typed only.
            continue
        if not np.isfinite(arr).all():
            return UpdateCheck(False, f"tensor {name!r} has {int((~np.isfinite(arr)).sum())} non-finite values")
        d = arr.astype(np.float64) - ref.astype(np.float64)
        sq_delta += float(np.dot(d.ravel(), d.ravel()))
        sq_ref += float(np.dot(ref.ravel().astype(np.float64), ref.ravel().astype(np.float64)))
    norm = math.sqrt(sq_delta)
    rel = norm / math.sqrt(sq_ref) if sq_ref > 0 else (0.0 if norm == 0 else math.inf)
    if norm > cfg.max_update_norm:
        return UpdateCheck(False, f"update norm {norm:.4g} > max_update_norm {cfg.max_update_norm:.4g}", norm, rel)
    if rel > cfg.max_relative_norm:
        return UpdateCheck(
            False, f"relative update norm {rel:.4g} > max_relative_norm {cfg.max_relative_norm:.4g}", norm, rel
        )
    return UpdateCheck(True, "", norm, rel)
