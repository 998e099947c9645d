"""The robustness targets, site by site, from `medfedpure eval` reports — and, with --baseline, the change against
another bundle's reports (the release rule: a candidate worse on any site at any radius is not released).

    python benchmarks/targets.py --report 'runs/w2fed/eval_*/report.json' \
        --baseline 'benchmarks/results/eval/robust5/site?_l*/report.json' --out runs/w2fed/targets.json \
        --figure runs/w2fed/targets.png

Each report gives, for each site it evaluated: clean accuracy through the defence, the paper's classifier-only
point (rung 1 at the paper's radius), the worst rung at each radius (ℓ∞ and ℓ2 reports of the whole ladder) and
certified accuracy
(reports run with --certify-sigmas; at each target radius the best σ). A figure measured by two reports of the
same side is an error (pass one of them); clean accuracy and the paper's point, which every report measures,
are taken from the first report that has them. Every figure carries its budget: a quick one is an upper bound
on robustness and is labelled so. Where both sides recorded each scan's outcome on the same scans (the same data
fingerprint, split and count), the change carries twice its paired standard error; a change below minus that
is marked as a regression. Figures on another number of scans than the baseline's are not compared.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path
from typing import Any

# (key, what, threshold) in the order RESULTS lists them
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("linf 8/255", "worst rung ℓ∞ 8/255", 0.70),
    ("linf 4/255", "worst rung ℓ∞ 4/255", 0.85),
    ("linf 2/255", "worst rung ℓ∞ 2/255", 0.92),
    ("l2 0.5", "worst rung ℓ2 0.5", 0.85),
    ("clean", "clean through the defence", 0.95),
    ("paper", "the paper's classifier-only setting", 0.90),
    ("cert 0.25", "certified ℓ2 r 0.25", 0.80),
    ("cert 0.5", "certified ℓ2 r 0.5", 0.70),
    ("cert 1.0039", "certified ℓ2 r 1.0039", 0.50),
)
CERT_RADII = (0.25, 0.5, 1.0039)
LADDER = {1, 2, 3, 4, 5, 6}


class TargetsError(ValueError):
    """Reports that cannot be combined (a figure measured twice, a file that is no eval report)."""


def _expand(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for p in patterns:
        hits = sorted(glob.glob(p)) or ([p] if Path(p).is_file() else [])
        if not hits:
            raise TargetsError(f"{p!r}: no report matches")
        paths += [Path(h) for h in hits if Path(h) not in paths]
    return paths


def figures(paths: list[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """site → key → {"value", "budget", "source", optional "right_by_scan", "scans"} for one side's reports."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in paths:
        _add(out, path)
    return out


def _add(out: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    rep = json.loads(path.read_text())
    if rep.get("schema") != 1 or "per_site" not in rep:
        raise TargetsError(f"{path} is not a `medfedpure eval` report (schema 1 with per_site)")
    budget = rep["budget"]["name"]
    data = rep.get("data", {})
    scans = (data.get("fingerprint"), data.get("split"))

    def put(site: str, key: str, value: float, first_wins: bool = False, right: list | None = None,
            n: int | None = None, **extra: Any) -> None:
        here = out.setdefault(site, {})
        if key in here:
            if first_wins:
                return
            raise TargetsError(f"site {site}: {key!r} is measured by both {here[key]['source']} and {path}; "
                               "pass one of them")
        entry = {"value": float(value), "budget": budget, "source": str(path), "policy": rep.get("policy"),
                 "bundle": rep["bundle"]["short_id"], "n": n, **extra}
        if right is not None and scans[0]:
            entry.update(right_by_scan=right, scans=[*scans, n])
        here[key] = entry

    # the worst rung counts only from a report that climbed the whole ladder (not from a certification
    # run's or the paper's rung 1 alone)
    ladder = LADDER <= set(rep.get("rungs", ()))
    for site, block in rep["per_site"].items():
        put(site, "clean", block["clean"]["defended_acc"], first_wins=True,
            right=block["clean"].get("right_by_scan"), n=block["n"])
        for row in block["rows"]:
            if row.get("eps_label") == "paper" and row.get("skipped") is None:
                put(site, "paper", row["defended_acc"], first_wins=True, n=block["n"])
        for label, worst in (block.get("worst_rung", {}) if ladder else {}).items():
            put(site, f"{rep['norm']} {label}", worst["robust_acc"], right=worst.get("right_by_scan"),
                n=block["n"], rung=worst["rung"])
    for site, cert in rep.get("certified", {}).items():
        for sigma, c in cert["per_sigma"].items():
            for radius, acc in zip(c["radii"], c["certified_acc"], strict=True):
                r = next((t for t in CERT_RADII if math.isclose(radius, t, abs_tol=1e-6)), None)
                if r is not None:  # one entry per σ; the comparison takes each radius's best σ
                    put(site, f"cert {r:g} @{float(sigma):g}", acc, n=len(c["scans"]) if "scans" in c else None,
                        sigma=float(sigma), draws=cert["n"])


def _paired(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Twice the paired standard error of a − b, when both recorded every scan of the same scans."""
    ra, rb = a.get("right_by_scan"), b.get("right_by_scan")
    if ra is None or rb is None or a.get("scans") != b.get("scans") or len(ra) != len(rb) or len(ra) < 2:
        return None
    d = [x - y for x, y in zip(ra, rb, strict=True)]
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / (len(d) - 1)
    return 2.0 * math.sqrt(var / len(d))


def _best(site: dict[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The site's figure for ``key``; for a certified radius, the best σ's."""
    if not key.startswith("cert "):
        return site.get(key)
    found = [f for k, f in site.items() if k.startswith(key + " @")]
    return max(found, key=lambda f: f["value"]) if found else None


def compare(cand: dict, base: dict | None) -> dict[str, Any]:
    """Per target: each site's figure, whether it is met, and the change against the baseline."""
    sites = sorted(cand, key=int)
    rows = []
    for key, what, threshold in TARGETS:
        cells = {}
        for s in sites:
            f = _best(cand[s], key)
            if f is None:
                continue
            cell = {"value": f["value"], "met": f["value"] >= threshold, "budget": f["budget"]}
            if "sigma" in f:
                cell["sigma"] = f["sigma"]
            b = _best((base or {}).get(s, {}), key)
            if b is not None and None not in (f["n"], b["n"]) and f["n"] != b["n"]:
                cell["baseline_n_differs"] = [f["n"], b["n"]]  # not comparable: another number of scans
            elif b is not None:
                cell["baseline"] = b["value"]
                cell["change"] = f["value"] - b["value"]
                se2 = _paired(f, b)
                cell["two_se"] = se2
                cell["regression"] = cell["change"] < (-se2 if se2 is not None else 0.0)
            cells[s] = cell
        if cells:
            rows.append({"key": key, "target": what, "threshold": threshold, "sites": cells})
    return {"sites": sites, "rows": rows,
            "regressions": [(r["key"], s) for r in rows for s, c in r["sites"].items() if c.get("regression")]}


def markdown(res: dict[str, Any]) -> str:
    sites = res["sites"]
    lines = [f"| target | {' / '.join(f'site {s}' for s in sites)} | met? |", "|---|---|---|"]
    for r in res["rows"]:
        parts, met = [], []
        for s in sites:
            c = r["sites"].get(s)
            if c is None:
                parts.append("–")
                continue
            txt = f"{100 * c['value']:.1f}"
            if "sigma" in c:
                txt += f" (σ {c['sigma']:g})"
            if c["budget"] != "full" and not r["key"].startswith(("clean", "cert")):
                txt += "*"
            if "baseline_n_differs" in c:
                txt += f" (baseline on {c['baseline_n_differs'][1]} scans, not {c['baseline_n_differs'][0]})"
            if "change" in c:
                se = "" if c["two_se"] is None else f" ± {100 * c['two_se']:.1f}"
                txt += f" ({100 * c['change']:+.1f}{se}{' ⚠' if c['regression'] else ''})"
            parts.append(txt)
            if c["met"]:
                met.append(s)
        short = [f"{s} by {100 * (r['threshold'] - r['sites'][s]['value']):.1f}" for s in sites
                 if s in r["sites"] and not r["sites"][s]["met"]]
        named = f"site{'s' if len(met) > 1 else ''} {', '.join(met)}" if met else "no site"
        verdict = ("every site" if len(met) == len(sites) else named) if not short else f"{named}; short: {', '.join(short)}"
        lines.append(f"| {r['target']} ≥ {100 * r['threshold']:.0f} % | {' / '.join(parts)} % | {verdict} |")
    lines.append("")
    lines.append("`*` quick budget (an upper bound on robustness). In parentheses: the change against the baseline, "
                 "± twice its paired standard error where both sides recorded every scan; ⚠ a regression.")
    return "\n".join(lines)


def figure(res: dict[str, Any], path: Path, labels: tuple[str, str] = ("candidate", "baseline")) -> Path:
    """One panel per target: each site's figure as a bar (beside the baseline's, with ± twice the paired standard
    error where known), the target as a dashed line, a hatched bar where an attack ran at the quick budget (an upper bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    if not rows:
        raise TargetsError("no target has a figure: nothing to plot")
    sites = res["sites"]
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    has_base = any("baseline" in c for r in rows for c in r["sites"].values())
    width = 0.38 if has_base else 0.6
    for ax, r in zip(axes.flat, rows, strict=False):
        xs = range(len(sites))
        vals = [100 * r["sites"][s]["value"] if s in r["sites"] else math.nan for s in sites]
        # clean and certified accuracy do not depend on the attack's budget (as in the table's `*`)
        quick = [s in r["sites"] and r["sites"][s]["budget"] != "full" and not r["key"].startswith(("clean", "cert"))
                 for s in sites]
        # ± twice the paired standard error only where it is known (no bar otherwise)
        err = [100 * r["sites"][s]["two_se"] if r["sites"].get(s, {}).get("two_se") is not None else math.nan
               for s in sites]
        off = -width / 2 if has_base else 0.0
        bars = ax.bar([x + off for x in xs], vals, width, yerr=err if has_base else None, capsize=3,
                      color=["tab:green" if r["sites"].get(s, {}).get("met") else "tab:red" for s in sites],
                      label=labels[0])
        for bar, q in zip(bars, quick, strict=True):
            if q:
                bar.set_hatch("//")
        if has_base:
            base = [100 * r["sites"][s]["baseline"] if "baseline" in r["sites"].get(s, {}) else math.nan
                    for s in sites]
            ax.bar([x + width / 2 for x in xs], base, width, color="0.7", label=labels[1])
        ax.axhline(100 * r["threshold"], color="k", ls="--", lw=1)
        ax.set_xticks(list(xs), [f"site {s}" for s in sites])
        ax.set_ylim(0, 100)
        ax.set_title(f"{r['target']} ≥ {100 * r['threshold']:.0f} %", fontsize=9)
        ax.set_ylabel("%")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("targets by site (green: met, red: missed; hatched: quick budget, an upper bound; dashed: target)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="append", required=True, help="Report(s) of the candidate (glob patterns).")
    ap.add_argument("--baseline", action="append", default=[], help="Report(s) of the bundle to compare with.")
    ap.add_argument("--out", type=Path, help="Write the comparison as JSON here.")
    ap.add_argument("--figure", type=Path, help="Draw the targets by site (PNG) here.")
    a = ap.parse_args(argv)
    try:
        cand = figures(_expand(a.report))
        base = figures(_expand(a.baseline)) if a.baseline else None
    except (TargetsError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}")
        return 2
    res = compare(cand, base)
    print(markdown(res))
    if base is not None:
        print(f"\nregressions: {res['regressions'] or 'none'}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")
    if a.figure:
        print(f"wrote {figure(res, a.figure)}")
    return 1 if res["regressions"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
