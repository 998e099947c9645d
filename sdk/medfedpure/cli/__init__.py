"""The ``medfedpure`` command line: argument handling only; the work lives in the library.

Each area owns a sub-application next to its code (``data/cli.py``, ``train/cli.py``, …) and is
mounted here. Heavy imports (torch, onnxruntime, flwr) happen inside the commands, so that
``medfedpure --help`` is instant; a missing optional one is reported with the extra that provides
it (:func:`medfedpure.cli.common.guard_extras`).
"""

from __future__ import annotations

import typer

from medfedpure import __version__
from medfedpure.cli.bench import bench_command
from medfedpure.cli.bundle import app as bundle_app
from medfedpure.cli.certify import certify_command
from medfedpure.cli.common import guard_extras
from medfedpure.cli.data import app as data_app
from medfedpure.cli.eval import eval_command
from medfedpure.cli.fed import app as fed_app
from medfedpure.cli.keys import app as keys_app
from medfedpure.cli.listen import listen_command
from medfedpure.cli.replay import replay_command
from medfedpure.cli.runtime import register as register_runtime_commands
from medfedpure.cli.serve import serve_command
from medfedpure.cli.train import app as train_app
from medfedpure.cli.train import calibrate_command

app = typer.Typer(
    name="medfedpure",
    help="Adversarially robust brain-MRI tumour classification: data, training, export, inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

app.add_typer(data_app, name="data", help="Generate, split and inspect data sets (synthetic or Br35H).")
app.add_typer(train_app, name="train", help="Train the classifier, the MAE detector and the purifier on one site.")
app.command("calibrate")(calibrate_command)
app.add_typer(fed_app, name="fed", help="Federated training with Flower: sim (one machine), deploy (SuperLink + SuperNodes), compare.")
register_runtime_commands(app)  # run, demo, export, verify-bundle
app.command("certify")(certify_command)  # certified radii by denoised smoothing
app.command("eval")(eval_command)  # attack ladder + sanity checks → report
app.command("replay")(replay_command)  # re-run an audit record and compare field by field
app.add_typer(bundle_app, name="bundle", help="Build the default bundle (data, federated training, calibration, export, install); sign, reissue or install a bundle; choose its policy.")
app.add_typer(keys_app, name="keys", help="Bundle signing keys: generate an Ed25519 key pair.")
app.command("serve")(serve_command)  # HTTP service: /v1/classify, /v1/bundle, /healthz
app.command("listen")(listen_command)  # DICOM node: C-STORE in, Structured Report out
app.command("bench")(bench_command)  # latency and throughput of a bundle on this machine
# Last, after every command: a missing optional dependency is one line naming its extra, exit code 2.
guard_extras(app)


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
