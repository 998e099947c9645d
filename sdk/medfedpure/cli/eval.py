"""``medfedpure eval``: robustness of a bundle under the attack ladder, with its sanity checks (argument
handling only; the work lives in :mod:`medfedpure.eval.runner`).

Exit codes: 0 when the report is written and every sanity check passed; 1 when the report is written but
a sanity check failed (report.md says so first, report.json has ``sanity.passed: false``); 2 on bad
options, data or bundle, a missing ``attacks`` extra, or ``--device cuda`` without a CUDA device.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import typer

from medfedpure.cli.common import BACKEND_CHOICE, POLICY_CHOICE
from medfedpure.cli.runtime import ALLOW_UNSIGNED_HELP, EXPECTED_ID_HELP, TRUSTED_KEY_HELP


def eval_command(
    data: Path = typer.Option(..., "--data", help="Data folder (dataset.json, splits.json, site_k/{yes,no})."),
    out: Path = typer.Option(..., "--out", help="Report folder: report.json, report.md, figures."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one)."),
    site: str = typer.Option("0", help="Site index, or 'all' (per site and pooled)."),
    attacks: str = typer.Option("ladder", help="'paper' (rung 1), 'ladder' (rungs 1-6) or a comma list of rungs."),
    eps: str = typer.Option("1,2,4,8", help="Radii: ℓ∞ in /255 of the [0,1] input; ℓ2 in input units "
                            "(e.g. 0.25,0.5,1.0)."),
    norm: str = typer.Option("linf", help="Perturbation norm.", click_type=click.Choice(["linf", "l2"])),
    budget: str = typer.Option("quick", help="quick (CI-sized, reduced) or full (≥ 100 steps, EOT ≥ 10, R ≥ 5).",
                               click_type=click.Choice(["quick", "full"])),
    policy: str | None = typer.Option(None, help="Gate policy of the evaluated Defender (default: the bundle's).",
                                      click_type=POLICY_CHOICE),
    limit: int | None = typer.Option(None, min=0, help="First N scans per site (0: all; default: the budget's)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    surrogate: Path | None = typer.Option(None, help="Rung 6: an independently trained classifier (safetensors); "
                                          "default: train one here on the site's train split."),
    seed: int = typer.Option(0, min=0, help="Seed of the attacks and of the Defender's keys."),
    steps: int | None = typer.Option(None, min=1, help="Override the budget's attack steps."),
    eot: int | None = typer.Option(None, min=1, help="Override the budget's EOT draws (rungs 2, 3)."),
    eot_apgd: int | None = typer.Option(None, min=1, help="Override the budget's EOT draws for APGD (rung 4)."),
    repeats: int | None = typer.Option(None, min=1, help="Override R, the judged runs per scan."),
    surrogate_epochs: int | None = typer.Option(None, min=1, help="Override the training epochs of the rung-6 "
                                                "surrogate trained here (on the host CPU, whatever --device)."),
    certify_sigmas: str | None = typer.Option(None, help="Also certify (denoised smoothing) at these σ, e.g. "
                                              "0.12,0.25,0.5."),
    certify_n: int = typer.Option(100, min=2, help="Draws per certificate."),
    backend: str = typer.Option("onnxruntime", help="Engine of the evaluated Defender.", click_type=BACKEND_CHOICE),
    threads: int = typer.Option(1, min=1, help="CPU threads of torch and onnxruntime (more than the free cores "
                                 "slows every attack step down)."),
    device: str = typer.Option("cpu", help="Where the attacks, the surrogate's attacks and the certification "
                               "run, and the judged Defender where its backend can (torch: yes; onnxruntime: "
                               "with its CUDA provider). auto: cuda when present.",
                               click_type=click.Choice(["cpu", "cuda", "auto"])),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    expected_id: str | None = typer.Option(None, "--expected-id", help=EXPECTED_ID_HELP),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help=TRUSTED_KEY_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Attack a bundle rung by rung (docs/evaluation.md), judge every adversarial scan through the real
    Defender, run the sanity checks and write report.json, report.md and figures."""
    from medfedpure.cli.common import check_extra, console

    check_extra("attacks")
    from medfedpure.data.layout import DataFolderError, num_sites
    from medfedpure.eval.device import resolve_device
    from medfedpure.eval.runner import Budget, EvalConfig, EvalError, parse_attacks, parse_eps, run_eval
    from medfedpure.runtime.bundle import BundleError

    try:
        resolve_device(device)  # a missing GPU is an error before any data or bundle is read
        rungs = parse_attacks(attacks)
        radii, labels = parse_eps(eps, norm)
        if site.strip().lower() != "all" and not site.strip().isdigit():
            raise EvalError(f"--site {site!r}: expected a site index (0, 1, …) or 'all'")
        sites = None if site.strip().lower() == "all" else (int(site),)
        if sites is not None:
            n = num_sites(data)
            if not 0 <= sites[0] < n:
                raise EvalError(f"--site {site}: {data} has sites 0..{n - 1} (or use --site all)")
        sigmas = tuple(float(s) for s in certify_sigmas.split(",") if s.strip()) if certify_sigmas else ()
        cfg = EvalConfig(
            data=str(data), eps=radii, eps_labels=labels, sites=sites, rungs=rungs, norm=norm,
            budget=Budget.preset(budget, steps=steps, eot=eot, eot_apgd=eot_apgd, repeats=repeats,
                                 surrogate_epochs=surrogate_epochs),
            policy=policy, split=split, limit=limit, surrogate=None if surrogate is None else str(surrogate),
            seed=seed, bundle=None if bundle is None else str(bundle), backend=backend, threads=threads,
            certify_sigmas=sigmas, certify_n=certify_n, progress=progress, device=device, expected_id=expected_id,
            trusted_keys=tuple(str(k) for k in trusted_key or ()), allow_unsigned=allow_unsigned)
    except (ValueError, DataFolderError) as e:  # EvalError and DeviceError are ValueErrors
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if surrogate is not None and not surrogate.is_file():
        typer.echo(f"error: --surrogate {surrogate}: no such file (a classifier's .safetensors)", err=True)
        raise typer.Exit(2)
    try:
        rep = run_eval(cfg, out, command="medfedpure " + shlex.join(sys.argv[1:]))
    except (EvalError, DataFolderError, BundleError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    _summary(rep, out, console())
    if not rep["sanity"]["passed"]:
        raise typer.Exit(1)


def _summary(rep: dict, out: Path, con: object) -> None:
    """The report's headline on the terminal: sanity first, then the pooled robust accuracy per rung and ε."""
    from rich.table import Table

    from medfedpure.eval.report import class_summary, lesion_summary

    s = rep["sanity"]
    failed = [c["name"] for c in s["checks"] if c["passed"] is False]
    con.print("[bold green]sanity checks passed[/]" if s["passed"] else
              f"[bold red]SANITY CHECKS FAILED: {', '.join(failed)}[/] (see report.md)")
    p, b = rep["pooled"], rep["budget"]
    tab = Table(title=f"medfedpure eval · bundle {rep['bundle']['short_id']} · sites {rep['sites']} · n = {p['n']} · "
                      f"{b['name']} budget ({b['steps']} steps, EOT {b['eot']}, R {b['repeats']}) · {rep['norm']} · "
                      f"{rep['machine']['device']}")
    for col in ("rung", "attack", "ε", "undefended", "defended", "worst of runs", "flagged", "AUROC"):
        tab.add_column(col, justify="right" if col not in ("attack",) else "left")
    c = p["clean"]
    tab.add_row("–", "clean", "0", f"{100 * c['undefended_acc']:.1f} %", f"{100 * c['defended_acc']:.1f} %", "",
                f"{100 * c['flag_rate']:.1f} %", "")
    for r in p["rows"]:
        if r.get("skipped") is not None:
            tab.add_row(str(r["rung"]), r["attack"], r["eps_label"], "skipped", "", "", "", "")
            continue
        tab.add_row(str(r["rung"]), r["attack"], r["eps_label"],
                    "–" if r["undefended_acc"] is None else f"{100 * r['undefended_acc']:.1f} %",
                    f"{100 * r['robust_acc']:.1f} %", f"{100 * r['defended_acc_worst_of_runs']:.1f} %",
                    "–" if r["flag_rate"] is None else f"{100 * r['flag_rate']:.1f} %",
                    "–" if r.get("auroc") is None else f"{r['auroc']:.3f}")
    con.print(tab)
    review = p.get("worst_rung_right_or_flagged")
    if review:  # the other reading of a flag: the scan goes to a reader; readers pay the clean flag rate
        con.print("a flag read as 'send to a reader' (right or flagged), worst rung: " + "; ".join(
            f"{e} {100 * w['right_or_flagged']:.1f} % (rung {w['rung']})" for e, w in review.items())
            + f"; clean scans flagged {100 * c['flag_rate']:.1f} %")
    by_class = class_summary(p)  # what the pooled figure hides: which class the errors fall on
    if by_class:
        con.print(f"within each class: {by_class}", markup=False)
    by_lesion = lesion_summary(p)  # and within the tumours, which kind is missed (synthetic data only)
    if by_lesion:
        con.print(f"tumours by lesion kind: {by_lesion}", markup=False)
    con.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {len(rep['figures'])} figures "
              f"({rep['wall_s']:.0f} s)", markup=False)
