"""atheris (libFuzzer) target: ``medfedpure.load_scan(bytes)`` and ``preprocess`` of its result.

Run::

    python tests/fuzz/fuzz_load_scan.py tests/fuzz/corpus -max_total_time=60

Each input must give a valid Scan or a ``ScanError`` (see ``scan_contract.py``); any other
exception is reported by libFuzzer as a crash, with the input saved as ``crash-<sha1>``. Time and
memory per input are libFuzzer's: unless given, ``-timeout=10`` (seconds per input: a hang) and
``-rss_limit_mb=2048`` (the whole process, including the loaded interpreter: room for one scan at
the decoded-bytes limit and its float copies, not for a decompression bomb) are added. Set
``MEDFEDPURE_FUZZ_KEEP_GOING=1`` to collect many findings in one run (see ``TestOneInput``).

The checked-in corpus stays as it is: when ``tests/fuzz/corpus`` is the first corpus directory,
a scratch directory (``$MEDFEDPURE_FUZZ_WORKDIR``, default ``<tmp>/medfedpure-fuzz``) is put in
front of it, and libFuzzer writes new inputs and crash files (``-artifact_prefix``) there. Add a
crasher to the corpus as ``crash-<what>.<ext>`` once it is fixed, with a regression test.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import atheris

_HERE = Path(__file__).resolve().parent
CORPUS = _HERE / "corpus"
DEFAULT_FLAGS = ("-timeout=10", "-rss_limit_mb=2048")

if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

# Coverage feedback from the Python parts of the readers: the scan package, Pillow's format
# plugins and pydicom (numpy and the C decoders are not instrumented).
with atheris.instrument_imports(include=["medfedpure.scan", "PIL", "pydicom"]):
    import medfedpure.scan  # noqa: F401
    import pydicom  # noqa: F401
    import pydicom.pixels  # noqa: F401
    from PIL import Image, PngImagePlugin  # noqa: F401
    from scan_contract import ContractViolation, run_contract


KEEP_GOING = os.environ.get("MEDFEDPURE_FUZZ_KEEP_GOING") == "1"
_seen: set[str] = set()


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    """One fuzz input: raises ``ContractViolation`` (a crash to libFuzzer) when the contract breaks.

    With ``MEDFEDPURE_FUZZ_KEEP_GOING=1`` a violation is instead saved once per distinct cause
    (exception type and the innermost frame that raised it) as ``violation-<n>`` in the scratch
    directory and fuzzing continues: many findings from one run.
    """
    if not KEEP_GOING:
        run_contract(data)
        return
    try:
        run_contract(data)
    except ContractViolation as exc:
        cause = exc.__cause__ or exc
        tb = traceback.extract_tb(cause.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
        key = f"{type(cause).__name__}@{where}"
        if key not in _seen:
            _seen.add(key)
            out = _workdir() / f"violation-{len(_seen)}"
            out.write_bytes(data)
            print(f"\n=== VIOLATION {key}: {exc} -> {out}", flush=True)


def _workdir() -> Path:
    return Path(os.environ.get("MEDFEDPURE_FUZZ_WORKDIR") or Path(tempfile.gettempdir()) / "medfedpure-fuzz")


def libfuzzer_argv(argv: list[str]) -> list[str]:
    """``argv`` with the default flags and, in front of the checked-in corpus, a scratch directory."""
    args = list(argv)
    flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    workdir = _workdir()
    dirs = [i for i, a in enumerate(args[1:], 1) if not a.startswith("-")]
    if dirs and Path(args[dirs[0]]).resolve() == CORPUS:
        (workdir / "corpus").mkdir(parents=True, exist_ok=True)
        args.insert(dirs[0], str(workdir / "corpus"))
    if "-artifact_prefix" not in flags:
        workdir.mkdir(parents=True, exist_ok=True)
        args.append(f"-artifact_prefix={workdir}{os.sep}")
    args += [f for f in DEFAULT_FLAGS if f.split("=", 1)[0] not in flags]
    return args


def main() -> None:
    # Corrupt inputs make Pillow and pydicom warn and log on most runs: noise that slows fuzzing.
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    atheris.Setup(libfuzzer_argv(sys.argv), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
