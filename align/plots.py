"""Training curves: each stage's logged metrics drawn into ``RUN/plots/<stage>.png`` as it trains.

A stage logs rows of metrics (``logs/<stage>.metrics.jsonl``, one JSON object a line: ``time``, ``step``
and metric name → number). :func:`panels` chooses from the names alone which panels apply, so a third
party's stage that logs ``loss`` gets a loss panel like a built-in one:

=============== ============================================================================================
panel           the metrics it draws
=============== ============================================================================================
loss            ``loss``, and held-out losses (``eval_loss``, ``eval_<dataset>_loss``)
<x> loss        each other loss, on its own axis (``policy_loss`` → "policy loss", ``value_loss``)
reward          names with a ``reward``/``rewards``/``score`` part, and margins (``rewards/chosen``,
                ``rm_score``, ``mean_reward``, ``margin``), held-out ones too
KL              ``kl`` (``eval_kl``, ``objective/kl``); not PPO's ``approx_kl``, a step-size diagnostic
accuracy        names with an ``accuracy``/``accuracies`` part (``rewards/accuracies``, ``mean_token_accuracy``)
learning rate   ``learning_rate``, ``lr``
=============== ============================================================================================

Each panel has a title, "step" on its x-axis, ticks and a grid; a panel of several metrics has a legend.
Only rows with a step are drawn (the closing row of a stage has none), and only the current attempt's:
a stage rerun with ``--force`` appends to the same file, starting again at a low step, and a resumed one
repeats the steps after its checkpoint; a row whose step goes back replaces the rows from that step on,
and the first row after a closing row starts afresh. A stage with fewer than two such rows gets no plot.

This module is also a core plugin: while a stage trains it redraws the stage's plot at most once every
:data:`REDRAW_SECONDS` (``align_metrics_logged``), and once more when the stage ends
(``align_stage_finished``), on the main process only. A plot that cannot be drawn is a warning, never a
failed stage. matplotlib is imported on the first plot, never when align starts, and draws with its Agg
renderer (no display needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align import hookimpl
from align.backend import is_main_process

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from align.stage import StageContext, StageOutcome

__all__ = [
    "REDRAW_SECONDS",
    "Panel",
    "curves_figure",
    "panels",
    "plot_is_stale",
    "plot_path",
    "plot_stage",
    "read_rows",
    "save_png",
    "step_rows",
]

logger = logging.getLogger("align")

#: The least time between two redraws of one stage's plot while it trains: a plot takes a few tenths of a
#: second, so redrawing at most every 15 s costs the training loop about 2 %.
REDRAW_SECONDS = 15.0

#: Keys of a metrics row that are not metrics, and trainers' end-of-training summaries (``train_loss`` is
#: the mean over the whole run, ``train_runtime`` a time): a point each, at the last step, not a curve.
_NOT_CURVES = re.compile(r"^(time|step|epoch|total_flos|train_.*)$")


@dataclass
class Panel:
    """One panel of a stage's plot: its title, the quantity on its y-axis, and the metrics it draws."""

    title: str
    ylabel: str
    metrics: list[str] = field(default_factory=list)


def _parts(name: str) -> list[str]:
    return [part for part in re.split(r"[/_.\-]", name.lower()) if part]


def _panel_of(name: str) -> tuple[str, str] | None:
    """(title, y-label) of the panel a metric belongs on, or None when it is not drawn."""
    parts = _parts(name)
    if not parts or _NOT_CURVES.match(name):
        return None
    if {"accuracy", "accuracies"} & set(parts):
        return "accuracy", "accuracy"
    if parts[-1] == "loss":
        if parts == ["loss"] or parts[0] == "eval":
            return "loss", "loss"
        prefix = " ".join(parts[:-1])
        return f"{prefix} loss", "loss"
    if parts[-1] == "kl" and "approx" not in parts:
        return "KL", "KL"
    if {"reward", "rewards", "score"} & set(parts) or parts[-1] in ("margin", "margins"):
        return "reward", "reward"
    if name in ("learning_rate", "lr") or parts[-1] == "lr" or parts[-2:] == ["learning", "rate"]:
        return "learning rate", "learning rate"
    return None


def panels(names: Iterable[str]) -> list[Panel]:
    """The panels that apply to metrics of these names, in a fixed order (loss, the other losses, reward,
    KL, accuracy, learning rate); each panel's metrics in the order given."""
    found: dict[str, Panel] = {}
    for name in names:
        place = _panel_of(name)
        if place is None:
            continue
        title, ylabel = place
        panel = found.setdefault(title, Panel(title, ylabel))
        if name not in panel.metrics:
            panel.metrics.append(name)
    order = ["loss", "reward", "KL", "accuracy", "learning rate"]

    def rank(panel: Panel) -> tuple[int, str]:
        if panel.title in order:
            return (order.index(panel.title) * 2, "")
        return (1, panel.title)  # the other losses, after the loss

    return sorted(found.values(), key=rank)


def read_rows(metrics_file: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a line that is not a JSON object (one being written) is skipped."""
    rows = []
    try:
        text = metrics_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def step_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows with a step, of the latest attempt (see the module's docstring)."""
    kept: list[Mapping[str, Any]] = []
    closed = False
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            closed = bool(kept)  # a closing row: whatever comes after it is another attempt
            continue
        if closed:
            kept, closed = [], False
        if kept and step < kept[-1]["step"]:
            kept = [r for r in kept if r["step"] < step]
        kept.append(row)
    return kept


def _series(rows: Sequence[Mapping[str, Any]], name: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(float(row["step"]))
            values.append(float(value))
    return steps, values


def _trained_twin(metric: str, drawn: Mapping[str, str]) -> str | None:
    """The training metric already drawn that a held-out one measures (``eval_demo_loss`` → ``loss``)."""
    if not metric.startswith("eval_"):
        return None
    rest = metric[len("eval_") :]
    while rest:
        if rest in drawn:
            return rest
        _, _, rest = rest.partition("_")
    return None


def curves_figure(rows: Sequence[Mapping[str, Any]], title: str) -> Figure | None:
    """A figure of the curves of metric rows (as :func:`read_rows` gives them), or None when there is
    nothing to draw: fewer than two rows with a step, or no metric that belongs on a panel. The figure's
    axes are its panels, titled as :func:`panels` says."""
    rows = step_rows(rows)
    if len({row["step"] for row in rows}) < 2:
        return None
    names = [name for row in rows for name in row]
    chosen = [panel for panel in panels(dict.fromkeys(names)) if any(_series(rows, m)[0] for m in panel.metrics)]
    if not chosen:
        return None
    from matplotlib.figure import Figure  # lazily: importing matplotlib takes most of a second

    columns = min(3, len(chosen))
    lines = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.1 * lines + 0.4), dpi=100, layout="constrained")
    figure.suptitle(title, fontsize=13, fontweight="bold")
    axes = figure.subplots(lines, columns, squeeze=False)
    palette = [f"C{k}" for k in range(10)]
    for ax, panel in zip(axes.flat, chosen, strict=False):  # the grid may have a spare panel or two
        colours: dict[str, str] = {}
        for metric in panel.metrics:
            steps, values = _series(rows, metric)
            if not steps:
                continue
            twin = _trained_twin(metric, colours)
            if twin is None:
                colours[metric] = palette[len(colours) % len(palette)]
                marker = "o" if len(steps) < 30 else None
                ax.plot(steps, values, color=colours[metric], marker=marker, markersize=3, label=metric)
            else:  # a held-out metric: its training curve's colour, diamonds, dashed
                ax.plot(steps, values, color=colours[twin], marker="D", markersize=4, linestyle="--", label=metric)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7, loc="best", ncols=2 if len(ax.get_lines()) > 4 else 1)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    return figure


def save_png(figure: Figure, path: Path) -> Path:
    """Write a figure as a PNG, atomically: a reader never sees half a file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # Agg, whatever backend the user's matplotlibrc names
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    figure.savefig(partial, format="png")
    os.replace(partial, path)
    return path


def plot_path(run_dir: Path, stage: str) -> Path:
    """Where a stage's curves are drawn: ``RUN/plots/<stage>.png``."""
    return Path(run_dir) / "plots" / f"{stage}.png"


def plot_is_stale(run_dir: Path, stage: str) -> bool:
    """Whether the stage logged metrics that its plot does not show yet (the plot is missing or older)."""
    plot, log = plot_path(run_dir, stage), _metrics_log(run_dir, stage)
    return log.exists() and (not plot.exists() or plot.stat().st_mtime < log.stat().st_mtime)


def _metrics_log(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "logs" / f"{stage}.metrics.jsonl"


def plot_stage(run_dir: Path, stage: str) -> Path | None:
    """Draw ``RUN/plots/<stage>.png`` from ``RUN/logs/<stage>.metrics.jsonl``; returns its path, or None
    when the stage logged nothing to draw (then an older plot of it is removed: it was of another attempt)."""
    run_dir = Path(run_dir)
    figure = curves_figure(read_rows(_metrics_log(run_dir, stage)), stage)
    path = plot_path(run_dir, stage)
    if figure is None:
        path.unlink(missing_ok=True)
        return None
    return save_png(figure, path)


# The core plugin: the plots of the stages that train in this process.

_last_drawn: dict[Path, float] = {}


def _redraw(context: StageContext, why: str) -> None:
    try:
        plot_stage(context.run_dir, context.name)
    except Exception as error:  # a plot is a convenience: never fail the stage for it
        logger.warning(
            "could not plot the curves of stage %s (%s): %s: %s", context.name, why, type(error).__name__, error
        )
    _last_drawn[context.metrics_file] = time.monotonic()


@hookimpl
def align_metrics_logged(context: StageContext, step: int | None, metrics: Mapping[str, float]) -> None:
    """Redraw the stage's plot, at most every :data:`REDRAW_SECONDS`."""
    if step is None or not is_main_process():
        return  # the closing row: align_stage_finished draws the last plot
    last = _last_drawn.get(context.metrics_file)
    if last is None:
        # The first row: nothing to draw yet (a curve needs two), so start the clock without matplotlib.
        _last_drawn[context.metrics_file] = time.monotonic()
    elif time.monotonic() - last >= REDRAW_SECONDS:
        _redraw(context, "while training")


@hookimpl
def align_stage_finished(context: StageContext, outcome: StageOutcome) -> None:
    """Draw the stage's final plot; a cached stage's only when its plot is missing or older than its log."""
    _last_drawn.pop(context.metrics_file, None)
    if not is_main_process() or outcome.status == "pending":
        return
    if outcome.status == "cached" and not plot_is_stale(context.run_dir, context.name):
        return
    _redraw(context, "at its end")
