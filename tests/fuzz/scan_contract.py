"""The contract that every fuzz driver checks on ``load_scan(bytes)`` and ``preprocess``.

For any byte string, ``medfedpure.load_scan(data)`` either returns a valid :class:`Scan` (float32,
finite, ``(H, W)`` or ``(H, W, 3)`` within ``MIN_SIDE``/``MAX_SIDE``/``MAX_PIXELS``, metadata a
dict) or raises a ``ScanError`` subclass. Anything else (another exception, a hang, an
allocation far beyond what the input can justify) is a contract violation. A multi-frame input
that is refused with ``ScanMultiFrameError`` is loaded again with its first and last frame, and
every accepted scan goes through ``preprocess``, which returns a ``(1, S, S)`` float32 array in
[0, 1] or raises ``ScanError`` (``ScanConstantError`` for no robust contrast).

Used by the atheris driver (``fuzz_load_scan.py``, where libFuzzer enforces time and memory) and
by the hypothesis suite (``tests/test_fuzz_scan.py``, where :func:`check_bytes` enforces them
itself with a timer signal and ``tracemalloc``).
"""

from __future__ import annotations

import contextlib
import re
import signal
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from medfedpure.scan import Scan, ScanError, ScanMultiFrameError, load_scan, preprocess
from medfedpure.scan.limits import MAX_PIXELS, MAX_SIDE, MIN_SIDE

__all__ = [
    "CORPUS",
    "PREPROCESS_SIZE",
    "ContractViolation",
    "FuzzLimits",
    "check_bytes",
    "check_scan",
    "run_contract",
    "warm_up",
]

CORPUS = Path(__file__).resolve().parent / "corpus"
PREPROCESS_SIZE = 64  # small model input: exercises the normalisation and resize at little cost


class ContractViolation(AssertionError):
    """The reader broke its contract on one input (the message names how)."""


@dataclass(frozen=True)
class FuzzLimits:
    """Resource limits for one input.

    Attributes:
        time_s: wall-clock seconds allowed for ``load_scan`` + ``preprocess`` of one input
            (0 disables the timer; the atheris driver leaves time to libFuzzer's ``-timeout``).
        memory_bytes: peak of traced (Python and numpy) allocations allowed for one input
            (0 disables ``tracemalloc``; the atheris driver uses libFuzzer's ``-rss_limit_mb``).
    """

    time_s: float = 10.0
    memory_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        if not self.time_s >= 0:
            raise ValueError(f"time_s must be >= 0 seconds, got {self.time_s!r}")
        if self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {self.memory_bytes!r}")


class _InputTimeout(BaseException):
    """Raised by the timer signal; a BaseException so that ``except Exception`` cannot swallow it."""


def check_scan(scan: object) -> None:
    """Raise :class:`ContractViolation` unless ``scan`` is a valid Scan from bytes."""
    if not isinstance(scan, Scan):
        raise ContractViolation(f"load_scan returned {type(scan).__name__}, not a Scan")
    px = scan.pixels
    if not isinstance(px, np.ndarray) or px.dtype != np.float32:
        raise ContractViolation(f"pixels are {type(px).__name__} {getattr(px, 'dtype', '')}, not float32")
    if not (px.ndim == 2 or (px.ndim == 3 and px.shape[2] == 3)):
        raise ContractViolation(f"pixels have shape {px.shape}, not (H, W) or (H, W, 3)")
    h, w = px.shape[:2]
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE and h * w <= MAX_PIXELS):
        raise ContractViolation(f"pixels are {h}x{w}: outside the size limits")
    if not np.isfinite(px).all():
        raise ContractViolation("pixels contain NaN or Inf")
    if px.flags.writeable:
        raise ContractViolation("pixels are writeable: a Scan must be read-only")
    if float(px.min()) == float(px.max()):
        raise ContractViolation("pixels are constant: load_scan must refuse them")
    meta = scan.meta
    if not isinstance(meta, dict):
        raise ContractViolation(f"meta is {type(meta).__name__}, not a dict")
    kind = meta.get("source_kind")
    if not (isinstance(kind, str) and kind.startswith("bytes:")):
        raise ContractViolation(f"meta['source_kind'] is {kind!r}, not 'bytes:<format>'")
    nf = meta.get("num_frames")
    if not (isinstance(nf, int) and nf >= 1):
        raise ContractViolation(f"meta['num_frames'] is {nf!r}, not an int >= 1")


def _check_preprocess(scan: Scan) -> None:
    try:
        x = preprocess(scan, PREPROCESS_SIZE)
    except ScanError:
        return
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (1, PREPROCESS_SIZE, PREPROCESS_SIZE)):
        raise ContractViolation(f"preprocess returned {getattr(x, 'shape', type(x))}, not (1, S, S) float32")
    if not (np.isfinite(x).all() and float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise ContractViolation("preprocess output is not finite and within [0, 1]")


def _load(data: bytes, frame: int | None) -> str:
    """One ``load_scan`` call under the contract; returns an outcome label."""
    try:
        scan = load_scan(data, frame=frame)
    except ScanMultiFrameError as exc:
        if frame is not None:
            raise ContractViolation(f"ScanMultiFrameError although frame={frame} was given") from exc
        m = re.search(r"has (\d+) frames", str(exc))
        if m is None:
            raise ContractViolation(f"ScanMultiFrameError without a frame count: {exc}") from exc
        n = int(m.group(1))
        return "multiframe[" + ",".join(_load(data, i) for i in sorted({0, n - 1})) + "]"
    except ScanError as exc:
        return type(exc).__name__
    except Exception as exc:  # the contract: nothing but ScanError
        raise ContractViolation(f"load_scan raised {type(exc).__name__}: {exc}") from exc
    check_scan(scan)
    try:
        _check_preprocess(scan)
    except ContractViolation:
        raise
    except Exception as exc:
        raise ContractViolation(f"preprocess raised {type(exc).__name__}: {exc}") from exc
    return "Scan" + "x".join(str(s) for s in scan.pixels.shape)


def run_contract(data: bytes) -> str:
    """Check the contract on ``data`` without resource limits; returns the outcome label
    ("Scan64x64", "ScanTruncatedError", "multiframe[Scan100x100x3,...]", ...)."""
    return _load(bytes(data), None)


@contextlib.contextmanager
def _time_box(seconds: float) -> Iterator[None]:
    if seconds <= 0:
        yield
        return

    def _alarm(signum: int, frame: object) -> None:
        raise _InputTimeout

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_warm = False


def warm_up() -> None:
    """Run the contract once over the seed corpus, untimed and untraced: the first DICOM or TIFF
    input imports pydicom's and Pillow's decoder modules, which must not count against one input's
    time or memory (import under ``tracemalloc`` is slow)."""
    global _warm
    if not _warm:
        for path in sorted(CORPUS.iterdir()):
            if path.is_file():
                with contextlib.suppress(ContractViolation):
                    run_contract(path.read_bytes())
        _warm = True


def check_bytes(data: bytes, limits: FuzzLimits = FuzzLimits()) -> str:
    """:func:`run_contract` with the time and memory limits; returns the outcome label.

    Raises:
        ContractViolation: a non-ScanError exception, an invalid Scan or preprocess output, more
            than ``limits.time_s`` seconds, or a traced peak above ``limits.memory_bytes``.
    """
    warm_up()
    tracing = limits.memory_bytes > 0 and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start(1)
    if limits.memory_bytes > 0:
        tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0] if limits.memory_bytes > 0 else 0
    try:
        with _time_box(limits.time_s):
            outcome = run_contract(data)
        if limits.memory_bytes > 0:
            peak = tracemalloc.get_traced_memory()[1] - base
            if peak > limits.memory_bytes:
                raise ContractViolation(
                    f"{len(data)}-byte input peaked at {peak / 2**20:.0f} MiB of traced memory "
                    f"(limit {limits.memory_bytes / 2**20:.0f} MiB); outcome {outcome}"
                )
    except _InputTimeout:
        raise ContractViolation(f"{len(data)}-byte input took longer than {limits.time_s} s") from None
    finally:
        if tracing:
            tracemalloc.stop()
    return outcome
