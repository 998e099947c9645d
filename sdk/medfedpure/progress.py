"""The package's one progress display: a rich bar on a terminal, plain lines in a log.

Every progress bar of the package (training loops, trajectory caching, federated rounds, synthetic
data, attacks, the CLI) goes through :func:`progress`. On a terminal it draws a ``rich.progress``
bar on stderr; when stderr is not a terminal (a log file, a pipe, CI) it writes one plain line at
each tenth of the total and one at the end, with no carriage returns or cursor codes, so a log
reads line by line; a ``transient`` bar (one that vanishes when done) writes nothing there.
``enabled=False`` writes nothing. rich is a core dependency, so the runtime
install has it too.

It sits beside the layers (it imports nothing of the package), so data, train, fed, eval and cli may
all use it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO


class ProgressBar:
    """A tqdm-like handle: ``update(n)``, ``set(completed)``, ``set_postfix(...)``,
    ``set_description(...)``, ``close()``; a context manager, and iterable when made over an iterable."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool = True, transient: bool = False,
                 stream: TextIO | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if total is not None and total < 0:
            raise ValueError(f"total={total}: expected >= 0")
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = int(initial)
        self.postfix = ""
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self._closed = False
        self._pending = False  # a tenth was crossed; its line waits for the step's postfix
        self._last_tenth = self._tenth()
        self._rich: Any = None
        self._task: Any = None
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(enabled and isatty is not None and isatty())
        if self.interactive:
            self._start_rich(transient)
        if transient and not self.interactive:  # a bar meant to vanish leaves no lines in a log either
            self.enabled = False

    def _start_rich(self, transient: bool) -> None:
        from rich.console import Console
        from rich.errors import LiveError
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # descriptions and postfixes hold file names and metrics: plain text, never rich markup
        self._rich = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                              TextColumn(self.unit, markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                              TextColumn("{task.fields[postfix]}", markup=False), console=Console(file=self.stream),
                              transient=transient)
        try:
            self._rich.start()
        except LiveError:  # another live display is running (a bar inside a bar): fall back to lines
            self._rich, self.interactive = None, False
            return
        self._task = self._rich.add_task(self.desc, total=self.total, completed=self.n, postfix="")

    def _tenth(self) -> int:
        return -1 if not self.total else min(10, 10 * self.n // self.total)

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        post = f" {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {self.n}{of} {self.unit}{post}\n")
        self.stream.flush()

    def _refresh(self) -> None:
        if not self.enabled or self._closed:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.n, description=self.desc, postfix=self.postfix)
            return
        tenth = self._tenth()
        if tenth > self._last_tenth:
            self._last_tenth, self._pending = tenth, True

    def _flush(self) -> None:
        if self._pending and self.enabled and not self._closed:
            self._pending = False
            self._line()

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self._flush()
        self.n += int(n)
        self._refresh()

    def set(self, completed: int) -> None:
        """Set the steps done (for progress read from elsewhere, e.g. a server's round counter)."""
        self._flush()
        self.n = int(completed)
        self._refresh()

    def set_postfix(self, values: Mapping[str, Any] | None = None, **kw: Any) -> None:
        """Show ``key=value`` pairs after the bar (the latest metrics)."""
        self.postfix = " ".join(f"{k}={v}" for k, v in {**(values or {}), **kw}.items())
        if self._rich is not None and not self._closed:
            self._rich.update(self._task, postfix=self.postfix)
        self._flush()  # the line of the step just done carries its own postfix

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._rich is not None and not self._closed:
            self._rich.update(self._task, description=desc)

    def close(self) -> None:
        """Stop the display; in line mode write the final count unless its line was the last one."""
        if self._closed:
            return
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and (self._pending or self.total is None or self._last_tenth < 10):
            self._line()
        self._closed = True

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, enabled: bool = True, transient: bool = False,
             stream: TextIO | None = None) -> ProgressBar:
    """A progress bar on ``stream`` (default stderr): rich on a terminal, a plain line per tenth of
    ``total`` otherwise, nothing when ``enabled`` is False. Iterate it when made over ``iterable``."""
    return ProgressBar(iterable, total=total, desc=desc, unit=unit, initial=initial, enabled=enabled,
                       transient=transient, stream=stream)
