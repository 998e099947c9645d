"""``medfedpure listen``: run the DICOM node (argument handling only).

The node is :class:`medfedpure.node.scp.DicomNode`; pynetdicom and highdicom are imported inside the
command (``medfedpure --help`` stays instant; they come with ``pip install medfedpure[dicom]``;
without them the command says so in one line, exit code 2).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import click
import typer

from medfedpure.cli.common import BACKEND_CHOICE, DEVICE_CHOICE, POLICY_CHOICE, check_extra
from medfedpure.cli.runtime import (
    ALLOW_UNSIGNED_HELP,
    BACKEND_HELP,
    DEVICE_HELP,
    EXPECTED_ID_HELP,
    TRUSTED_KEY_HELP,
)

NODE_LOG_LEVELS = ("debug", "info", "warning", "error")


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def listen_command(
    ae_title: str = typer.Option("MEDFEDPURE", "--ae-title", help="The node's AE title (1-16 characters); "
                                 "associations addressed to another title are rejected."),
    port: int = typer.Option(11112, min=0, max=65535, help="TCP port (0: a free one, printed at start)."),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Address to listen on (loopback unless --allow-remote)."),
    forward: tuple[str, str] | None = typer.Option(None, "--forward", metavar="HOST:PORT AET",
                                                   help="C-STORE each report to this Storage SCP."),
    store: Path | None = typer.Option(None, "--store", file_okay=False,
                                      help="Write each report as DIR/<SOP Instance UID>.dcm instead."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP, click_type=BACKEND_CHOICE),
    device: str = typer.Option("auto", help=DEVICE_HELP, click_type=DEVICE_CHOICE),
    policy: str | None = typer.Option(None, help="Gate policy (adaptive or floor); default: the bundle's.",
                                      click_type=POLICY_CHOICE),
    threads: int = typer.Option(0, min=0, help="Inference threads per engine (0: the runtime's default)."),
    max_bytes: int = typer.Option(64 * 2**20, "--max-bytes", min=1, help="Largest dataset classified, bytes "
                                  "(a larger one is answered 0xA700 out of resources)."),
    max_concurrent: int = typer.Option(2, "--max-concurrent", min=1, help="Inferences running at once."),
    timeout_s: float = typer.Option(30.0, "--timeout-s", min=0.001, help="Budget per scan; past it the report "
                                                                          "says status unverified."),
    allow_calling_aet: list[str] | None = typer.Option(None, "--allow-calling-aet", help="Accept associations "
                                                       "only from this calling AE title; repeatable."),
    expected_id: str | None = typer.Option(None, "--expected-id", help=EXPECTED_ID_HELP),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help=TRUSTED_KEY_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Listen on a non-loopback address. Plain "
                                      "DICOM has no authentication beyond AE titles: expose the node with --tls-cert/"
                                      "--tls-key, --tls-ca and --tls-require-client-cert, and --allow-calling-aet."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", dir_okay=False, help="The node's TLS certificate "
                                         "(PEM, may hold its chain): listen with DICOM TLS (TLS 1.2+) only."),
    tls_key: Path | None = typer.Option(None, "--tls-key", dir_okay=False, help="The unencrypted private key of "
                                        "--tls-cert (PEM)."),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", dir_okay=False, help="CA certificate(s) (PEM) that "
                                       "client certificates are verified against."),
    tls_require_client_cert: bool = typer.Option(False, "--tls-require-client-cert", help="Refuse TLS clients "
                                                 "without a certificate signed by --tls-ca (mutual TLS)."),
    forward_tls_ca: Path | None = typer.Option(None, "--forward-tls-ca", dir_okay=False, help="Forward the reports "
                                               "over TLS; the destination's certificate must be signed by this CA."),
    forward_tls_cert: Path | None = typer.Option(None, "--forward-tls-cert", dir_okay=False, help="The node's "
                                                 "client certificate (PEM) for the forward destination."),
    forward_tls_key: Path | None = typer.Option(None, "--forward-tls-key", dir_okay=False, help="The unencrypted "
                                                "key of --forward-tls-cert (PEM)."),
    forward_tls_hostname: str | None = typer.Option(None, "--forward-tls-hostname", help="Host name the "
                                                    "destination's certificate must name (default: the "
                                                    "--forward host)."),
    log_level: str = typer.Option("info", "--log-level", help="Log level of the medfedpure.node logger.",
                                  click_type=click.Choice(NODE_LOG_LEVELS, case_sensitive=False)),
    audit: Path | None = typer.Option(None, "--audit", dir_okay=False, help="Append one audit record (schema "
                                      "version 1) per classified image or frame to this JSON-lines file."),
) -> None:
    """Listen for MR images over DICOM (C-STORE), classify each one and send its Structured Report to
    --forward or --store; answers C-ECHO. Ctrl-C stops it (exit code 2 on a bad setting)."""
    check_extra("dicom")  # before any slow work: one line naming the extra
    from medfedpure.node.config import ForwardTarget, NodeConfig

    try:
        target = None if forward is None else ForwardTarget.parse(*forward)
        cfg = NodeConfig(ae_title=ae_title, port=port, bind=bind, forward=target,
                         store=None if store is None else str(store), bundle=None if bundle is None else str(bundle),
                         backend=backend, device=device, threads=threads, policy=policy, timeout_s=timeout_s,
                         expected_id=expected_id, trusted_keys=tuple(str(k) for k in trusted_key or ()),
                         allow_unsigned=allow_unsigned, max_bytes=max_bytes, max_concurrent=max_concurrent,
                         calling_aets=tuple(allow_calling_aet or ()), allow_remote=allow_remote,
                         tls_cert=_path(tls_cert), tls_key=_path(tls_key), tls_ca=_path(tls_ca),
                         tls_require_client_cert=tls_require_client_cert, forward_tls_ca=_path(forward_tls_ca),
                         forward_tls_cert=_path(forward_tls_cert), forward_tls_key=_path(forward_tls_key),
                         forward_tls_hostname=forward_tls_hostname)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("medfedpure.node").setLevel(log_level.upper())
    if log_level.lower() != "debug":
        for name in ("pynetdicom", "highdicom"):  # per-association and per-module chatter
            logging.getLogger(name).setLevel(logging.WARNING)

    if audit is not None:
        from medfedpure.runtime.audit import audit_file_handler

        try:
            logging.getLogger("medfedpure").addHandler(audit_file_handler(audit))
            logging.getLogger("medfedpure.audit").setLevel(logging.INFO)  # whatever --log-level says
        except OSError as e:
            typer.echo(f"error: {audit}: cannot be opened for appending ({e})", err=True)
            raise typer.Exit(2) from e
    from medfedpure.node.scp import DicomNode
    from medfedpure.runtime.bundle import BundleError
    from medfedpure.runtime.engines import EngineError

    try:
        node = DicomNode(cfg)
    except (BundleError, EngineError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        node.start()
    except OSError as e:
        node.stop()
        typer.echo(f"error: cannot listen on {bind}:{port}: {e.strerror or e}; choose another --port or stop "
                   "the program that holds it", err=True)
        raise typer.Exit(1) from e

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)  # a service manager's stop is handled like Ctrl-C
    typer.echo(f"medfedpure listen: AE {cfg.ae_title} on {bind}:{node.port}{node.transport}, "
               f"bundle {node.defender.bundle.short_id}, "
               f"reports {node.destination}; Ctrl-C stops", err=True)
    node.serve_forever()
