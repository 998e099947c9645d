"""Which purification policy a bundle ships, decided from ``medfedpure eval`` reports, with the reason.

The gate's policy is ``adaptive`` (only flagged scans are purified; the rest take the early exit) or
``floor`` (every scan is purified, at t* ≥ t_min). ``floor`` costs the purified path's latency on every
scan, so it is chosen only where the evaluation shows it buys robustness. The rule, applied to one
report per policy for the same bundle, data, sites, norm, radii and attack budget:

- ``gain``: floor's worst-rung accuracy minus adaptive's at the largest radius evaluated, in points;
- ``margin``: the larger of ``min_gain`` (default 2 points) and twice the standard error of that
  difference over the ``n`` judged scans. Both reports judge the same scans in the same order (same data
  fingerprint, sites, split and limit), so when both carry the per-scan headline (``right_by_scan``, written
  by ``medfedpure eval`` since it records the data fingerprint) the error is the paired one, sd(f_i − a_i)/√n;
  otherwise (older reports) the independent-samples √(p_a(1 − p_a)/n + p_f(1 − p_f)/n), which over-states
  it — a conservative rule;
- floor is chosen when ``gain ≥ margin`` and at no radius, nor on clean scans, does floor lose more than
  ``margin``; otherwise adaptive.

A report at the ``quick`` budget (fewer attack steps and EOT draws than the protocol's ``full``) is an upper
bound on robustness, so it decides only with ``allow_quick``; the choice then records its budget. The
decision is a :class:`PolicyChoice`: the policy, the reason in words and the evidence (each report's sha256,
budget and numbers) that ``medfedpure bundle choose-policy`` records in the new bundle's provenance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["POLICIES", "PolicyChoice", "PolicyChoiceError", "PolicyReport", "choose_policy"]

POLICIES = ("adaptive", "floor")


class PolicyChoiceError(ValueError):
    """The reports cannot decide the policy (missing, mismatched or malformed); the message says which."""


@dataclass(frozen=True)
class PolicyReport:
    """One ``medfedpure eval`` report (``report.json``), where it came from and its sha256."""

    path: str
    sha256: str
    report: Mapping[str, Any]


@dataclass(frozen=True)
class PolicyChoice:
    """The policy chosen, why (one sentence with the numbers), the rule's parameters and the evidence."""

    policy: str
    reason: str
    budget: str
    rule: Mapping[str, Any] = field(default_factory=dict)
    evidence: Sequence[Mapping[str, Any]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "reason": self.reason, "budget": self.budget, "rule": dict(self.rule),
                "evidence": [dict(e) for e in self.evidence]}


def _summary(r: PolicyReport) -> dict[str, Any]:
    """The numbers the rule reads from one report (refusing a report without them)."""
    rep = r.report
    try:
        pooled = rep["pooled"]
        out = {
            "report": r.path, "sha256": r.sha256, "policy": str(rep["policy"]), "bundle_id": str(rep["bundle"]["id"]),
            "budget": str(rep["budget"]["name"]), "full_budget": bool(rep["budget"].get("full", False)),
            "scan_limit": int(rep["budget"].get("limit", 0) or 0),
            "norm": str(rep["norm"]), "eps": [str(e) for e in rep["eps_labels"]],
            "eps_values": [float(e) for e in rep["eps"]], "sites": [int(s) for s in rep["sites"]],
            "split": str(rep["data"]["split"]), "data_fingerprint": rep["data"].get("fingerprint"),
            "n": int(pooled["n"]), "clean": float(pooled["clean"]["defended_acc"]),
            "worst_rung": {str(k): float(v["robust_acc"]) for k, v in pooled["worst_rung"].items()},
            "right_by_scan": {str(k): v.get("right_by_scan") for k, v in pooled["worst_rung"].items()},
            "latency_ms_total": (rep.get("latency_ms") or {}).get("total"),
            "sanity_passed": (rep.get("sanity") or {}).get("passed"),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyChoiceError(f"{r.path}: not a medfedpure eval report.json (missing or malformed {exc})") from exc
    if out["policy"] not in POLICIES:
        raise PolicyChoiceError(f"{r.path}: policy {out['policy']!r}, expected one of {', '.join(POLICIES)}")
    missing = [e for e in out["eps"] if e not in out["worst_rung"]]
    if len(out["eps_values"]) != len(out["eps"]):
        raise PolicyChoiceError(f"{r.path}: {len(out['eps'])} radius labels for {len(out['eps_values'])} radii")
    if missing or not out["eps"] or out["n"] < 1:
        raise PolicyChoiceError(f"{r.path}: no worst-rung accuracy for {missing or 'any radius'} (n={out['n']})")
    return out


def _points(x: float) -> float:
    return round(100.0 * x, 2)


def choose_policy(reports: Sequence[PolicyReport], *, min_gain: float = 2.0, allow_quick: bool = False,
                  bundle_id: str | None = None) -> PolicyChoice:
    """The policy the reports support (module docstring), for the bundle ``bundle_id`` when given.

    Args:
        reports: exactly one report per policy (adaptive and floor), of the same bundle, split, data set
            (when both record its fingerprint), sites, norm, radii and budget.
        min_gain: the smallest worst-rung gain, in points, that justifies purifying every scan (≥ 0).
        allow_quick: accept reports below the full budget (their choice is then provisional; recorded).
        bundle_id: the bundle the choice is for: every report must be of it.

    Raises:
        PolicyChoiceError: a missing or repeated policy, reports that differ in what they measured, a report of
            another bundle, a failed sanity check, or a quick budget without ``allow_quick``.
    """
    if not (min_gain >= 0 and math.isfinite(min_gain)):
        raise PolicyChoiceError(f"min_gain={min_gain}: a number of points >= 0")
    rows = [_summary(r) for r in reports]
    by_policy: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["policy"] in by_policy:
            raise PolicyChoiceError(f"two reports for policy {row['policy']}: {by_policy[row['policy']]['report']} and "
                                    f"{row['report']}; give one per policy")
        by_policy[row["policy"]] = row
    absent = [p for p in POLICIES if p not in by_policy]
    if absent:
        raise PolicyChoiceError(f"no report for policy {', '.join(absent)}: run `medfedpure eval --policy "
                                f"{absent[0]} …` with the other report's options")
    a, f = by_policy["adaptive"], by_policy["floor"]
    for key in ("bundle_id", "budget", "scan_limit", "norm", "eps", "sites", "split"):
        if a[key] != f[key]:
            raise PolicyChoiceError(f"the reports differ in {key}: {a[key]!r} ({a['report']}) vs {f[key]!r} "
                                    f"({f['report']}); compare like with like")
    if a["data_fingerprint"] and f["data_fingerprint"] and a["data_fingerprint"] != f["data_fingerprint"]:
        raise PolicyChoiceError(f"the reports were made on different data sets (fingerprints "
                                f"{a['data_fingerprint'][:12]}… vs {f['data_fingerprint'][:12]}…)")
    if a["n"] != f["n"]:
        raise PolicyChoiceError(f"the reports judged different numbers of scans ({a['n']} vs {f['n']})")
    if bundle_id is not None and a["bundle_id"] != bundle_id:
        raise PolicyChoiceError(f"the reports are of bundle {a['bundle_id'][:16]}…, not of {bundle_id[:16]}…")
    for row in (a, f):
        if row["sanity_passed"] is False:
            raise PolicyChoiceError(f"{row['report']}: its sanity checks failed; an evaluation that failed them "
                                    "decides nothing")
    full = a["full_budget"] and f["full_budget"]
    if not full and not allow_quick:
        raise PolicyChoiceError(f"the reports are at the {a['budget']!r} budget, an upper bound on robustness; run "
                                "`medfedpure eval --budget full` (or accept a provisional choice: allow_quick, --allow-quick on the command line)")
    n = a["n"]
    top = a["eps"][max(range(len(a["eps"])), key=lambda i: a["eps_values"][i])]  # the largest radius
    pa, pf = a["worst_rung"][top], f["worst_rung"][top]
    ra, rf = a["right_by_scan"].get(top), f["right_by_scan"].get(top)
    paired = (bool(a["data_fingerprint"]) and a["data_fingerprint"] == f["data_fingerprint"]
              and isinstance(ra, list) and isinstance(rf, list) and len(ra) == len(rf) == n and n > 1)
    if paired:
        d = [float(x) - float(y) for x, y in zip(rf, ra, strict=True)]
        mean = sum(d) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)
    else:
        se = math.sqrt(pa * (1 - pa) / n + pf * (1 - pf) / n)
    margin = max(min_gain, _points(2 * se))
    gain = _points(pf - pa)
    losses = {e: _points(a["worst_rung"][e] - f["worst_rung"][e]) for e in a["eps"]}
    losses["clean"] = _points(a["clean"] - f["clean"])
    worst_loss_at, worst_loss = max(losses.items(), key=lambda kv: kv[1])
    floor_wins = gain >= margin and worst_loss <= margin
    budget = a["budget"] if full else f"{a['budget']}, provisional"
    nums = (f"worst rung at {top}: floor {_points(pf)} % vs adaptive {_points(pa)} % on {n} scans "
            f"(gain {gain:+.2f} points, margin {margin:.2f}, {'paired' if paired else 'unpaired'} error)")
    if floor_wins:
        reason = (f"floor: purifying every scan raises the {a['norm']} worst rung by at least the margin — {nums}; "
                  f"its largest loss elsewhere is {worst_loss:.2f} points ({worst_loss_at}); {budget} budget")
    elif gain >= margin:
        reason = (f"adaptive: floor's gain at {top} is offset by a loss of {worst_loss:.2f} points "
                  f"({worst_loss_at}) beyond the margin — {nums}; {budget} budget")
    else:
        reason = (f"adaptive: purifying every scan does not buy robustness beyond the margin — {nums}; the early "
                  f"exit keeps unflagged scans at the classifier's latency; {budget} budget")
    evidence = [{k: row[k] for k in ("report", "sha256", "policy", "budget", "full_budget", "n", "clean",
                                      "worst_rung", "latency_ms_total", "data_fingerprint")} for row in (a, f)]
    rule = {"min_gain_points": min_gain, "margin_points": margin, "gain_points": gain, "radius": top,
            "paired": paired,
            "largest_loss_points": worst_loss, "largest_loss_at": worst_loss_at, "norm": a["norm"],
            "sites": a["sites"], "split": a["split"]}
    return PolicyChoice("floor" if floor_wins else "adaptive", reason, budget, rule, evidence)
