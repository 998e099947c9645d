"""The ``medfedpure`` command line: argument handling only; the work lives in the library.

Each area owns a sub-application next to its code (``data/cli.py``, ``train/cli.py``, …) and is
mounted here. Heavy imports (torch, onnxruntime, flwr) happen inside the commands, so that
``medfedpure --help`` is instant.
"""

from __future__ import annotations

import typer

from medfedpure import __version__
from medfedpure.data.cli import app as data_app

app = typer.Typer(
    name="medfedpure",
    help="Adversarially robust brain-MRI tumour classification: data, training, export, inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

app.add_typer(data_app, name="data", help="Generate, split and inspect data sets (synthetic or Br35H).")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"medfedpure {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """medfedpure command line."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
