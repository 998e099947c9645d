"""Figures of a federated run: per-site metric over rounds, one panel per phase (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# phase -> (metric key in the evaluate replies, axis label)
PANEL = {
    "classifier": ("test_accuracy", "test accuracy (personalised model)"),
    "mae": ("test_masked_mse", "MAE masked MSE (test)"),
    "teacher": ("test_denoise_mse", "teacher x0 MSE (test)"),
    "student": ("test_denoise_mse", "student x0 MSE (test)"),
    "detector": ("test_auroc_8", "detector AUROC, PGD 8/255 (test)"),
}


def per_site_series(metrics: dict[str, Any], phase: str, key: str) -> dict[int, list[tuple[int, float]]]:
    """``{site: [(round, value), …]}`` from the evaluate entries of ``metrics["phases"][phase]``."""
    series: dict[int, list[tuple[int, float]]] = {}
    for row in metrics["phases"].get(phase, {}).get("per_site", []):
        if row["kind"] == "evaluate" and key in row:
            series.setdefault(int(row["site"]), []).append((int(row["round"]), float(row[key])))
    return {s: sorted(v) for s, v in sorted(series.items())}


def plot_run(metrics: dict[str, Any], path: Path, phases: tuple[str, ...] | None = None) -> Path:
    """Draw each phase's per-site evaluation metric against the round; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    phases = [p for p in PANEL if p in metrics.get("phases", {}) and (phases is None or p in phases)]
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(4.2 * max(1, len(phases)), 3.4), squeeze=False)
    cfg = metrics.get("config", {})
    for ax, phase in zip(axes[0], phases, strict=False):
        key, label = PANEL[phase]
        rounds: set[int] = set()
        for site, pts in per_site_series(metrics, phase, key).items():
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=f"site {site}")
            rounds.update(int(r) for r, _ in pts)
        ax.set_title(phase)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if rounds:  # whole rounds on the axis even for a phase of one round
            ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if phase == "classifier":
            ax.set_ylim(0.0, 1.02)
    fig.suptitle(f"federated run: {cfg.get('strategy', '?')}, preset {cfg.get('preset', '?')}, "
                 f"{cfg.get('num_sites', '?')} sites", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
