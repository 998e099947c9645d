"""The files of an evaluation report: ``report.md`` and the figures (``report.json`` is written by the runner).

``report.md`` opens with the sanity checks (a failed one first, in bold), then the setting (bundle,
data, budget, paper settings), clean numbers, one table per site and pooled (robust accuracy per rung
and ε, undefended beside defended, flag rate, AUROC, TPR at 1 % / 5 % false-flag rate), the worst rung
per ε, latency and wall time, and the certified accuracy when asked for. Figures (matplotlib, Agg):
``robust_accuracy.png`` (defended accuracy vs ε per rung, pooled; rung 1 undefended dashed),
``examples.png`` (clean / adversarial / perturbation × k / purified, at the largest ε of rung 2) and
``certified.png`` (certified accuracy vs ℓ2 radius per σ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report", "markdown"]


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _sanity_lines(s: dict[str, Any]) -> list[str]:
    head = ("**Sanity checks: all passed.**" if s["passed"] else
            "**SANITY CHECKS FAILED: the robust accuracies below are not trustworthy until the failing "
            "checks are understood.**")
    lines = [head, "", "| check | result | rule | values |", "|---|---|---|---|"]
    order = sorted(s["checks"], key=lambda c: {False: 0, None: 2}.get(c["passed"], 1))
    for c in order:
        res = {True: "pass", False: "**FAIL**", None: "skipped"}[c["passed"]]
        vals = {k: v for k, v in c.items() if k not in ("name", "passed", "rule")}
        lines.append(f"| {c['name']} | {res} | {c['rule']} | `{_compact(vals)}` |")
    return lines


def _compact(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_compact(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_compact(x) for x in v) + "]"
    return str(v)


def _table(block: dict[str, Any]) -> list[str]:
    c = block["clean"]
    lines = [f"n = {block['n']} scans. Clean: classifier alone {_pct(c['undefended_acc'])}, through the defence "
             f"{_pct(c['defended_acc'])} (± {_pct(c['defended_acc_std'])} over runs), flag rate {_pct(c['flag_rate'])}.",
             "", "| rung | attack | ε | undefended acc | defended acc | worst of runs | flagged | right or flagged "
             "| AUROC | TPR@1% | TPR@5% | attack s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in block["rows"]:
        if r.get("skipped") is not None:
            lines.append(f"| {r['rung']} | {r['attack']} | {r['eps_label']} | skipped: {r['skipped']} "
                         "| | | | | | | | |")
            continue
        acc = f"**{_pct(r['robust_acc'])}**" if r["rung"] == 5 else _pct(r["defended_acc"])
        lines.append(f"| {r['rung']} | {r['attack']} | {r['eps_label']} | {_pct(r['undefended_acc'])} | {acc} | "
                     f"{_pct(r['defended_acc_worst_of_runs'])} | {_pct(r['flag_rate'])} | "
                     f"{_pct(r.get('right_or_flagged'))} | {_num(r.get('auroc'))} | "
                     f"{_pct(r.get('tpr@1%'))} | {_pct(r.get('tpr@5%'))} | {r['attack_s']:.1f} |")
    if block["worst_rung"]:
        lines += ["", "Worst rung per ε: " + "; ".join(
            f"{e}: rung {w['rung']} ({w['attack']}) {_pct(w['robust_acc'])}" for e, w in block["worst_rung"].items())]
    if block.get("worst_rung_right_or_flagged"):
        lines += ["", "Worst rung per ε, a flag read as \"send to a reader\" (right or flagged; the clean flag rate "
                  "above is what the readers pay): " + "; ".join(
                      f"{e}: rung {w['rung']} ({w['attack']}) {_pct(w['right_or_flagged'])}"
                      for e, w in block["worst_rung_right_or_flagged"].items())]
    by_class = class_summary(block)
    if by_class:
        lines += ["", f"Within each true class (through the defence): {by_class}"]
    by_lesion = lesion_summary(block)
    if by_lesion:
        lines += ["", f"Tumours called tumours, by lesion kind (synthetic data; through the defence): {by_lesion}"]
    return lines


def lesion_summary(block: dict[str, Any]) -> str | None:
    """One line of the block's sensitivity within each lesion kind of the synthetic generator (conspicuous,
    small, faint): clean, then each ε's worst rung per kind; None without lesion kinds (real data)."""
    if not block.get("worst_rung_by_lesion") and not block["clean"].get("defended_acc_by_lesion"):
        return None
    n = block.get("lesion_counts", {})

    def per_kind(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {_pct(a)}" + (f" (of {n[k]})" if k in n else "") for k, a in d.items())
    parts = [f"clean {per_kind(block['clean'].get('defended_acc_by_lesion', {}))}"]
    parts += [f"worst rung {e}: {per_kind(per)}" for e, per in block.get("worst_rung_by_lesion", {}).items()]
    return "; ".join(parts)


def class_summary(block: dict[str, Any]) -> str | None:
    """One line of a site's (or the pooled) block within each true class: clean accuracy through the defence,
    then each ε's worst rung per class — what report.md and the terminal summary print; None when the block
    has no per-class figures (a report written before they existed)."""
    if not block.get("worst_rung_by_class"):
        return None
    def per_class(d: dict[str, float]) -> str:
        return ", ".join(f"{cls} {_pct(a)}" for cls, a in d.items())
    parts = [f"clean {per_class(block['clean'].get('defended_acc_by_class', {}))}"]
    parts += [f"worst rung {e}: {per_class(per)}" for e, per in block["worst_rung_by_class"].items()]
    return "; ".join(parts)


def _device_line(m: dict[str, Any]) -> str:
    """The evaluation device and the judged Defender's engine, as report.md's setting states them."""
    dev = m.get("device", "cpu")
    where = f"**{dev}**" + (f" ({m['gpu']}, {m.get('gpu_memory_gib')} GiB, CUDA {m.get('cuda')})" if m.get("gpu") else "")
    e = m.get("defender")
    judged = f"; judged Defender: {e['backend']} on {e['device']} ({e['precision']})" if e else ""
    return f"{where} for the attacks, surrogate attacks and certification{judged}"


def markdown(rep: dict[str, Any]) -> str:
    """report.md's text from the report dict."""
    b = rep["budget"]
    lines = ["# medfedpure eval report", ""] + _sanity_lines(rep["sanity"]) + [""]
    lines += [
        "## Setting", "",
        f"- bundle `{rep['bundle']['short_id']}` ({rep['bundle']['path']}), backend {rep['backend']}, policy "
        f"{rep['policy']}, purifier steps {rep['purifier_steps']}",
        f"- data {rep['data']['root']} ({rep['data']['kind']}), split {rep['data']['split']}, sites "
        f"{rep['sites']}",
        f"- norm {rep['norm']}, ε {', '.join(rep['eps_labels'])} ({rep['eps_units']}); rungs {rep['rungs']}; "
        f"seed {rep['seed']}",
        f"- budget **{b['name']}**{'' if b['full'] else ' (reduced)'}: {b['steps']} steps, EOT {b['eot']} "
        f"(APGD {b['eot_apgd']}), R = {b['repeats']} judged runs per scan, "
        f"{'every scan' if not b['limit'] else 'first ' + str(b['limit']) + ' scans'} per site, sanity checks "
        f"on at most {b['sanity_scans']} scans of the first site",
        f"- rung 1 (paper): {rep['paper']['attack']}, {rep['paper']['steps']} steps, plus its own ε = "
        f"{rep['paper']['eps']} ℓ∞",
        f"- device {_device_line(rep.get('machine', {}))}",
        f"- wall time {rep['wall_s']:.0f} s; latency per scan (median, ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in rep["latency_ms"].items()),
        f"- command: `{rep['command']}`" if rep["command"] else "",
    ]
    for site, info in rep.get("surrogate", {}).items():
        how = (f"trained here ({info['preset']}, {info['epochs']} epochs, seed {info['seed']}, "
               f"{info['train_s']:.1f} s)" if info.get("trained_here") else "given")
        lines.append(f"- rung 6 surrogate, site {site}: {how}: {info['source']}")
    for site, block in rep["per_site"].items():
        lines += ["", f"## Site {site}", ""] + _table(block)
    if len(rep["per_site"]) > 1:
        lines += ["", "## Pooled over sites", ""] + _table(rep["pooled"])
    for site, cert in rep.get("certified", {}).items():
        lines += ["", f"## Certified accuracy, site {site} (denoised smoothing, n = {cert['n']}, α = "
                  f"{cert['alpha']})", "", "| σ | radius → certified acc | abstain | s per scan |", "|---|---|---|---|"]
        for sigma, v in cert["per_sigma"].items():
            pairs = ", ".join(f"{r:g}: {_pct(a)}" for r, a in zip(v["radii"], v["certified_acc"], strict=True))
            sec = f"{v['seconds_per_scan']:.2f}" if "seconds_per_scan" in v else "–"
            lines.append(f"| {sigma} | {pairs} | {_pct(v['abstain_rate'])} | {sec} |")
        if "linf_2_255_radius" in cert:
            lines.append(f"\nRadius {cert['linf_2_255_radius']:g} holds the whole ℓ∞ ball of 2/255 at this scan size: "
                         "certified at it means robust to every ℓ∞ 2/255 attack.")
        lines += _by_class_lines(cert)
    if rep.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in rep["figures"]]
    return "\n".join(lines) + "\n"


def _by_class_lines(cert: dict[str, Any]) -> list[str]:
    """Certified accuracy within each true class at r 0, the report radii and the ℓ∞ 2/255 ball's radius,
    and a warning for each σ whose smoothed classifier certifies a class's scans at most at chance: its
    pooled figure then counts mostly the other class (a near-constant vote)."""
    rows = {s: v for s, v in cert["per_sigma"].items() if "certified_acc_by_class" in v}
    if not rows:
        return []
    shown = sorted({0.0, *(r for v in rows.values() for r in v["radii"] if r in (0.25, 0.5, 1.0)),
                    *([cert["linf_2_255_radius"]] if "linf_2_255_radius" in cert else [])})
    out = ["", "Within each true class (the worst class is what a balanced guarantee can promise):", "",
           "| σ | class | " + " | ".join(f"r {r:g}" for r in shown) + " |", "|---|---|" + "---|" * len(shown)]
    warn = []
    for sigma, v in rows.items():
        at = {r: i for i, r in enumerate(v["radii"])}
        by = v["certified_acc_by_class"]
        for cls, accs in by.items():
            out.append(f"| {sigma} | {cls} | " + " | ".join(_pct(accs[at[r]]) if r in at else "–" for r in shown)
                       + " |")
        out.append(f"| {sigma} | **worst class** | " + " | ".join(
            _pct(v["worst_class_certified_acc"][at[r]]) if r in at else "–" for r in shown) + " |")
        for kind, accs in v.get("certified_acc_by_lesion", {}).items():
            out.append(f"| {sigma} | tumour: {kind} ({v['lesion_counts'][kind]}) | "
                       + " | ".join(_pct(accs[at[r]]) if r in at else "–" for r in shown) + " |")
        chance = 1.0 / len(by)
        low = [f"{_pct(accs[at[0.0]])} of the {c} scans" for c, accs in by.items() if accs[at[0.0]] <= chance]
        if low:
            warn.append(f"- σ {sigma}: the smoothed classifier certifies only {' and '.join(low)} even at r 0 "
                        f"(chance {_pct(chance)}): it votes mostly for another class, so its pooled certified "
                        "accuracy says little.")
    if warn:
        out += ["", "**Near-constant smoothed classifier:**"] + warn
    return out


def _robust_figure(rep: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    eps_labels = rep["eps_labels"]
    xs = np.arange(len(eps_labels))
    series: dict[str, dict[str, float]] = {}
    und: dict[str, float] = {}
    for r in rep["pooled"]["rows"]:
        if r.get("skipped") is not None or not r["summary"] or r["eps_label"] == "paper":
            continue
        series.setdefault(f"rung {r['rung']}", {})[r["eps_label"]] = r["robust_acc"]
        if r["rung"] == 1 and r["undefended_acc"] is not None:
            und[r["eps_label"]] = r["undefended_acc"]
    for name, v in sorted(series.items()):
        ax.plot(xs, [100 * v.get(e, np.nan) for e in eps_labels], marker="o", label=name)
    if und:
        ax.plot(xs, [100 * und.get(e, np.nan) for e in eps_labels], "k--", marker="x", label="rung 1, undefended")
    ax.axhline(100 * rep["pooled"]["clean"]["defended_acc"], color="grey", lw=0.8, label="clean, defended")
    ax.set_xticks(xs, eps_labels)
    ax.set_xlabel(f"ε ({rep['norm']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"robust accuracy · bundle {rep['bundle']['short_id']} · {rep['budget']['name']} budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples_figure(ex: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib.pyplot as plt

    clean, adv, pur = ex["clean"], ex["adversarial"], ex["purified"]
    eps = float(ex["eps"])
    k = len(clean)
    gain = 0.5 / eps  # perturbation × k: ±ε maps to the full grey range
    fig, axes = plt.subplots(k, 4, figsize=(8, 2 * k), squeeze=False)
    for i in range(k):
        panels = [clean[i, 0], adv[i, 0], np.clip(0.5 + gain * (adv[i, 0] - clean[i, 0]), 0, 1), pur[i, 0]]
        titles = ["clean", "adversarial", f"perturbation ×{gain:.0f}",
                  "purified" if ex["flagged"][i] else "not flagged (as is)"]
        for ax, img, t in zip(axes[i], panels, titles, strict=True):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(t, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _certified_figure(cert: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sigma, v in cert["per_sigma"].items():
        ax.step(v["radii"], [100 * a for a in v["certified_acc"]], where="post", label=f"σ = {sigma}")
    ax.set_xlabel("ℓ2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rep: dict[str, Any], sites: list[Any], out: Path) -> list[str]:
    """Write the figures and report.md into ``out``; → the figures' file names (relative to ``out``)."""
    import matplotlib

    matplotlib.use("Agg")
    figs = ["robust_accuracy.png"]
    _robust_figure(rep, out / figs[0])
    for s in sites:
        if s.examples.get("adversarial") is not None:
            name = f"examples_site{s.site}.png"
            _examples_figure(s.examples, out / name)
            figs.append(name)
        if s.certified:
            name = f"certified_site{s.site}.png"
            _certified_figure(s.certified, out / name)
            figs.append(name)
    rep["figures"] = figs
    (out / "report.md").write_text(markdown(rep))
    return figs
