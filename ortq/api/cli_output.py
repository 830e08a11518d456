"""What the ``ortq`` command prints on stderr besides the error line: warnings a person can read.

On a real model one kind of event often repeats per tensor (26 biases whose scale had to widen, a dozen
tensors vetoed for the same reason). Printed as they happen they bury the summary and break the progress
bar's line. So the command collects ortq's warnings while it runs and prints, once it succeeded, one line
per kind of warning (records with the same message template): the worst case (the record with the largest
number among its arguments) and how many there were; ``-v`` prints every record as it comes instead. A
command that fails prints only its one error line (``-v`` shows the warnings that came before it).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

__all__ = ["WarningSummary", "StagedProgress"]


def _magnitude(record: logging.LogRecord) -> float:
    """The last number among the record's arguments (what a template reports as its size), else -inf."""
    args = record.args if isinstance(record.args, tuple) else ()
    numbers = [float(a) for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return numbers[-1] if numbers else float("-inf")


class WarningSummary(logging.Handler):
    """Collects WARNING and above from the ``ortq`` loggers; :meth:`lines` groups them by message template."""

    def __init__(self, echo: Callable[[str], None], *, verbose: bool = False) -> None:
        super().__init__(logging.DEBUG if verbose else logging.WARNING)
        self._echo = echo
        self._verbose = verbose
        self._groups: dict[tuple[int, str], list[logging.LogRecord]] = {}
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        self._logger: logging.Logger | None = None
        self._saved: tuple[bool, int] = (True, logging.NOTSET)

    def emit(self, record: logging.LogRecord) -> None:
        if self._verbose:  # -v: everything, as it happens
            self._echo(self.format(record))
            return
        self._groups.setdefault((record.levelno, str(record.msg)), []).append(record)

    def lines(self) -> list[str]:
        """One line per kind of warning, in the order each kind first occurred."""
        out = []
        for records in self._groups.values():
            if len(records) == 1:
                out.append(self.format(records[0]))
                continue
            sized = any(_magnitude(r) > float("-inf") for r in records)
            worst = max(records, key=_magnitude) if sized else records[0]
            which = "the worst" if sized else "the first"
            out.append(f"{self.format(worst)} [{which} of {len(records)} alike; -v lists them all]")
        return out

    def attach(self, logger: logging.Logger) -> "WarningSummary":
        """Take over ``logger``'s output (it stops propagating to the root handler) until :meth:`detach`."""
        self._logger, self._saved = logger, (logger.propagate, logger.level)
        logger.addHandler(self)
        logger.propagate = False
        logger.setLevel(self.level)
        return self

    def detach(self, *, flush: bool) -> None:
        """Stop collecting; with ``flush`` print the summary lines."""
        if self._logger is not None:
            self._logger.removeHandler(self)
            self._logger.propagate, level = self._saved
            self._logger.setLevel(level)
            self._logger = None
        if flush:
            for line in self.lines():
                self._echo(line)
        self._groups.clear()


class StagedProgress:
    """One progress bar per stage ("calibrating", then "verifying"), each finished before the next starts,
    on stderr and only on a terminal (in a pipe or a CI log a bar would be stray lines)."""

    def __init__(self, *, hidden: bool) -> None:
        self._hidden = hidden
        self._bar: Any = None
        self._label: str | None = None

    def stage(self, label: str, total: int) -> Callable[[int], None]:
        """The callback for one stage: it starts that stage's bar at its first call."""

        def update(samples: int) -> None:
            if self._label != label:
                self._start(label, total)
            self._bar.update(samples)

        return update

    def _start(self, label: str, total: int) -> None:
        import sys

        import click

        self.close()
        self._label = label
        self._bar = click.progressbar(length=total or 0, label=label, file=sys.stderr, show_pos=True,
                                      hidden=self._hidden)
        self._bar.__enter__()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def __enter__(self) -> "StagedProgress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
