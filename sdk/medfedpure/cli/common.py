"""What every command shares: the optional-extra guard, the option choices and the console factory.

* :func:`guard_extras` wraps every command of the app once, so that a command whose lazy import of an
  optional dependency fails (torch, scipy, flwr, onnx, fastapi, …) prints one line naming the extra
  that provides it and exits with code 2 instead of a traceback. The extras and the modules they
  provide mirror ``[project.optional-dependencies]`` of pyproject.toml.
* ``*_CHOICE`` are ``click.Choice`` types for options with a fixed set of values, so that a typo is
  refused by the parser with the list of valid values (exit code 2) before anything is loaded. They
  are spelled out here because importing the library modules that define them would import
  onnxruntime or flwr on ``medfedpure --help``; tests check they equal the library's tuples.
* :func:`console` is the one rich console of the CLI: at its terminal's width on a terminal, and at
  least :data:`PIPED_WIDTH` columns when the output is piped, so tables are not cut at 80 columns.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import typer

_TRAIN_MODULES = ("torch", "nilearn", "nibabel", "scipy", "matplotlib")
# extra → top-level modules it provides (the ones the package imports lazily).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "demo": _TRAIN_MODULES,
    "train": _TRAIN_MODULES,
    "attacks": _TRAIN_MODULES + ("torchattacks",),
    "fed": _TRAIN_MODULES + ("flwr", "ray"),
    "export": _TRAIN_MODULES + ("onnx", "onnxscript"),
    "serve": ("fastapi", "uvicorn", "starlette", "anyio"),
    "dicom": ("highdicom", "pynetdicom"),
    "gpu": ("cuda",),
    "tensorrt": ("tensorrt",),
}
# module → the smallest extra that provides it (the order above is from small to large).
MODULE_EXTRA: dict[str, str] = {}
for _extra, _modules in EXTRA_MODULES.items():
    for _m in _modules:
        MODULE_EXTRA.setdefault(_m, _extra)
MODULE_EXTRA.update({m: "train" for m in ("nilearn", "nibabel", "scipy", "matplotlib")})

# command path (space-separated, as typed) → the extra its documentation names. A missing module that
# this extra provides is reported with it; any other with MODULE_EXTRA's.
COMMAND_EXTRAS: dict[str, str] = {
    "demo": "demo",
    "train": "train",
    "calibrate": "train",
    "data": "train",
    "fed": "fed",
    "bundle build": "fed",
    "export": "export",
    "serve": "serve",
    "listen": "dicom",
}


def extra_for(module: str, command_extra: str | None = None) -> str | None:
    """The extra that provides ``module`` (a dotted name; its top level counts), preferring
    ``command_extra`` when it provides it; None for a module no extra provides."""
    top = module.split(".", 1)[0]
    if command_extra is not None and top in EXTRA_MODULES.get(command_extra, ()):
        return command_extra
    return MODULE_EXTRA.get(top)


def missing_extra_message(extra: str, module: str) -> str:
    """The one line printed for a missing optional dependency."""
    return (f"error: this command needs the '{extra}' extra: pip install 'medfedpure[{extra}]' "
            f"(module {module!r} is not installed)")


@contextmanager
def extra_required(command_extra: str | None = None) -> Iterator[None]:
    """Turn a ModuleNotFoundError of an optional dependency into one line on stderr and exit code 2."""
    try:
        yield
    except ModuleNotFoundError as e:
        extra = extra_for(e.name or "", command_extra)
        if extra is None:  # not an optional dependency (a broken install): keep the traceback
            raise
        typer.echo(missing_extra_message(extra, e.name or "?"), err=True)
        raise typer.Exit(2) from None


def check_extra(extra: str) -> None:
    """Exit with code 2 and the one-line message unless every module of ``extra`` is importable
    (checked without importing them, before any slow work)."""
    for module in EXTRA_MODULES[extra]:
        if importlib.util.find_spec(module) is None:  # also None for a module blocked in sys.modules
            typer.echo(missing_extra_message(extra, module), err=True)
            raise typer.Exit(2)


def _guarded(callback: Callable[..., Any], command_extra: str | None) -> Callable[..., Any]:
    @functools.wraps(callback)  # typer reads the signature through __wrapped__
    def run(*args: Any, **kwargs: Any) -> Any:
        with extra_required(command_extra):
            return callback(*args, **kwargs)

    return run


def guard_extras(app: typer.Typer, path: str = "") -> None:
    """Wrap every command of ``app`` and of its sub-apps (recursively) in :func:`extra_required`, with
    the extra that :data:`COMMAND_EXTRAS` names for its path (or for its group). Call once, after
    every command is registered."""
    for info in app.registered_commands:
        if info.callback is None or getattr(info.callback, "_extras_guarded", False):
            continue
        name = info.name or info.callback.__name__.replace("_", "-")
        full = f"{path} {name}".strip()
        extra = COMMAND_EXTRAS.get(full, COMMAND_EXTRAS.get(path.split(" ", 1)[0]) if path else None)
        info.callback = _guarded(info.callback, extra)
        info.callback._extras_guarded = True  # type: ignore[attr-defined]
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_extras(group.typer_instance, f"{path} {group.name}".strip())


# Fixed value sets (equal to the library's tuples; tests/test_cli_packaging.py checks it).
BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")  # medfedpure.runtime.engines.BACKENDS
DEVICES = ("auto", "cpu", "cuda")  # medfedpure.runtime.engines.DEVICES
POLICIES = ("adaptive", "floor")  # medfedpure.runtime.defender.POLICIES
PRESETS = ("tiny", "small")  # medfedpure.build.config.PRESETS, medfedpure.fed.phases.PRESETS
STATS = ("hfratio", "mean", "topk", "nyqratio")  # medfedpure.gate.validate.STATS
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")  # medfedpure.fed.strategies.STRATEGIES
CLASSIFIER_SPLITS = ("moe", "fedbn", "all")  # medfedpure.fed.params.SPLITS less "none"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's

BACKEND_CHOICE = click.Choice(BACKENDS)
DEVICE_CHOICE = click.Choice(DEVICES)
POLICY_CHOICE = click.Choice(POLICIES)
PRESET_CHOICE = click.Choice(PRESETS)
STAT_CHOICE = click.Choice(STATS)
STRATEGY_CHOICE = click.Choice(STRATEGIES)
CLASSIFIER_SPLIT_CHOICE = click.Choice(CLASSIFIER_SPLITS)
LOG_LEVEL_CHOICE = click.Choice(LOG_LEVELS, case_sensitive=False)

PIPED_WIDTH = 160  # columns of a console whose output is not a terminal


#: ``--device`` of the training commands (``train classifier``, ``fed sim|deploy``, ``bundle build``)
DEVICE_CHOICE = click.Choice(("cpu", "cuda", "auto"))


def resolved_device(device: str) -> str:
    """``--device`` resolved before any work (``train.device.resolve_device``): ``cpu`` or ``cuda``; a name it
    refuses, or ``cuda`` without a GPU, is a usage error naming the option (exit 2)."""
    from medfedpure.train.device import DeviceError, resolve_device

    try:
        return resolve_device(device)
    except DeviceError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc


def console(*, stderr: bool = False, **kw: Any) -> Any:
    """The CLI's rich Console: on a terminal its width; piped or redirected, at least PIPED_WIDTH
    columns (rich would use 80) so table rows keep full names and hash prefixes."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    isatty = getattr(stream, "isatty", None)
    if "width" not in kw and not (isatty is not None and isatty()):
        kw["width"] = max(shutil.get_terminal_size((PIPED_WIDTH, 24)).columns, PIPED_WIDTH)
    return Console(stderr=stderr, **kw)
