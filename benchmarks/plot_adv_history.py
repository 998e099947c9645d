"""Per-epoch curves of adversarial fine-tuning runs: clean and robust validation accuracy against the epoch and
against the wall time (the ``history`` that ``adv_lesion_study.py`` records), one line per run — where a
single-step method would show catastrophic overfitting (the robust curve falling to zero) and where two
methods compare at equal compute.

    python benchmarks/plot_adv_history.py benchmarks/results/lesion_study/nfgsm/s1_*.json \\
        --out benchmarks/results/lesion_study/nfgsm/history.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="adv_lesion_study.py JSON files with a history")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    plotted = 0
    for path in a.runs:
        run = json.loads(path.read_text())
        hist = run.get("history") or []
        if not hist:
            print(f"{path}: no per-epoch history (an older run, or --epochs 0): skipped")
            continue
        label = f"{run['name']} ({run.get('adv', '?')}, adv_frac {run['adv_frac']})"
        epochs = [h["epoch"] + 1 for h in hist]
        wall, total = [], 0.0
        for h in hist:
            total += h["s"]
            wall.append(total / 60)
        for ax, xs in zip(axes, (epochs, wall), strict=True):
            line, = ax.plot(xs, [100 * h["robust_val"] for h in hist], label=f"{label}: robust")
            ax.plot(xs, [100 * h["val"] for h in hist], color=line.get_color(), ls=":", alpha=0.7)
        plotted += 1
    if not plotted:
        raise SystemExit("no run had a per-epoch history: nothing to plot")
    axes[0].set_xlabel("adversarial epoch")
    axes[1].set_xlabel("wall time of the epochs, min (one thread; see each run's machine load)")
    axes[0].set_ylabel("validation accuracy, %")
    fig.suptitle("solid: robust (PGD-10 at the training ε, the selection's scans); dotted: clean", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
