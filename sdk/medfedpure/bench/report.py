"""The benchmark report for people: rich tables and a PNG plot of a :func:`~medfedpure.bench.run.run_bench` report.

matplotlib is optional (the ``train`` / ``demo`` extras): without it :func:`plot` writes nothing and
returns a note saying so, which the report records in place of the file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfedpure.bench.latency import STAGES

__all__ = ["plot", "tables"]


def _ms(d: dict[str, float]) -> str:
    return f"{d['p50']:.1f}/{d['p90']:.1f}/{d['p99']:.1f}"


def tables(report: dict[str, Any]) -> list[Any]:
    """rich ``Table``s: one per path (per stage p50, total p50/p90/p99, ratio, throughput), the
    teacher reference, the architecture timing and the skipped backends."""
    from rich.table import Table

    out = []
    results = report.get("results", {})
    ratios = report.get("ratio_vs_torch_eager_fp32", {})
    thr = report.get("throughput_scans_per_s", {})
    paths = report["config"]["paths"]
    for path in paths if any(r.get(p) for r in results.values() for p in paths) else ():
        t = Table(title=f"{path.replace('_', '-')} path: ms per call (stage p50; total p50/p90/p99)",
                  caption=report.get("ratio_note") or "ratio = torch eager FP32 p50 (same device) / this p50")
        for col in ("backend", "batch", *STAGES[:-1], "total p50/p90/p99", "ratio", "scans/s"):
            t.add_column(col, justify="left" if col == "backend" else "right")
        for name, per_path in results.items():
            for b, r in per_path.get(path, {}).items():
                ratio = ratios.get(name, {}).get(path, {}).get(b)
                tp = thr.get(name, {}).get(path) if int(b) == report.get("throughput_batch") else None
                t.add_row(name, b, *[f"{r[s]['p50']:.1f}" for s in STAGES[:-1]], _ms(r["total"]),
                          f"{ratio:.2f}×" if ratio is not None else "-", f"{tp:.1f}" if tp is not None else "")
        out.append(t)
    ref = report.get("teacher_reference")
    if ref:
        t = Table(title=f"teacher sampler reference, batch {ref['batch']}, purified path: {ref['label']}",
                  caption=f"teacher steps: {ref['steps_source']}; the bundle's student runs "
                          f"{ref['student_steps']} step(s)")
        for col in ("backend", "purify p50", "total p50/p90/p99", "student total p50", "distillation speed-up"):
            t.add_column(col, justify="left" if col == "backend" else "right")
        for name, r in ref["rows"].items():
            student = results.get(name, {}).get("purified", {}).get(str(ref["batch"]))
            sp = f"{r['total']['p50'] / student['total']['p50']:.1f}×" if student else "-"
            t.add_row(name, f"{r['purify']['p50']:.1f}", _ms(r["total"]),
                      f"{student['total']['p50']:.1f}" if student else "-", sp)
        out.append(t)
    arch = report.get("architecture")
    if arch:
        for size, rows in arch["sizes"].items():
            t = Table(title=f"{size} px: {arch['label']} (ms, p50/p90/p99)")
            for col in ("backend", "batch", "mae", "gate", "purify", "classify", "total"):
                t.add_column(col, justify="left" if col == "backend" else "right")
            for name, per_b in rows.items():
                for b, r in per_b.items():
                    t.add_row(name, b, *[_ms(r[s]) for s in ("mae", "gate", "purify", "classify", "total")])
            out.append(t)
    skipped = {**report.get("skipped", {}), **(arch or {}).get("skipped", {})}
    if skipped:
        t = Table(title="skipped")
        t.add_column("backend")
        t.add_column("why")
        for k, v in skipped.items():
            t.add_row(k, v)
        out.append(t)
    return out


def plot(report: dict[str, Any], out: str | Path) -> str:
    """Bar chart of end-to-end p50 (whiskers to p99) per backend and batch, one panel per path.

    Returns the file's path, or a note when matplotlib is not installed (nothing written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not written: matplotlib is not installed (pip install matplotlib, or the train extra)"
    import numpy as np

    res = report.get("results", {})
    paths = report["config"]["paths"]
    if not any(r.get(p) for r in res.values() for p in paths):
        return "not written: no run of the bundle itself to plot (--sizes left out its own size)"
    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4), squeeze=False)
    for ax, path in zip(axes[0], paths, strict=True):
        names = [k for k in res if res[k].get(path)]
        batches = sorted({int(b) for k in names for b in res[k][path]})
        w = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            p50 = np.array([res[name][path][str(b)]["total"]["p50"] for b in batches])
            p99 = np.array([res[name][path][str(b)]["total"]["p99"] for b in batches])
            xs = np.arange(len(batches)) + j * w
            ax.bar(xs, p50, w, label=name)
            ax.errorbar(xs, p50, yerr=[np.zeros(len(p50)), p99 - p50], fmt="none", c="k", capsize=3)
        ax.set_xticks(np.arange(len(batches)) + w * (len(names) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_ylabel("end-to-end ms per call (p50, whisker p99)")
        ax.set_title(f"{path.replace('_', '-')} · bundle {report['bundle']['id'][:12]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)
