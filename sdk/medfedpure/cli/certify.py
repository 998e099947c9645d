"""``medfedpure certify``: certified ℓ2 radii by denoised randomized smoothing (argument handling only).

The work lives in :meth:`medfedpure.runtime.defender.Defender.certify` and
:mod:`medfedpure.runtime.certify`. Exit codes: 0 when every scan got a certificate (an abstention is a
certificate's answer too), 2 on a bad bundle, backend, parameter or scan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from medfedpure.cli.common import BACKEND_CHOICE, DEVICE_CHOICE
from medfedpure.cli.runtime import (
    ALLOW_UNSIGNED_HELP,
    BACKEND_HELP,
    DEVICE_HELP,
    EXPECTED_ID_HELP,
    TRUSTED_KEY_HELP,
)


def certify_command(
    scans: list[str] = typer.Argument(..., help="Scan files (DICOM, PNG, JPEG, TIFF, BMP)."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one)."),
    sigma: float = typer.Option(0.25, help="Smoothing noise σ in preprocessed [0, 1] image units."),
    n0: int = typer.Option(100, "--n0", help="Selection draws (pick the top class)."),
    n: int = typer.Option(1000, "--n", help="Estimation draws (count the top class)."),
    alpha: float = typer.Option(0.001, help="Failure probability of each certificate, in (0, 0.5)."),
    seed: int | None = typer.Option(None, min=0, help="Noise key (default: a fresh one per scan, recorded)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON certificate per line."),
    backend: str = typer.Option("auto", help=BACKEND_HELP, click_type=BACKEND_CHOICE),
    device: str = typer.Option("auto", help=DEVICE_HELP, click_type=DEVICE_CHOICE),
    threads: int = typer.Option(0, min=0, help="Inference threads (0: the runtime's default)."),
    batch: int | None = typer.Option(None, min=1, help="Draws per engine call (default: the engine's)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar of the draws."),
    expected_id: str | None = typer.Option(None, "--expected-id", help=EXPECTED_ID_HELP),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help=TRUSTED_KEY_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Certify each scan's smoothed label within an ℓ2 radius (Cohen et al. CERTIFY, with the bundle's
    one-shot diffusion denoiser); print label, radius and the lower bound on p_A."""
    from rich.table import Table

    from medfedpure.cli.common import console
    from medfedpure.cli.runtime import _load
    from medfedpure.progress import progress as progress_bar
    from medfedpure.runtime.certify import SmoothingConfig
    from medfedpure.scan import ScanError

    try:  # parameters before the bundle is loaded: a typo costs no model load
        SmoothingConfig(sigma=sigma, n0=n0, n=n, alpha=alpha, batch=batch or 1)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    d = _load(bundle, backend, device, threads, expected_id=expected_id, trusted_keys=trusted_key,
              allow_unsigned=allow_unsigned)
    table = Table(title=f"medfedpure certify · bundle {d.bundle.short_id} · {d.engine.describe()['backend']} · "
                        f"σ={sigma:g} n0={n0} n={n} α={alpha:g}")
    for col in ("scan", "label", "radius", "p_A lower", "counts", "t", "seed", "s"):
        table.add_column(col)
    for s in scans:
        with progress_bar(total=n0 + n, desc=f"{Path(s).name}: selection", unit="draws", enabled=progress,
                          transient=True) as bar:

            def step(phase: str, done: int, total: int, name: str = Path(s).name, bar: Any = bar) -> None:
                bar.set_description(f"{name}: {'selection' if phase == 'select' else 'estimation'}")
                bar.set((0 if phase == "select" else n0) + done)

            try:
                c = d.certify(s, sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed, batch=batch, progress=step)
            except (ScanError, ValueError) as e:
                typer.echo(f"error: {s}: {e}", err=True)
                raise typer.Exit(2) from e
            if as_json:
                typer.echo(json.dumps({"scan": s, **c.to_dict()}, allow_nan=False))
            else:
                table.add_row(escape(s), c.label or "abstain", f"{c.radius:.4f}", f"{c.p_lower:.4f}",
                              " ".join(f"{k}:{v}" for k, v in c.counts.items()), f"{c.t:.1f}", str(c.seed),
                              f"{c.latency_ms['total'] / 1e3:.1f}")
    if not as_json:
        console().print(table)
