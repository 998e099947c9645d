"""Personalisation comparison on non-IID sites: local-only, FedAvg, FedBN-style and the personalised MoE.

All four train the same ``MoEClassifier`` architecture from the same seeded initialisation with the
same local compute (``rounds × local_epochs`` epochs per site); they differ only in what is shared:

============== ==================================================================================
local-only     nothing: each site trains alone (``train_classifier`` for rounds × local_epochs
               epochs, the preset's warm-up + cosine schedule, best epoch by validation).
FedAvg         everything: one global model, averaged each round (split "all").
FedBN-style    all but the normalisation layers (their affine parameters and statistics stay local;
               Li et al., ICLR 2021) (split "fedbn").
personalised   only the global expert; local expert, gate and all normalisation stay local
MoE            (split "moe": the product's scheme).
============== ==================================================================================

The federated three run on the Flower simulation runtime (``sim.run_sim``) with FedAvg
aggregation. Their sites train as the local-only run does, only interrupted by aggregation: each
site keeps its AdamW state across rounds and round ``r`` continues one warm-up + cosine schedule
over ``rounds × local_epochs`` epochs with the same per-epoch generators (``client_app``,
``tasks.train_classifier_round``) — without averaging a site's rounds would be the local-only run.
Difference left: local-only keeps its best epoch by validation, the federated arms the last round. Reported: per-site **test** accuracy of each site's final model (for the federated
methods: the last round's global part combined with the site's local part), and its mean ± std
over sites (std: population std over the sites). Writes ``OUT/compare.json``, ``OUT/compare.md``
and ``OUT/compare.png``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medfedpure.fed import tasks
from medfedpure.fed.config import FedConfig
from medfedpure.fed.phases import PHASES, image_size
from medfedpure.fed.sim import run_sim
from medfedpure.fed.strategies import STRATEGIES

METHODS = (("local", "local-only", "none"), ("fedavg", "FedAvg", "all"), ("fedbn", "FedBN-style", "fedbn"),
           ("moe", "personalised MoE", "moe"))


def _final_test_accuracy(metrics: dict[str, Any], rounds: int) -> dict[int, float]:
    rows = metrics["phases"]["classifier"]["per_site"]
    return {int(r["site"]): float(r["test_accuracy"]) for r in rows
            if r["kind"] == "evaluate" and int(r["round"]) == rounds}


def local_only(base: FedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train one MoE per site on its own data only; returns per-site test accuracy and wall time."""
    import torch

    from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier

    torch.set_num_threads(base.threads)
    acc: dict[int, float] = {}
    t0 = time.perf_counter()
    for site in range(base.num_sites):
        data = tasks.load_site(base.data_dir, site, image_size(base.preset, base.image_size), base.max_train)
        model, _ = PHASES["classifier"].build(base.preset, seed=base.seed, size=base.image_size,
                                              width=base.classifier_width, stem=base.classifier_stem)
        cfg = ClassifierTrainConfig.preset(base.preset, epochs=base.rounds * base.local_epochs,
                                           seed=base.seed + tasks.SITE_STRIDE * site, patience=base.rounds * base.local_epochs + 1)
        train_classifier(model, (data.x_train, data.y_train), (data.x_val, data.y_val), cfg, progress=progress)
        acc[site] = float(evaluate_classifier(model, data.x_test, data.y_test)["accuracy"])
    return {"per_site": acc, "wall_s": time.perf_counter() - t0}


def run_compare(base: FedConfig, out: Path, *, methods: tuple[str, ...] = ("local", "fedavg", "fedbn", "moe"),
                progress: bool = True, timeout_s: float = 7200.0) -> dict[str, Any]:
    """Run the comparison; ``base`` gives data, preset, rounds, local epochs, sites and seed."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "config": base.to_dict(),
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine()},
        "methods": {},
    }
    order = {k: i for i, (k, _, _) in enumerate(METHODS)}
    for key in methods:  # run in the caller's order (partial results are written after each method)
        if key not in order:
            raise ValueError(f"unknown method {key!r}: choose from {', '.join(order)}")
        _, label, split = METHODS[order[key]]
        if key == "local":
            res = local_only(base, progress=progress)
        else:
            cfg = replace(base, out_dir=str(out / key), phases=("classifier",), calibrate=False,
                          classifier_split=split, strategy="fedavg")
            m = run_sim(cfg, progress=progress, timeout_s=timeout_s)
            res = {"per_site": _final_test_accuracy(m, cfg.rounds), "wall_s": m["sim_wall_s"],
                   "rejected": len(m["phases"]["classifier"]["rejected"])}
        accs = np.array([res["per_site"][s] for s in sorted(res["per_site"])])
        if len(accs) != base.num_sites:
            raise RuntimeError(f"{label}: got test accuracy for {len(accs)} of {base.num_sites} sites")
        res.update(label=label, split=split, mean=float(accs.mean()), std=float(accs.std()))
        results["methods"][key] = res
        (out / "compare.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    results["methods"] = dict(sorted(results["methods"].items(), key=lambda kv: order[kv[0]]))
    (out / "compare.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "compare.md").write_text(markdown_table(results))
    plot_compare(results, out / "compare.png")
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per method, per-site test accuracy and mean ± std."""
    cfg = results["config"]
    n = cfg["num_sites"]
    head = "| method | what is shared | " + " | ".join(f"site {k}" for k in range(n)) + " | mean ± std | wall (s) |"
    sep = "|" + "---|" * (n + 4)
    rows = [head, sep]
    shared = {"none": "nothing", "all": "all weights", "fedbn": "all but norm layers", "moe": "global expert only"}
    for res in results["methods"].values():
        per = " | ".join(f"{res['per_site'][s] if s in res['per_site'] else res['per_site'][str(s)]:.3f}"
                         for s in range(n))
        rows.append(f"| {res['label']} | {shared[res['split']]} | {per} | {res['mean']:.3f} ± {res['std']:.3f} | "
                    f"{res['wall_s']:.0f} |")
    size = cfg["image_size"] or "preset"
    rows.append("")
    rows.append(f"Per-site test accuracy; preset {cfg['preset']}, image size {size}, {cfg['rounds']} rounds × "
                f"{cfg['local_epochs']} local epoch(s) (local-only: the same number of epochs), seed {cfg['seed']}.")
    return "\n".join(rows) + "\n"


def plot_compare(results: dict[str, Any], path: Path) -> Path:
    """Bars: mean ± std per method; dots: each site's accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"].values())
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = np.arange(len(methods))
    ax.bar(xs, [m["mean"] for m in methods], yerr=[m["std"] for m in methods], capsize=4, color="#9ecae1",
           edgecolor="#3182bd", label="mean ± std over sites")
    for i, m in enumerate(methods):
        vals = [m["per_site"][k] for k in sorted(m["per_site"], key=int)]
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)), vals, color="k", s=14, zorder=3,
                   label="a site" if i == 0 else None)
    ax.set_xticks(xs, [m["label"] for m in methods])
    ax.set_ylabel("per-site test accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    cfg = results["config"]
    ax.set_title(f"non-IID sites: {cfg['num_sites']}, {cfg['rounds']} rounds, preset {cfg['preset']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_robustness(base: FedConfig, out: Path, *, strategies: tuple[str, ...] = STRATEGIES, poison_site: int = -1,
                   poison_scale: float = -20.0, progress: bool = True, timeout_s: float = 7200.0) -> dict[str, Any]:
    """Per strategy: the classifier federation clean and with one poisoned site; per-site test accuracy.

    ``base`` gives data, preset, rounds, sites, split, seed and the validation bounds (the default
    median bound included: FedAvg is measured with it). The poisoned run has site ``poison_site``
    (-1: the last) reply ``w + poison_scale · Δ`` every round; it trains honestly, so its own model
    (the global part combined with its local part) counts like the others'. Reported per strategy
    and arm: per-site test accuracy, mean over all sites and over the honest ones, updates dropped,
    and the drop in mean accuracy (clean − poisoned). Writes ``OUT/robustness.json`` (after every
    run) and ``OUT/robustness.md``.
    """
    site = base.num_sites - 1 if poison_site < 0 else poison_site
    if site >= base.num_sites:
        raise ValueError(f"poison_site={poison_site}: the run has {base.num_sites} sites")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "config": base.to_dict(), "poison_site": site, "poison_scale": poison_scale,
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine()},
        "strategies": {},
    }
    t0 = time.perf_counter()
    for name in strategies:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}")
        row: dict[str, Any] = {}
        for arm, psite in (("clean", -1), ("poisoned", site)):
            cfg = replace(base, out_dir=str(out / f"{name}_{arm}"), phases=("classifier",), calibrate=False,
                          strategy=name, poison_site=psite, poison_scale=poison_scale)
            m = run_sim(cfg, progress=progress, timeout_s=timeout_s)
            per = _final_test_accuracy(m, cfg.rounds)
            if len(per) != base.num_sites:
                raise RuntimeError(f"{name} {arm}: got test accuracy for {len(per)} of {base.num_sites} sites")
            rejected = m["phases"]["classifier"]["rejected"]
            row[arm] = {"per_site": per, "mean": float(np.mean(list(per.values()))),
                        "honest_mean": float(np.mean([a for s, a in per.items() if s != site])),
                        "rejected": len(rejected), "rejected_sites": sorted({int(r["site"]) for r in rejected}),
                        "wall_s": m["sim_wall_s"]}
            results["strategies"][name] = row
            (out / "robustness.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        row["drop"] = row["clean"]["mean"] - row["poisoned"]["mean"]
    results["wall_s"] = time.perf_counter() - t0
    (out / "robustness.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "robustness.md").write_text(robustness_table(results))
    return results


def robustness_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per strategy, clean vs poisoned mean test accuracy and the drop."""
    cfg = results["config"]
    rows = ["| strategy | clean: mean (per site) | poisoned: mean (per site) | honest sites, poisoned | "
            "drop (points) | updates dropped (poisoned run) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, row in results["strategies"].items():
        if "drop" not in row:
            continue

        def cell(arm: dict[str, Any]) -> str:
            per = arm["per_site"]
            return f"{arm['mean']:.3f} ({' / '.join(f'{per[k]:.2f}' for k in sorted(per, key=int))})"

        p = row["poisoned"]
        rows.append(f"| {name} | {cell(row['clean'])} | {cell(p)} | {p['honest_mean']:.3f} | "
                    f"{100 * row['drop']:+.1f} | {p['rejected']} (sites {p['rejected_sites']}) | "
                    f"{row['clean']['wall_s'] + p['wall_s']:.0f} |")
    rows.append("")
    rows.append(f"Per-site test accuracy of each site's final classifier; site {results['poison_site']} of "
                f"{cfg['num_sites']} replies w + {results['poison_scale']:g}·Δ every round in the poisoned run; "
                f"preset {cfg['preset']}, image size {cfg['image_size'] or 'preset'}, {cfg['rounds']} rounds × "
                f"{cfg['local_epochs']} local epoch(s), split {cfg['classifier_split']}, max_median_ratio "
                f"{cfg['max_median_ratio']:g}, seed {cfg['seed']}.")
    return "\n".join(rows) + "\n"
