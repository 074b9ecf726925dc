"""Progress bars: one per stage, for training steps, rollouts and generation alike.

A stage shows its progress through its context::

    with context.progress(config.steps) as bar:
        for step in range(start, config.steps):
            ...
            bar.update(step + 1, numbers={"reward": stats["reward"], "kl": stats["kl"]})

On a terminal the bar is one line redrawn in place: the stage's name, steps done of the total, the time
spent and the time left, and the numbers given. In a log (CI, a file, a notebook) it is a plain line,
without control characters, at each quarter and at least once a minute. Only the process that speaks to
the user draws one (see :func:`align.console.active`); anywhere else, and outside a run, a bar does
nothing, so a stage need not ask.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

from align.console import Console, active

__all__ = ["Progress", "format_duration", "format_numbers", "headline"]

#: In a log, a plain line at least every PLAIN_EVERY seconds, and one at each quarter done; but none in
#: the first PLAIN_AFTER seconds (a stage's headline follows soon enough) nor within PLAIN_AFTER of another.
PLAIN_EVERY, PLAIN_AFTER = 60.0, 10.0
_REDRAW_EVERY = 0.1  # seconds between redraws of a terminal's bar
_BAR_WIDTH = 20


class Progress:
    """A progress bar over ``total`` units of work (steps, prompts, responses)."""

    def __init__(self, label: str, total: int, unit: str = "steps", done: int = 0) -> None:
        """:param done: units already done before this bar started (a resumed stage)."""
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.done = self._first = done
        self.numbers: dict[str, float] = {}
        self._console: Console | None = active()
        self._started = self._drawn = self._printed = time.perf_counter()
        self._quarter = self._quarter_of(done)
        self._draw(force=True)

    def update(self, done: int | None = None, *, advance: int = 0, numbers: Mapping[str, float] | None = None) -> None:
        """Set the units done (``done``), or add ``advance`` to them, and the numbers to show (each one
        shown until it is given again)."""
        self.done = min(self.total, done if done is not None else self.done + advance)
        self.numbers.update({name: float(value) for name, value in (numbers or {}).items()})
        self._draw()

    def close(self) -> None:
        """Take the bar off the terminal (the stage's headline says how it ended)."""
        if self._console is not None:
            self._console.end_live()
            self._console = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------
    def _draw(self, force: bool = False) -> None:
        console = self._console
        if console is None:
            return
        now = time.perf_counter()
        if console.is_terminal:
            if force or self.done >= self.total or now - self._drawn >= _REDRAW_EVERY:
                self._drawn = now
                console.live(self._bar(now))
            return
        quarter = self._quarter_of(self.done)
        since = now - self._printed  # the start counts as the last line
        due = (quarter > self._quarter and since >= PLAIN_AFTER) or since >= PLAIN_EVERY
        if due and self.done < self.total:
            self._quarter, self._printed = quarter, now
            console.line(self._plain(now))

    def _quarter_of(self, done: int) -> int:
        return 4 * done // self.total if self.total else 0

    def _left(self, now: float) -> float | None:
        rate = (self.done - self._first) / max(now - self._started, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def _bar(self, now: float) -> str:
        filled = _BAR_WIDTH * self.done / self.total if self.total else 0
        bar = "█" * int(filled) + "·" * (_BAR_WIDTH - int(filled))
        left = self._left(now)
        times = f"{format_duration(now - self._started)}<{format_duration(left) if left is not None else '?'}"
        numbers = f"  {format_numbers(self.numbers)}" if self.numbers else ""
        return f"{self.label} {bar} {self.done}/{self.total} {self.unit}  {times}{numbers}"

    def _plain(self, now: float) -> str:
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        left = self._left(now)
        about = f", about {format_duration(left)} left" if left is not None else ""
        numbers = f": {format_numbers(self.numbers)}" if self.numbers else ""
        spent = format_duration(now - self._started)
        return f"  {self.label}: {self.done}/{self.total} {self.unit}{share}, {spent}{about}{numbers}"


def format_duration(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``."""
    if not math.isfinite(seconds):
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_numbers(numbers: Mapping[str, float]) -> str:
    """``loss 1.342, kl 0.0312``: each number to four significant digits."""
    return ", ".join(f"{name} {value:.4g}" for name, value in numbers.items())


def headline(metrics: Mapping[str, float], keys: Sequence[str] = (), limit: int = 4) -> str:
    """The few metrics a stage's closing line shows: ``loss 4.846 → 0.7692, held-out accuracy 1``.

    Each of ``keys`` (a stage's ``key_metrics``) is shown in the first form ``metrics`` has: a change
    (``first_<key>`` → ``last_<key>``, ``<key>_first`` → ``<key>_last``, ``<key>_before`` → ``<key>``),
    then ``eval_<key>`` (held out), ``<key>``, ``train_<key>``, and last every ``<name>_<key>`` (one per
    policy an evaluation compares). Without keys, or when none is found: ``task_score`` and the first
    metrics, up to ``limit``.
    """
    parts = [part for key in keys for part in _shown(metrics, key)]
    if not parts:
        first = [name for name in ("task_score",) if name in metrics]
        names = first + [name for name in metrics if name not in first]
        parts = [f"{name} {metrics[name]:.4g}" for name in names[:limit]]
    return ", ".join(parts)


def _shown(metrics: Mapping[str, float], key: str) -> list[str]:
    for before, after in ((f"first_{key}", f"last_{key}"), (f"{key}_first", f"{key}_last"), (f"{key}_before", key)):
        if before in metrics and after in metrics:
            return [f"{key} {metrics[before]:.4g} → {metrics[after]:.4g}"]
    for name, label in ((f"eval_{key}", f"held-out {key}"), (key, key), (f"train_{key}", key)):
        if name in metrics:
            return [f"{label} {metrics[name]:.4g}"]
    return [f"{name} {value:.4g}" for name, value in metrics.items() if name.endswith(f"_{key}")]
