"""``medfedpure data …``: argument handling for the data commands; the work lives in the library."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape

app = typer.Typer(no_args_is_help=True)


def _fail(msg: str) -> typer.Exit:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Output data folder (created; must be empty unless --overwrite)."),
    sites: int = typer.Option(4, "--sites", min=1, max=64, help="Number of sites (hospitals), each with its own scanner profile."),
    per_site: int = typer.Option(600, "--per-site", min=10, max=100_000, help="Scans per site, half with a tumour."),
    size: int = typer.Option(128, "--size", min=32, max=1024, help="Image side in pixels (square 8-bit grey PNG)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Root seed: the data set (bytes) is fully determined by it."),
    split_seed: int | None = typer.Option(None, "--split-seed", min=0, help="Seed of the train/val/test split (default: --seed)."),
    subtle: float = typer.Option(0.2, "--subtle", min=0.0, max=1.0, help="Share of tumours that are small or faint."),
    workers: int = typer.Option(0, "--workers", min=0, max=64, help="Worker processes (0: one per CPU, at most 8). Output does not depend on it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the site folders and JSON files of an existing data folder."),
    generator_version: int = typer.Option(2, "--generator-version", min=1, max=2, help="Generator version to reproduce (1: the first shared set; 2: current)."),
) -> None:
    """Generate synthetic Br35H-layout scans (MNI152 anatomy, per-site scanners) and their splits.

    Writes OUT/site_k/{yes,no}/*.png, OUT/dataset.json (seed, parameters, site profiles, fingerprint), OUT/scan_params.jsonl and OUT/splits.json (70/15/15, stratified by label). Synthetic data is not Br35H: never report results on it as Br35H.
    """
    from medfedpure.data.layout import DataFolderError
    from medfedpure.data.splits import make_splits
    from medfedpure.data.synth import SynthConfig, generate_synthetic

    try:
        cfg = SynthConfig(sites=sites, per_site=per_site, size=size, seed=seed, subtle_fraction=subtle,
                          version=generator_version)
        t0 = time.perf_counter()
        meta = generate_synthetic(out, cfg, workers=workers or None, overwrite=overwrite)
        wall = time.perf_counter() - t0
        splits = make_splits(out, seed=seed if split_seed is None else split_seed)
    except (ValueError, DataFolderError) as e:
        raise _fail(str(e)) from None
    n = sum(c["no_tumor"] + c["tumor"] for c in meta["counts"])
    typer.echo(f"wrote {n} scans ({sites} sites x {per_site}, {size}px) to {out} in {wall:.1f} s")
    typer.echo(f"fingerprint {meta['fingerprint']}; splits seed {splits['seed']}")


@app.command("split")
def split(
    br35h: Path = typer.Option(..., "--br35h", help="Br35H folder holding yes/ and no/ (pred/ is skipped)."),
    sites: int = typer.Option(..., "--sites", min=1, max=64, help="Number of sites to partition the scans into."),
    out: Path = typer.Option(..., "--out", help="Output data folder (created; must be empty unless --overwrite). Files are copied."),
    dirichlet: float | None = typer.Option(None, "--dirichlet", min=1e-3, max=1e6, help="Label skew: Dirichlet concentration alpha per class (small = skewed). Default: IID."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the site partition and of the train/val/test split."),
    min_per_site: int = typer.Option(10, "--min-per-site", min=1, help="Every site gets at least this many scans."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the site folders and JSON files of an existing data folder."),
) -> None:
    """Read Br35H (deduplicated by content hash), partition it into sites and write the medfedpure layout.

    Writes OUT/site_k/{yes,no}/ (copies), OUT/dataset.json (kind br35h, partition, dedup report, fingerprint) and OUT/splits.json (70/15/15, stratified by label).
    """
    from medfedpure.data.br35h import read_br35h, write_br35h_sites
    from medfedpure.data.layout import DataFolderError
    from medfedpure.data.splits import make_splits

    try:
        index = read_br35h(br35h)
        meta = write_br35h_sites(index, out, sites, seed=seed, alpha=dirichlet, source=br35h,
                                 min_per_site=min_per_site, overwrite=overwrite)
        make_splits(out, seed=seed)
    except (ValueError, DataFolderError) as e:
        raise _fail(str(e)) from None
    d = meta["dedup"]
    typer.echo(f"{d['unique']} unique scans ({d['duplicates_removed']} duplicates and "
               f"{d['label_conflicts_removed']} yes/no conflicts removed, {d['skipped_files']} files skipped)")
    scheme = "IID" if dirichlet is None else f"Dirichlet alpha={dirichlet}"
    for k, c in enumerate(meta["counts"]):
        typer.echo(f"site_{k}: {c['no_tumor']} no_tumor, {c['tumor']} tumor")
    typer.echo(f"wrote {out} ({scheme}, seed {seed}); fingerprint {meta['fingerprint']}")


@app.command("info")
def info(
    root: Path = typer.Argument(..., help="Data folder (from `data synth` or `data split`)."),
    figure: Path | None = typer.Option(None, "--figure", help="Also draw a PNG grid of example scans per site and class here."),
    per_class: int = typer.Option(4, "--per-class", min=1, max=16, help="Examples per class and site in the figure."),
    max_per_site: int = typer.Option(200, "--max-per-site", min=1, help="Scans per site read for the intensity and noise statistics."),
) -> None:
    """Print per site: scans per class and split, foreground intensity and background noise statistics."""
    from rich.table import Table

    from medfedpure.cli.common import console as make_console
    from medfedpure.data.info import draw_examples, summarize
    from medfedpure.data.layout import DataFolderError, read_dataset_json

    try:
        meta = read_dataset_json(root)
        summaries = summarize(root, max_per_site=max_per_site)
    except (ValueError, DataFolderError) as e:
        raise _fail(str(e)) from None
    console = make_console()
    kind = meta.get("kind", "?")
    console.print(f"[bold]{escape(str(root))}[/bold]: kind={kind}, sites={len(summaries)}, seed={meta.get('seed')}, "
                  f"fingerprint={str(meta.get('fingerprint', '?'))[:16]}…")
    if kind == "synthetic":
        console.print("synthetic data (MNI152 anatomy, simulated scanners) — not Br35H")
    table = Table(title="scans per site, class and split; intensity (8-bit units, foreground) and noise σ (background)")
    for col in ("site", "class", "total", "train", "val", "test", "fg mean ± sd", "noise σ ± sd"):
        table.add_column(col, justify="right" if col not in ("site", "class") else "left")
    profiles = meta.get("site_profiles") or []
    for s in summaries:
        for j, (cls, c) in enumerate(s.counts.items()):
            table.add_row(
                f"site_{s.site}" if j == 0 else "", cls, str(c["total"]), str(c["train"]), str(c["val"]), str(c["test"]),
                f"{s.fg_mean:.1f} ± {s.fg_std:.1f}" if j == 0 else "",
                f"{s.noise_mean:.2f} ± {s.noise_std:.2f}" if j == 0 else "",
            )
        table.add_section()
    console.print(table)
    if profiles:
        pt = Table(title="site scanner profiles (dataset.json)")
        keys = list(profiles[0])
        pt.add_column("site")
        for k in keys:
            pt.add_column(k, justify="right")
        for i, p in enumerate(profiles):
            pt.add_row(f"site_{i}", *(f"{p[k]:.4g}" for k in keys))
        console.print(pt)
    if figure is not None:
        path = draw_examples(root, figure, per_class=per_class)
        console.print(f"figure: {path}", markup=False)
