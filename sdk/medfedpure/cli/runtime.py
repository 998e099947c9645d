"""Runtime commands: ``medfedpure run``, ``demo``, ``export`` and ``verify-bundle`` (argument handling only).

Registered on the root app by ``medfedpure/cli.py``; the work lives in :mod:`medfedpure.runtime.defender`,
:mod:`medfedpure.runtime.bundle`, :mod:`medfedpure.demo` and :mod:`medfedpure.export.pipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medfedpure.cli.common import BACKEND_CHOICE, DEVICE_CHOICE, POLICY_CHOICE, check_extra, console

BACKEND_HELP = "auto, onnxruntime, torch or tensorrt."
DEVICE_HELP = "auto, cpu or cuda."
EXPECTED_ID_HELP = "Pin the bundle id (sha256 of manifest.json, or a prefix of at least 16 hex digits)."
TRUSTED_KEY_HELP = ("Also trust this Ed25519 public key (PEM); repeatable. The shipped release key and "
                    "MEDFEDPURE_TRUSTED_KEYS are always trusted.")
ALLOW_UNSIGNED_HELP = "Accept a bundle that no trusted key signed (refused by default)."
CSV_COLUMNS = ("source", "status", "label", "p(tumor)", "flagged", "score", "t_star", "seed", "reason")


def _load(bundle: Path | None, backend: str, device: str, threads: int, policy: str | None = None, *,
          expected_id: str | None = None, trusted_keys: list[Path] | None = None, allow_unsigned: bool = False):
    from medfedpure.runtime.bundle import BundleError
    from medfedpure.runtime.defender import Defender
    from medfedpure.runtime.engines import EngineError

    trust = dict(expected_id=expected_id, trusted_keys=list(trusted_keys or []) or None,
                 allow_unsigned=allow_unsigned)
    try:
        if bundle is None:
            return Defender.default(backend, device, threads=threads, policy=policy, **trust)
        return Defender.load(bundle, backend, device, threads=threads, policy=policy, **trust)
    except (BundleError, EngineError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


def run_command(
    scans: list[str] = typer.Argument(..., help="Scan files (DICOM, PNG, JPEG, TIFF, BMP), folders (every file "
                                      "under them) or quoted globs ('scans/**/*.dcm')."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP, click_type=BACKEND_CHOICE),
    device: str = typer.Option("auto", help=DEVICE_HELP, click_type=DEVICE_CHOICE),
    seed: int | None = typer.Option(None, min=0, max=2**63 - 1,
                                    help="Purification RNG key, 0 to 2**63 - 1 (default: a fresh one per scan)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON Result per line (the audit format)."),
    threads: int = typer.Option(0, min=0, help="Inference threads (0: the runtime's default)."),
    policy: str | None = typer.Option(None, help="Gate policy: adaptive (unflagged scans skip the purifier) or "
                                                 "floor (every scan purified); default: the bundle's.",
                                      click_type=POLICY_CHOICE),
    expected_id: str | None = typer.Option(None, "--expected-id", help=EXPECTED_ID_HELP + " Default for the "
                                           "embedded bundle: its shipped id."),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help=TRUSTED_KEY_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    frame: str | None = typer.Option(None, "--frame", help="Frame A, or frames A:B (B exclusive), of every "
                                     "(multi-frame) input: one record per frame."),
    out: Path | None = typer.Option(None, "--out", "-o", dir_okay=False, help="Stream one record per input to "
                                    "this file as it is produced: .jsonl (JSON lines) or .csv (columns "
                                    + ", ".join(CSV_COLUMNS) + "), flushed after each."),
) -> None:
    """Classify scans with the guarded pipeline, every file (a refused one does not stop the others).

    A folder stands for every file under it (recursively; a file that is not a scan is reported as
    refused), a quoted glob for its matches. With ``--frame`` a record's source is ``PATH#frame=i``.

    Exit code 0: every scan ok; 1: some scan unverified (none refused); 2: some scan refused (not a usable
    scan: unreadable, too large, not a regular file, ...) or a usage error (bad seed, missing or bad bundle).
    """
    from rich.table import Table

    from medfedpure.progress import progress
    from medfedpure.runtime.series import expand_inputs, parse_frame_range

    if out is not None and out.suffix.lower() not in (".jsonl", ".csv"):
        raise typer.BadParameter(f"{out}: expected a .jsonl or .csv file", param_hint="--out")
    try:
        frames: list[int | None] = list(parse_frame_range(frame)) if frame is not None else [None]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--frame") from e
    items = [(s, f) for s in expand_inputs(scans) for f in frames]
    d = _load(bundle, backend, device, threads, policy, expected_id=expected_id, trusted_keys=trusted_key,
              allow_unsigned=allow_unsigned)
    table = Table(title=f"medfedpure · bundle {d.bundle.short_id} · {d.engine.describe()['backend']} · "
                        f"policy {d.policy}")
    for col in ("scan", "label", "p(tumor)", "flagged", "score", "t*", "status", "ms"):
        table.add_column(col)
    statuses: set[str] = set()
    sink = _RecordSink(out) if out is not None else None
    bar = progress(total=len(items), desc="run", unit="scan", enabled=len(items) > 1)
    try:
        for s, fi in items:
            try:
                r = _run_one(d, s, fi, seed)  # a refused scan comes back as status "refused"
            except (TypeError, ValueError) as e:  # usage errors (the seed): one line, no traceback
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from e
            src = s if fi is None else f"{s}#frame={fi}"
            statuses.add(r.status)
            if sink is not None:
                sink.write(s, fi, r)
            if r.status == "refused":
                typer.echo(f"refused: {src}: {r.reason}", err=True)
            if as_json:
                typer.echo(json.dumps({"scan": s, **({} if fi is None else {"frame": fi}), **r.to_dict()},
                                      allow_nan=False))
            else:
                table.add_row(src, str(r.label), f"{r.probabilities.get('tumor', float('nan')):.3f}",
                              str(r.flagged), f"{r.score:.4g}" if r.score is not None else "-", str(r.t_star),
                              r.status if r.ok else f"{r.status}: {r.reason}", f"{r.latency_ms['total']:.1f}")
            bar.update(1)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    if not as_json:
        console().print(table)
    if "refused" in statuses:
        raise typer.Exit(2)
    if statuses - {"ok"}:
        raise typer.Exit(1)


def _run_one(d, source: str, frame: int | None, seed: int | None):
    """One input's Result: the file through ``run_batch``, or one frame of it loaded here (refused as there)."""
    if frame is None:
        return d.run_batch([source], seeds=[seed])[0]
    from medfedpure.scan import ScanError, load_scan

    try:
        scan = load_scan(source, frame=frame, limits=d.limits)
    except ScanError as e:
        return d.refused_result(e, seed=seed)
    return d.run_batch([scan], seeds=[seed])[0]


class _RecordSink:
    """``--out``: one record per input, JSON lines or CSV by the file's suffix, flushed after every record so
    a stopped run keeps what it produced. The source is the path as the caller gave it (no absolute path)."""

    def __init__(self, path: Path) -> None:
        import csv

        self.fh = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.csv = csv.writer(self.fh) if path.suffix.lower() == ".csv" else None
        if self.csv is not None:
            self.csv.writerow(CSV_COLUMNS)
            self.fh.flush()

    def write(self, source: str, frame: int | None, r) -> None:
        if self.csv is None:
            rec = {"source": source, "frame": frame, **r.to_dict()}
            self.fh.write(json.dumps(rec, allow_nan=False) + "\n")
        else:
            p = r.probabilities.get("tumor")
            self.csv.writerow([source if frame is None else f"{source}#frame={frame}", r.status,
                               r.label or "", "" if p is None else repr(float(p)),
                               "" if r.flagged is None else str(bool(r.flagged)).lower(),
                               "" if r.score is None else repr(float(r.score)),
                               "" if r.t_star is None else r.t_star, r.seed, r.reason or ""])
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def demo_command(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for the figures and demo.json."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one)."),
    n: int = typer.Option(4, min=2, max=32, help="Number of synthetic scans."),
    eps: float = typer.Option(8 / 255, help="PGD ℓ∞ radius in [0,1] units."),
    steps: int = typer.Option(10, min=1, max=200, help="PGD steps."),
    backend: str = typer.Option("auto", help=BACKEND_HELP, click_type=BACKEND_CHOICE),
    device: str = typer.Option("auto", help=DEVICE_HELP, click_type=DEVICE_CHOICE),
    threads: int = typer.Option(0, min=0, help="Inference threads (0: the runtime's default)."),
) -> None:
    """Run the embedded bundle on synthetic scans, clean and PGD-attacked; print a table, write figures."""
    from rich.table import Table

    # The scans are rendered from nilearn's MNI152 templates (scipy, nibabel), attacked with torch and
    # drawn with matplotlib: check the extra before the bundle is loaded.
    check_extra("demo")
    from medfedpure.demo import DemoConfig, run_demo

    d = _load(bundle, backend, device, threads)
    try:
        cfg = DemoConfig(n=n, eps=eps, steps=steps)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    rows = run_demo(d, out, cfg)
    t = Table(title=f"medfedpure demo · bundle {d.bundle.short_id} · {d.engine.describe()['backend']} · "
                    f"PGD ℓ∞ ε={eps:.4f}, {steps} steps (synthetic scans)")
    for col in ("scan", "input", "true", "label", "flagged", "score", "t*", "ms"):
        t.add_column(col)
    for r in rows:
        lab = r["label"] if r["status"] == "ok" else "unverified"
        mark = "" if r["correct"] else " ✗"
        t.add_row(str(r["scan"]), r["input"], r["true"], f"{lab}{mark}", str(r["flagged"]),
                  f"{r['score']:.4g}" if r["score"] is not None else "-", str(r["t_star"]), f"{r['latency_ms']:.1f}")
    console().print(t)
    acc = {k: sum(r["correct"] for r in rows if r["input"] == k) / n for k in ("clean", "pgd")}
    typer.echo(f"accuracy clean {acc['clean']:.2f} · under PGD (defended) {acc['pgd']:.2f} · figures in {out}/")


def verify_bundle_command(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    expected_id: str | None = typer.Option(None, "--expected-id", help=EXPECTED_ID_HELP),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help=TRUSTED_KEY_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
) -> None:
    """Verify a bundle (signature by a trusted key, manifest, every sha256, no unlisted files or links);
    exit code 2 if it fails."""
    from rich.table import Table

    from medfedpure.runtime.bundle import BundleError, verify_bundle

    try:
        vb = verify_bundle(bundle, expected_id=expected_id, trusted_keys=list(trusted_key or []) or None,
                           allow_unsigned=allow_unsigned)
    except BundleError as e:
        typer.echo(f"REFUSED: {e}", err=True)
        raise typer.Exit(2) from e
    t = Table(title=f"bundle {vb.bundle_id}")
    for col in ("artefact", "path", "role", "format", "precision", "bytes", "sha256"):
        t.add_column(col)
    for a in vb.artefacts.values():
        t.add_row(a.name, a.path, a.role, a.format, a.precision, f"{a.bytes:,}", a.sha256[:16] + "…")
    console().print(t)
    typer.echo(f"signed by {vb.signer.name} (key {vb.signer.key_id})" if vb.signer is not None else
               "UNSIGNED: no valid signature by a trusted key (accepted because of --allow-unsigned)")
    prov = vb.manifest["provenance"]
    g = vb.spec.gate.to_dict()
    typer.echo(f"OK · format {vb.manifest['format_version']} · {vb.image_size} px · gate {g.get('stat')} "
               f"τ={g['tau']:.4g} policy={g.get('policy')} t*∈[{g['t_min']}, {g['t_max']}] · "
               f"purifier K={vb.spec.purifier.steps} · run {prov.get('run')} site {prov.get('site')} "
               f"commit {str(prov.get('code_commit'))[:10]}")


def export_command(
    run: Path = typer.Option(..., "--run", help="Training run folder (docs/interfaces.md 'Run folder')."),
    site: int = typer.Option(..., "--site", min=0, help="Site index k (RUN/site_k)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
    data: Path | None = typer.Option(None, "--data", help="Data root for validation scans (default: from RUN/config.json)."),
    num_val: int = typer.Option(64, min=2, help="Validation scans used to verify torch vs onnxruntime."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle at --out."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Also build TensorRT plans (batch 1-8) for this GPU."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="TensorRT timing cache file."),
    key: Path | None = typer.Option(None, "--key", dir_okay=False, help="Ed25519 private key (PEM) that signs the "
                                    "bundle (default: MEDFEDPURE_SIGNING_KEY, else written unsigned)."),
) -> None:
    """Export a site's models to a verified bundle: ONNX FP32 + FP16, torch weights, manifest with sha256."""
    from medfedpure.export.pipeline import ExportVerificationError, export_run

    try:
        vb, report = export_run(run, site, out, data=data, num_val=num_val, overwrite=overwrite,
                                progress=lambda m: typer.echo(f"· {m}"))
    except (ExportVerificationError, FileNotFoundError, FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    f32, f16 = report["fp32"], report["fp16"]
    typer.echo(f"verified on {report['num_scans']} val scans: FP32 classifier max|Δp| "
               f"{f32['classifier']['max_abs']:.2e} top-1 {f32['classifier']['top1']:.3f}; FP16 top-1 "
               f"{f16['classifier']['top1']:.3f}, mae max|Δ| {f16['mae']['max_abs']:.2e}, gate flags "
               f"{f16['gate_flag_agreement']:.3f}; FP16 purifier → classifier top-1 {report['purifier_fp16_top1']}")
    if key is not None:
        from medfedpure.export.signing import sign_bundle
        from medfedpure.runtime.bundle import BundleError

        try:
            vb = sign_bundle(out, key)
        except (BundleError, ValueError) as e:
            typer.echo(f"error: {e} (the bundle was written unsigned to {out})", err=True)
            raise typer.Exit(2) from e
    typer.echo(f"bundle {vb.bundle_id} written to {out}, "
               + (f"signed by key {vb.signer.key_id[:16]}…" if vb.signer else "UNSIGNED (sign: medfedpure bundle sign)"))
    if tensorrt:
        from medfedpure.export.tensorrt import TensorRTUnavailable, add_tensorrt_plans

        trt_out = out.with_name(out.name + "-tensorrt")
        try:
            vb = add_tensorrt_plans(out, trt_out, timing_cache=timing_cache, overwrite=overwrite)
        except (TensorRTUnavailable, RuntimeError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
        if key is not None:
            vb = sign_bundle(trt_out, key)
        typer.echo(f"bundle with TensorRT plans {vb.bundle_id} written to {trt_out}")


def register(app: typer.Typer) -> None:
    """Add the runtime commands to the root app."""
    app.command("run")(run_command)
    app.command("demo")(demo_command)
    app.command("export")(export_command)
    app.command("verify-bundle")(verify_bundle_command)
