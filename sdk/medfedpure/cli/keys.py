"""Key management: ``medfedpure keys generate`` and ``medfedpure bundle sign`` (argument handling only).

The work lives in :mod:`medfedpure.export.signing` (signing) and :mod:`medfedpure.runtime.signing`
(verification); see docs/design.md, "Bundle format", for how the project's release key is held.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


@app.command("generate")
def generate_command(
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="Folder for NAME.pem and NAME.pub.pem."),
    name: str = typer.Option("medfedpure-signing", "--name", help="Key name (the file stem; reports show it)."),
) -> None:
    """Generate an Ed25519 signing key pair: the private key (mode 0600; keep it offline, never in a bundle)
    and the public key that deployments trust (--trusted-key, MEDFEDPURE_TRUSTED_KEYS)."""
    from medfedpure.export.signing import generate_key_pair
    from medfedpure.runtime.signing import TrustedKey

    try:
        priv, pub = generate_key_pair(out, name)
    except (ValueError, FileExistsError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    kid = TrustedKey.from_file(pub).key_id
    typer.echo(f"private key {priv} (mode 0600: keep it offline)\npublic key  {pub}\nkey id      {kid}")


def sign_command(
    bundle: Path = typer.Argument(..., help="Bundle folder to (re-)sign in place."),
    key: Path = typer.Option(..., "--key", "-k", dir_okay=False, help="Ed25519 private key (PEM)."),
) -> None:
    """Sign a bundle's manifest (e.g. after a recalibration); every other check must pass first.
    The manifest is unchanged, so the bundle id stays the same."""
    from medfedpure.export.signing import sign_bundle
    from medfedpure.runtime.bundle import BundleError

    try:
        vb = sign_bundle(bundle, key)
    except (BundleError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    assert vb.signer is not None
    typer.echo(f"signed bundle {vb.bundle_id} with key {vb.signer.key_id}")
