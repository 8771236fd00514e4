"""Progress within a round: how many of the sampled clients have reported, and the time so far.

A round's line (``round 3/10: accuracy ...``) comes when the round ends; on a GPU with a real model
that can be minutes. Meanwhile the console shows the round's progress, as users of tqdm expect:

* on a terminal, a tqdm bar (``[fedlora] round 3/10: 4/10 clients [01:12]``) that is erased
  when the round ends, so that the round's own line follows without clutter;
* on anything else (a log file, CI, a SuperLink's log), a plain line every ``every`` seconds, and
  only for a round that lasts that long: ``[fedlora] round 3/10: 4/10 clients reported, 60 s so
  far``. Short rounds print nothing more than today.

The transport calls :meth:`RoundProgress.begin` before it waits, :meth:`RoundProgress.update` each
time it polls (with the count of clients heard from, failures included) and
:meth:`RoundProgress.end` when the wait ends, however it ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_EVERY = 30.0  # seconds between plain progress lines when the output is not a terminal


class RoundProgress:
    """The console's view of one wait for replies at a time (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, every: float = PLAIN_EVERY, bar: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.every = every
        self.bar = _is_terminal(self.stream) if bar is None else bar
        self.clock = clock
        self._label = ""
        self._what = "clients reported"
        self._total = 0
        self._done = 0
        self._start = 0.0
        self._next_line = 0.0
        self._tqdm: Any = None

    def begin(self, label: str, total: int, what: str = "clients reported") -> None:
        """A wait for ``total`` replies starts (``label``: for example ``round 3``; ``what`` they are)."""
        self.end()
        self._label, self._total, self._done, self._what = label, total, 0, what
        self._start = self.clock()
        self._next_line = self._start + self.every
        if self.bar:
            from tqdm import tqdm  # noqa: PLC0415

            self._tqdm = tqdm(total=total, desc=f"[fedlora] {label}", unit="client", leave=False,
                              file=self.stream, dynamic_ncols=True,
                              bar_format="{desc}: {n_fmt}/{total_fmt} " + what.split()[0] + " |{bar}| [{elapsed}]")

    def update(self, done: int) -> None:
        """``done`` of the replies have arrived so far (called on every poll, replies or not)."""
        if self._tqdm is not None:
            if done > self._done:
                self._tqdm.update(done - self._done)
            else:
                self._tqdm.refresh()  # the elapsed time moves on
        self._done = max(self._done, done)
        now = self.clock()
        if not self.bar and self.every > 0 and now >= self._next_line and self._done < self._total:
            self._print(f"[fedlora] {self._label}: {self._done}/{self._total} {self._what}, "
                        f"{now - self._start:.0f} s so far")
            self._next_line = now + self.every

    def end(self) -> None:
        """The wait is over (all replied, timed out or stopped); a bar is erased."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def _print(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):
            pass  # a closed stream must not end a round


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
