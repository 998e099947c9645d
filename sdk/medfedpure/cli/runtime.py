"""Runtime commands: ``medfedpure run``, ``demo``, ``export`` and ``verify-bundle`` (argument handling only).

Registered on the root app by ``medfedpure/cli.py``; the work lives in :mod:`medfedpure.runtime.defender`,
:mod:`medfedpure.runtime.bundle`, :mod:`medfedpure.demo` and :mod:`medfedpure.export.pipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import typer
from rich.markup import escape

from medfedpure.cli.common import BACKEND_CHOICE, DEVICE_CHOICE, POLICY_CHOICE, check_extra, console

BACKEND_HELP = "auto, onnxruntime, torch or tensorrt."
DEVICE_HELP = "auto, cpu or cuda."
EXPECTED_ID_HELP = "Pin the bundle id (sha256 of manifest.json, or a prefix of at least 16 hex digits)."
TRUSTED_KEY_HELP = ("Also trust this Ed25519 public key (PEM); repeatable. The shipped release key and "
                    "MEDFEDPURE_TRUSTED_KEYS are always trusted.")
ALLOW_UNSIGNED_HELP = "Accept a bundle that no trusted key signed (refused by default)."
LOG_LEVEL_CHOICE = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
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
    dicom_out: Path | None = typer.Option(None, "--dicom-out", file_okay=False, help="Write a DICOM Structured "
                                          "Report of each DICOM input's Result to this folder, named by its SOP "
                                          "Instance UID (needs the dicom extra)."),
    dicom_sc: str | None = typer.Option(None, "--dicom-sc", help="With --dicom-out, also write Secondary "
                                        "Captures: purified, patch-map, or both comma-separated."),
    allow_out_of_scope: bool = typer.Option(False, "--allow-out-of-scope", help="Run scans outside the "
                                            "bundle's scope (modality, body part, image type, orientation) "
                                            "anyway; the override is recorded in each result."),
    audit: Path | None = typer.Option(None, "--audit", dir_okay=False, help="Append one audit record (schema "
                                      "version 1, docs/interfaces.md) per input to this JSON-lines file."),
    audit_source: bool = typer.Option(False, "--audit-source", help="Also write each input's path in its audit "
                                      "record (left out by default: paths can name patients)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print no table or JSON (the exit code, --out and "
                               "--audit still report)."),
    series: bool = typer.Option(False, "--series", help="Also aggregate DICOM inputs by series "
                                "(SeriesInstanceUID, slices ordered by position): a series is tumor if any ok "
                                "slice has p(tumor) >= 0.5, ok only if every slice is ok."),
    log_level: str = typer.Option("WARNING", "--log-level", help="Level of the medfedpure log on stderr: DEBUG, "
                                  "INFO (also prints the audit records), WARNING, ERROR.",
                                  click_type=LOG_LEVEL_CHOICE),
) -> None:
    """Classify scans with the guarded pipeline, every file (a refused one does not stop the others).

    A folder stands for every file under it (recursively; a file that is not a scan is reported as
    refused), a quoted glob for its matches. With ``--frame`` a record's source is ``PATH#frame=i``.

    Exit code 0: every scan ok; 1: some scan unverified or out of scope (none refused); 2: some scan refused
    (not a usable scan: unreadable, too large, not a regular file, ...) or a usage error (bad seed, missing or
    bad bundle).
    """
    from rich.table import Table

    from medfedpure.progress import progress
    from medfedpure.runtime.audit import audit_record, log_audit
    from medfedpure.runtime.series import expand_inputs, parse_frame_range

    if out is not None and out.suffix.lower() not in (".jsonl", ".csv"):
        raise typer.BadParameter(f"{out}: expected a .jsonl or .csv file", param_hint="--out")
    try:
        frames: list[int | None] = list(parse_frame_range(frame)) if frame is not None else [None]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--frame") from e
    items = [(s, f) for s in expand_inputs(scans) for f in frames]
    if series and frame is not None:
        raise typer.BadParameter("--series aggregates single-frame slices: leave out --frame", param_hint="--series")
    slice_results: dict[str, object] = {}
    sc_kinds = _dicom_out_options(dicom_out, dicom_sc)
    d = _load(bundle, backend, device, threads, policy, expected_id=expected_id, trusted_keys=trusted_key,
              allow_unsigned=allow_unsigned)
    table = Table(title=f"medfedpure · bundle {d.bundle.short_id} · {d.engine.describe()['backend']} · "
                        f"policy {d.policy}")
    for col in ("scan", "label", "p(tumor)", "flagged", "score", "t*", "status", "ms"):
        table.add_column(col)
    statuses: set[str] = set()
    log_handlers = _setup_logging(log_level, audit)  # removed again in the finally below
    sink = _RecordSink(out) if out is not None else None
    bar = progress(total=len(items), desc="run", unit="scan", enabled=len(items) > 1)
    try:
        for s, fi in items:
            try:
                r = _run_one(d, s, fi, seed, allow_out_of_scope=allow_out_of_scope,
                             return_purified="purified" in sc_kinds,
                             return_patch_error="patch_map" in sc_kinds)  # a refused scan: status "refused"
            except (TypeError, ValueError) as e:  # usage errors (the seed): one line, no traceback
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from e
            src = s if fi is None else f"{s}#frame={fi}"
            statuses.add(r.status)
            slice_results[s] = r
            if dicom_out is not None:
                _write_dicom(dicom_out, s, src, r, sc_kinds, fi)
            if sink is not None:
                sink.write(s, fi, r)
            log_audit(audit_record(r, d, source=s, frame=fi, include_source=audit_source))
            if r.status == "refused":
                typer.echo(f"refused: {src}: {r.reason}", err=True)
            if quiet:
                pass
            elif as_json:
                typer.echo(json.dumps({"scan": s, **({} if fi is None else {"frame": fi}), **r.to_dict()},
                                      allow_nan=False))
            else:
                table.add_row(escape(src), str(r.label), f"{r.probabilities.get('tumor', float('nan')):.3f}",
                              str(r.flagged), f"{r.score:.4g}" if r.score is not None else "-", str(r.t_star),
                              r.status if r.ok else escape(f"{r.status}: {r.reason}"), f"{r.latency_ms['total']:.1f}")
            bar.update(1)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
        _close_logging(log_handlers)
    if not as_json and not quiet:
        console().print(table)
    if series:
        statuses |= _report_series(slice_results, as_json=as_json, quiet=quiet)
    if "refused" in statuses:
        raise typer.Exit(2)
    if statuses - {"ok"}:
        raise typer.Exit(1)


def _report_series(slice_results: dict, *, as_json: bool, quiet: bool) -> set[str]:
    """Group the DICOM inputs already run by SeriesInstanceUID and aggregate each series from its slices'
    Results (:func:`medfedpure.runtime.series.aggregate`; no slice runs twice); print a table or one JSON line
    per series (``"kind": "series"``). Inputs without a DICOM header or SeriesInstanceUID are named on stderr.
    Returns the series statuses."""
    from rich.table import Table

    from medfedpure.runtime.series import SeriesError, aggregate, group_series, read_header

    headers = []
    for src, r in slice_results.items():
        if r.status == "refused":
            continue
        try:
            headers.append(read_header(src))
        except SeriesError as e:
            typer.echo(f"not in a series: {src}: {e}", err=True)
    table = Table(title="series (any positive slice)")
    for col in ("series", "slices", "label", "max p(tumor)", "status"):
        table.add_column(col)
    statuses = set()
    for uid, hs in group_series(headers).items():
        sr = aggregate(uid, [h.source for h in hs], [h.position for h in hs], [slice_results[h.source] for h in hs])
        statuses.add(sr.status)
        if quiet:
            continue
        if as_json:
            typer.echo(json.dumps({"kind": "series", **sr.to_dict()}, allow_nan=False))
        else:
            table.add_row(escape(uid), str(len(hs)), str(sr.label), "-" if sr.p_tumor is None else f"{sr.p_tumor:.3f}",
                          sr.status if sr.ok else escape(f"{sr.status}: {sr.reason}"))
    if not as_json and not quiet:
        console().print(table)
    return statuses


def _setup_logging(level: str, audit: Path | None) -> list:
    """The ``medfedpure`` logger for this command: a stderr handler at ``level`` and, with ``audit``, a JSON-lines
    file handler (audit records only). Returns the handlers, removed again by :func:`_close_logging`."""
    import logging

    from medfedpure.runtime.audit import audit_file_handler

    log = logging.getLogger("medfedpure")
    log.setLevel(logging.DEBUG)
    console_handler = logging.StreamHandler()
    console_handler.setLevel(getattr(logging, level.upper()))
    console_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [console_handler]
    if audit is not None:
        try:
            handlers.append(audit_file_handler(audit))
        except OSError as e:
            raise typer.BadParameter(f"{audit}: cannot be opened for appending ({e})", param_hint="--audit") from e
    for h in handlers:
        log.addHandler(h)
    return handlers


def _close_logging(handlers: list) -> None:
    import logging

    for h in handlers:
        logging.getLogger("medfedpure").removeHandler(h)
        h.close()


def _run_one(d, source: str, frame: int | None, seed: int | None, **arrays: bool):
    """One input's Result: the file through ``run_batch``, or one frame of it loaded here (refused as there);
    ``arrays``: ``return_purified`` / ``return_patch_error`` for ``--dicom-sc``."""
    if frame is None:
        return d.run_batch([source], seeds=[seed], **arrays)[0]
    from medfedpure.scan import ScanError, load_scan

    try:
        scan = load_scan(source, frame=frame, limits=d.limits)
    except ScanError as e:
        return d.refused_result(e, seed=seed)
    return d.run_batch([scan], seeds=[seed], **arrays)[0]


def _dicom_out_options(dicom_out: Path | None, dicom_sc: str | None) -> tuple[str, ...]:
    """``--dicom-out`` / ``--dicom-sc`` checked before the bundle loads: the Secondary Capture kinds
    (``purified``, ``patch_map``); exit 2 when highdicom is missing."""
    if dicom_out is None:
        if dicom_sc is not None:
            raise typer.BadParameter("needs --dicom-out DIR", param_hint="--dicom-sc")
        return ()
    from medfedpure.runtime.dicom_out import INSTALL_HINT

    try:
        import highdicom  # noqa: F401
    except ImportError as e:
        typer.echo(f"error: --dicom-out needs highdicom: {INSTALL_HINT}", err=True)
        raise typer.Exit(2) from e
    kinds = [k.strip().replace("-", "_") for k in (dicom_sc or "").split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("purified", "patch_map")]
    if bad:
        raise typer.BadParameter(f"{', '.join(bad)}: expected purified, patch-map or both", param_hint="--dicom-sc")
    dicom_out.mkdir(parents=True, exist_ok=True)
    return tuple(dict.fromkeys(kinds))


def _write_dicom(folder: Path, source: str, label: str, r, sc_kinds: tuple[str, ...],
                 frame: int | None = None) -> None:
    """``--dicom-out``: the SR (and the requested Secondary Captures) of one DICOM input, each named by its own
    SOP Instance UID; a non-DICOM input gets a one-line note. Lines go to stderr (stdout may be JSON lines)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medfedpure.runtime.dicom_out import secondary_capture, structured_report

    try:
        header = pydicom.dcmread(source, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError):
        typer.echo(f"dicom-out: {label}: not a DICOM file, no SR written for it", err=True)
        return
    try:
        objs = [("SR", structured_report(r, header, frame=frame))]
        objs += [(k, secondary_capture(r, header, k, series_number=901 + i)) for i, k in enumerate(sc_kinds)
                 if r.status == "ok"]
    except (ValueError, TypeError) as e:
        typer.echo(f"dicom-out: {label}: no DICOM written: {e}", err=True)
        return
    if sc_kinds and r.status != "ok":
        typer.echo(f"dicom-out: {label}: status {r.status}, no Secondary Capture written", err=True)
    for kind, ds in objs:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        typer.echo(f"dicom-out: {label}: {kind} {path}", err=True)


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
    card: bool = typer.Option(False, "--card", help="After verifying, print the bundle's model card (MODEL_CARD.md); "
                              "exit code 1 if the bundle has none."),
) -> None:
    """Verify a bundle (signature by a trusted key, manifest, every sha256, no unlisted files or links);
    exit code 2 if it fails. With --card, print its model card (exit code 1 if it has none)."""
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
    if card:
        from medfedpure.runtime.bundle import CARD_ARTEFACT

        if not vb.has(CARD_ARTEFACT):
            typer.echo("no model card in this bundle (bundles exported before model cards have none: re-export, "
                       "or recalibrate with `medfedpure calibrate --bundle`, to add one)", err=True)
            raise typer.Exit(1)
        typer.echo("")
        typer.echo(vb.read_bytes(CARD_ARTEFACT).decode("utf-8"))


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
