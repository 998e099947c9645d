"""``medfedpure serve``: run the guarded classifier as an HTTP service (argument handling only).

The application is :mod:`medfedpure.serve.app`; uvicorn runs it through the factory
``medfedpure.serve.app:app_from_env``, with the settings in ``MEDFEDPURE_SERVE_CONFIG`` so that every
worker process builds the same service. FastAPI and uvicorn are imported inside the command
(``medfedpure --help`` stays instant; they come with ``pip install medfedpure[serve]``; without them
the command says so in one line, exit code 2).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from medfedpure.cli.common import BACKEND_CHOICE, DEVICE_CHOICE, LOG_LEVEL_CHOICE, POLICY_CHOICE, check_extra
from medfedpure.cli.runtime import (
    ALLOW_UNSIGNED_HELP,
    BACKEND_HELP,
    DEVICE_HELP,
    EXPECTED_ID_HELP,
    TRUSTED_KEY_HELP,
)


def serve_command(
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback unless --allow-remote)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    backend: str = typer.Option("auto", help=BACKEND_HELP, click_type=BACKEND_CHOICE),
    device: str = typer.Option("auto", help=DEVICE_HELP, click_type=DEVICE_CHOICE),
    policy: str | None = typer.Option(None, help="Default gate policy (adaptive or floor; a request may name "
                                                 "its own); default: the bundle's.", click_type=POLICY_CHOICE),
    max_bytes: int = typer.Option(16 * 2**20, "--max-bytes", min=1, help="Largest request body (one scan file), bytes."),
    workers: int = typer.Option(1, min=1, max=64, help="uvicorn worker processes (each loads its own Defender)."),
    threads: int = typer.Option(0, min=0, help="Inference threads per engine (0: the runtime's default)."),
    max_concurrent: int = typer.Option(4, "--max-concurrent", min=1, help="Inferences running at once per worker."),
    timeout_s: float = typer.Option(30.0, "--timeout-s", min=0.001, help="Budget per call; past it the answer is "
                                                                          "status unverified."),
    expected_id: str | None = typer.Option(None, "--expected-id", help=EXPECTED_ID_HELP),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help=TRUSTED_KEY_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=ALLOW_UNSIGNED_HELP),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Listen on a non-loopback address. The service "
                                      "has no TLS and no authentication: put it behind a proxy that adds both."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level.", click_type=LOG_LEVEL_CHOICE),
    audit: Path | None = typer.Option(None, "--audit", dir_okay=False, help="Append one audit record (schema "
                                      "version 1) per /v1/classify decision or refusal to this JSON-lines file "
                                      "(every worker appends to it); a record that cannot be written makes the "
                                      "request fail with 500."),
) -> None:
    """Serve POST /v1/classify, GET /v1/bundle and GET /healthz over HTTP (exit code 2 on a bad setting,
    such as an --audit file that cannot be opened for appending)."""
    from medfedpure.runtime.network import is_loopback
    from medfedpure.serve.config import CONFIG_ENV, ServeConfig

    if not is_loopback(host) and not allow_remote:
        typer.echo(f"error: --host {host} is not a loopback address; the service has no TLS or authentication. "
                   "Pass --allow-remote to listen on the network anyway (behind a proxy that adds both).", err=True)
        raise typer.Exit(2)
    try:
        cfg = ServeConfig(bundle=None if bundle is None else str(bundle), backend=backend, device=device,
                          threads=threads, policy=policy, max_bytes=max_bytes, max_concurrent=max_concurrent,
                          expected_id=expected_id, trusted_keys=tuple(str(k) for k in trusted_key or ()),
                          allow_unsigned=allow_unsigned, timeout_s=timeout_s,
                          audit=None if audit is None else str(audit))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if cfg.audit is not None:  # refuse to start, rather than lose records, when the file cannot be opened
        from medfedpure.runtime.audit import audit_file_handler

        try:
            audit_file_handler(cfg.audit).close()
        except OSError as e:
            typer.echo(f"error: --audit {audit}: cannot be opened for appending ({e.strerror or e}); choose a "
                       "writable file", err=True)
            raise typer.Exit(2) from e
    check_extra("serve")  # FastAPI is imported by the workers only: check the extra here, in one line
    import uvicorn
    os.environ[CONFIG_ENV] = cfg.to_env()
    uvicorn.run("medfedpure.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, lifespan="on", server_header=False)
