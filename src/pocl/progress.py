"""Progress of long loops (training, the teacher cache, the ranking pass, generation): one factory,
:func:`make_progress`, for all of them.

* On a terminal (stderr is a TTY) it is a tqdm bar; log lines written while the bar is shown go
  above it (``tqdm.contrib.logging``), so the bar and the log do not garble each other.
* Anywhere else (stderr redirected to a file or a pipe: a batch job, CI, ``nohup``) it is the
  *plain log mode*: one log line every ``every`` steps or items with the position, the total, the
  rate, the elapsed time, the ETA and the caller's postfix (stage, loss, ...), and a final line.
  No carriage returns, so a redirected log stays small and readable.
* ``bar=False`` (``--no-progress``) turns the bar off, not the log: the plain lines are written
  on a terminal too. ``log=False`` as well: nothing at all (a loop that is part of a larger one).

Whether stderr counts as a terminal can be forced with the ``tty`` argument or the environment
variable ``POCL_PROGRESS`` (``bar``: as on a terminal, ``log``: plain lines, ``auto``: look at
stderr, the default). The default interval of item loops (``every=None``: a tenth of the total)
can be set with ``POCL_PROGRESS_EVERY`` (a number of items).

Usage::

    bar = make_progress(len(items), desc="generate dev", unit="sample")
    try:
        for batch in batches:
            ...
            bar.update(len(batch), loss=f"{loss:.4f}")
    finally:
        bar.close()
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Any

__all__ = ["Progress", "format_seconds", "make_progress", "stderr_is_tty"]

#: ``POCL_PROGRESS``: ``auto`` (default), ``bar`` (as on a terminal) or ``log`` (plain lines).
ENV_MODE = "POCL_PROGRESS"
#: ``POCL_PROGRESS_EVERY``: the interval (items) of plain lines of loops that do not give one.
ENV_EVERY = "POCL_PROGRESS_EVERY"
#: Plain lines per loop when neither the caller nor ``POCL_PROGRESS_EVERY`` gives an interval.
DEFAULT_LINES = 10

_log = logging.getLogger("pocl.progress")


def stderr_is_tty(tty: bool | None = None) -> bool:
    """Whether a progress bar may be drawn: ``tty`` when given, else ``POCL_PROGRESS`` (``bar``/``log``),
    else whether ``sys.stderr`` is a terminal."""
    if tty is not None:
        return bool(tty)
    mode = os.environ.get(ENV_MODE, "auto").strip().lower()
    if mode in ("bar", "tty"):
        return True
    if mode in ("log", "plain", "lines"):
        return False
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


def format_seconds(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _plural(unit: str) -> str:
    return unit if unit.endswith("s") else unit + "s"


def _default_every(total: int | None) -> int:
    env = os.environ.get(ENV_EVERY, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value > 0:
            return value
        _log.warning("%s=%r is not a positive whole number; ignored", ENV_EVERY, env)
    if not total:
        return 1
    return max(1, math.ceil(total / DEFAULT_LINES))


class Progress:
    """What :func:`make_progress` returns: a tqdm bar, plain log lines, or nothing (``mode``: ``bar``,
    ``log`` or ``off``). ``update(n, **postfix)`` advances, ``set_postfix(**postfix)`` sets what the
    lines/bar show after the numbers, ``set_total(n)`` changes the total (a curriculum stage that
    ended early), ``close()`` writes the final line. Also a context manager."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "it", mode: str = "log", every: int | None = None,
                 initial: int = 0, logger: logging.Logger | None = None, leave: bool = True):
        if mode not in ("bar", "log", "off"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.total = int(total) if total is not None else None
        self.desc = desc
        self.unit = unit
        self.every = int(every) if every is not None else _default_every(self.total)
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.n = int(initial)
        self.initial = int(initial)
        self.logger = logger or _log
        self.postfix: dict[str, Any] = {}
        self.lines = 0  # plain lines written (tests, and the final line's wording)
        self._start = time.perf_counter()
        self._closed = False
        self._bar = None
        self._redirect = contextlib.ExitStack()
        if mode == "bar":
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
            # Log lines written while the bar is shown are printed above it, not through it.
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=type(self._bar)))

    # ------------------------------------------------------------------ updates
    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n``; ``postfix`` (optional) replaces the shown postfix first."""
        if postfix:
            self.postfix = dict(postfix)
        previous = self.n
        self.n += int(n)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
        elif self.mode == "log" and self.n // self.every > previous // self.every and not self._at_end():
            self._line()  # (at the end the final line of close() says it)

    def set_postfix(self, **postfix: Any) -> None:
        self.postfix = dict(postfix)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def set_total(self, total: int) -> None:
        self.total = int(total)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def write(self, message: str) -> None:
        """One INFO line through the logger (above the bar when there is one), in every mode but off."""
        if self.mode != "off":
            self.logger.info("%s", message)

    # ------------------------------------------------------------------ plain lines
    def _rate(self) -> tuple[float, float]:
        elapsed = time.perf_counter() - self._start
        done = self.n - self.initial
        return elapsed, (done / elapsed if elapsed > 0 and done > 0 else 0.0)

    def _at_end(self) -> bool:
        return self.total is not None and self.n >= self.total

    def _rate_text(self, rate: float) -> str:
        if rate <= 0:
            return f"? {_plural(self.unit)}/s"
        if rate >= 100:
            return f"{rate:,.0f} {_plural(self.unit)}/s"
        if rate >= 1:
            return f"{rate:.3g} {_plural(self.unit)}/s"
        return f"{1 / rate:.3g} s/{self.unit}"

    def _position(self) -> str:
        if self.total:
            return f"{self.n}/{self.total} {_plural(self.unit)} ({100 * self.n / self.total:.0f}%)"
        return f"{self.n} {_plural(self.unit)}"

    def _postfix_text(self) -> str:
        return "".join(f", {k} {v}" for k, v in self.postfix.items())

    def line(self) -> str:
        """The plain line of the current position (what log mode writes every ``every`` steps)."""
        elapsed, rate = self._rate()
        eta = (self.total - self.n) / rate if self.total and rate > 0 else float("nan")
        return (f"{self.desc}: {self._position()}, {self._rate_text(rate)}, elapsed {format_seconds(elapsed)}, "
                f"ETA {format_seconds(max(eta, 0.0) if math.isfinite(eta) else eta)}{self._postfix_text()}")

    def _line(self) -> None:
        self.lines += 1
        self.logger.info("%s", self.line())

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Close the bar, or write the final plain line (done, or where the loop stopped)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            try:
                self._bar.close()
            finally:
                self._redirect.close()
            return
        if self.mode != "log":
            return
        elapsed, rate = self._rate()
        word = "done" if self.total is None or self._at_end() else "stopped at"
        self.lines += 1
        self.logger.info("%s: %s %s in %s (%s)%s", self.desc, word, self._position(), format_seconds(elapsed),
                         self._rate_text(rate), self._postfix_text())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def make_progress(total: int | None, *, desc: str, unit: str = "it", bar: bool = True, log: bool = True,
                  every: int | None = None, initial: int = 0, logger: logging.Logger | None = None,
                  leave: bool = True, tty: bool | None = None) -> Progress:
    """The progress of one loop of ``total`` steps/items (module docstring).

    ``bar``: a tqdm bar is allowed (False: ``--no-progress``); it is drawn when stderr is a terminal
    (:func:`stderr_is_tty`; ``tty`` forces the answer). Otherwise, with ``log``, plain log lines every
    ``every`` items (None: a tenth of the total, or ``POCL_PROGRESS_EVERY``) and a final line, through
    ``logger`` (default ``pocl.progress``). ``initial``: the position at start (a resumed run)."""
    if bar and stderr_is_tty(tty):
        mode = "bar"
    elif log:
        mode = "log"
    else:
        mode = "off"
    return Progress(total, desc=desc, unit=unit, mode=mode, every=every, initial=initial, logger=logger,
                    leave=leave)
