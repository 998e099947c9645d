"""Server-side checks on every client update before it reaches the aggregator.

A federated server must not trust what a site sends back: a crashed optimiser (NaN/Inf), a site
running another model version (wrong names or shapes), or a malicious site (a huge update meant to
drag the average, or an inflated example count meant to dominate the weighted average) would
otherwise poison the global model in one round. Every reply is checked against the arrays the
server sent in that round:

1. the reply carries exactly one ArrayRecord with exactly the names that were sent;
2. every array has the shape and a floating dtype of the array that was sent;
3. every value is finite;
4. the update ``Δ = w_reply − w_sent`` has L2 norm (over all tensors together)
   ``‖Δ‖₂ ≤ max_update_norm`` and ``‖Δ‖₂ ≤ max_relative_norm · ‖w_sent‖₂``;
5. the self-reported example count (the aggregation weight) is finite, positive, integral, at most
   ``max_examples`` (when set) and at most the count the site declared when it registered
   (:func:`check_num_examples`);
6. across the round: ``‖Δ‖₂ ≤ max_median_ratio · median_i ‖Δ_i‖₂`` over the updates that passed
   1–5 (:func:`median_norm_rejections`). Unlike the absolute bounds this one is finite by default
   and scales with what honest sites send this round, whatever the model or the learning rate.

A reply that fails is dropped and logged with the reason; the round goes on with the others. The
median bound needs more than half of the updates honest (then the median is an honest norm) and at
least 3 updates (with 2 the median is their mean, and no update exceeds twice it): a minority of
updates far larger than the honest ones is dropped, while an attacker who scales below the bound
still moves an average — robust aggregation (FedMedian / FedTrimmedAvg / Krum, ``strategies.py``)
handles bounded but adversarial updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

LOG = logging.getLogger("medfedpure.fed")

K = TypeVar("K")


#: Default of ``UpdateValidationConfig.max_median_ratio``. Honest sites on non-IID data send updates
#: of different sizes (see benchmarks/RESULTS.md, "Federated training"); a poisoned update must be
#: this many honest medians long to be dropped.
DEFAULT_MEDIAN_RATIO = 3.0


@dataclass(frozen=True)
class UpdateValidationConfig:
    """Bounds for :func:`check_update`, :func:`check_num_examples` and :func:`median_norm_rejections`.

    max_update_norm:   absolute bound on ‖w_reply − w_sent‖₂ over all travelling tensors (> 0;
                       ``inf`` disables it).
    max_relative_norm: bound on ‖w_reply − w_sent‖₂ / ‖w_sent‖₂ (> 0; ``inf`` disables it).
                       One round of local training moves a network by a few percent of its norm;
                       a default of 1.0 (the update as large as the model itself) only rejects
                       updates no honest optimiser produces.
    max_median_ratio:  bound on ‖Δ‖₂ / (median of the round's ‖Δ_i‖₂) (≥ 1; ``inf`` disables it).
                       Finite by default (:data:`DEFAULT_MEDIAN_RATIO`): the bound that catches a
                       sign-flipped or rescaled update whatever the absolute scale of the model.
    max_examples:      cap on a reply's ``num-examples`` (≥ 0; 0: no cap beyond the site's declared
                       count).
    """

    max_update_norm: float = math.inf
    max_relative_norm: float = 1.0
    max_median_ratio: float = DEFAULT_MEDIAN_RATIO
    max_examples: int = 0

    def __post_init__(self) -> None:
        for name in ("max_update_norm", "max_relative_norm"):
            value = getattr(self, name)
            if not (value > 0):  # also catches NaN
                raise ValueError(f"{name}={value!r}: must be > 0 (use math.inf to disable the bound)")
        if not (self.max_median_ratio >= 1.0):  # also catches NaN
            raise ValueError(f"max_median_ratio={self.max_median_ratio!r}: must be >= 1 (the median update "
                             "itself must pass; use math.inf to disable the bound)")
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 0:
            raise ValueError(f"max_examples={self.max_examples!r}: must be an int >= 0 (0: no configured cap)")


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


def check_num_examples(value: object, cfg: UpdateValidationConfig, declared: int | None = None) -> str:
    """Why the self-reported example count ``value`` is unusable as an aggregation weight ("" if it is fine).

    The count weights the site's update in FedAvg (and in Flower's metric averages): ``inf`` would
    turn the aggregate into NaN, a huge count would make one site's update the aggregate. Accepted:
    a finite, positive, integral number (an int or an integral float), at most ``cfg.max_examples``
    when that is set and at most ``declared`` (the count the site registered with) when given.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"num-examples {value!r} is not a number"
    v = float(value)
    if not math.isfinite(v):
        return f"num-examples {v!r} is not finite"
    if v <= 0:
        return f"num-examples {v:g} is not positive"
    if not v.is_integer():
        return f"num-examples {v!r} is not an integer"
    if cfg.max_examples and v > cfg.max_examples:
        return f"num-examples {v:.0f} > max_examples {cfg.max_examples} (raise the configured cap if it is real)"
    if declared is not None and v > declared:
        return f"num-examples {v:.0f} > the {declared} examples the site declared at registration"
    return ""


def median_norm_rejections(norms: Mapping[K, float], cfg: UpdateValidationConfig) -> dict[K, str]:
    """The updates whose norm exceeds ``cfg.max_median_ratio`` × the median of ``norms``, with reasons.

    ``norms`` maps a reply's key (any hashable) to its ‖Δ‖₂, over the round's updates that passed
    the per-update checks. Returns ``{key: reason}`` for those to drop (empty with fewer than 3
    updates, with a zero median or with the bound disabled: the median then says nothing about
    what an honest update looks like).
    """
    if len(norms) < 3 or not math.isfinite(cfg.max_median_ratio):
        return {}
    median = float(np.median(np.fromiter(norms.values(), dtype=np.float64)))
    if not median > 0:
        return {}
    bound = cfg.max_median_ratio * median
    return {
        key: f"update norm {norm:.4g} > max_median_ratio {cfg.max_median_ratio:g} × the round's median {median:.4g}"
        for key, norm in norms.items()
        if norm > bound
    }
