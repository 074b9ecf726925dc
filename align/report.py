"""Evaluation reports: a Markdown table and a self-contained HTML page whose plots are inline SVG.

Both are drawn from the metric rows of ``results.json`` (schema ``align.eval/2``) alone: a column per
metric, headed by its label (↑ where higher is better, ↓ where lower is). The HTML page adds, drawn with
matplotlib, each with axes, ticks and labels:

* a bar chart per metric across the models, each bar's value above it, with its 95 % confidence interval
  as a whisker when there is one;
* a histogram per metric that has per-item samples, counts on the y-axis, each model's mean dashed;
* each model's mean ``reward`` against its ``kl`` to the reference, when the rows have both.

Its table fits the page: with more than :data:`WIDE` metrics it has a row per metric and a column per
model, and the best value of each metric with a direction is in bold. No evaluator is known here by name,
so a third party's evaluator shows up like a built-in one. :func:`evaluation_html` is the page's body, for
pages that hold an evaluation among other things (the run report, :mod:`align.run_report`).

Nothing is fetched when the page opens (no scripts, fonts or stylesheets from elsewhere), so it works
offline and can be attached to an issue or an email.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["COLOURS", "REPORT_STYLE", "evaluation_html", "html_report", "markdown_report"]

#: The colour of each model, in the order of ``results["models"]``.
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


@dataclass(frozen=True)
class _Column:
    name: str
    label: str
    higher_is_better: bool | None

    @property
    def heading(self) -> str:
        return self.label + (" ↑" if self.higher_is_better is True else " ↓" if self.higher_is_better is False else "")


def _columns(results: Mapping[str, Any]) -> list[_Column]:
    """Every metric any model has, in the order the evaluators reported them."""
    order: list[str] = []
    found: dict[str, _Column] = {}
    for entry in results["models"].values():
        previous = None
        for name, row in entry.get("metrics", {}).items():
            if name not in found:  # a metric the earlier models lack goes after its neighbour in this model's rows
                found[name] = _Column(name, row.get("label") or name, row.get("higher_is_better"))
                order.insert(order.index(previous) + 1 if previous else len(order), name)
            previous = name
    return [found[name] for name in order]


def _cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    text = _number(row["value"])
    if row.get("ci95"):
        low, high = row["ci95"]
        text += f" [{_number(low)}, {_number(high)}]"
    return text


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _display_names(results: Mapping[str, Any]) -> dict[str, str]:
    """Model name → how the reports show it (the reference is marked)."""
    return {
        name: f"{name} (reference)" if entry.get("path") == results["reference"] else name
        for name, entry in results["models"].items()
    }


def _colours(results: Mapping[str, Any]) -> dict[str, str]:
    return {name: COLOURS[k % len(COLOURS)] for k, name in enumerate(results["models"])}


def _about(results: Mapping[str, Any]) -> str:
    settings = results["settings"]
    return (
        f"Reference: `{results['reference']}`; reward model: `{results['reward_model'] or 'none'}`; "
        f"{results['prompts']} prompts; sampling: temperature {settings.get('temperature')}, "
        f"seed {settings.get('seed')}, engine {settings.get('engine')}."
    )


LEGEND = "↑ higher is better, ↓ lower is better; [low, high]: 95 % confidence interval."


def markdown_report(results: Mapping[str, Any]) -> str:
    """``report.md``: the settings, a table of every metric of every model, and sample responses."""
    columns = _columns(results)
    shown = _display_names(results)
    lines = [
        "# Evaluation",
        "",
        _about(results),
        "",
        "| model | " + " | ".join(_md(c.heading) for c in columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for name, entry in results["models"].items():
        metrics = entry.get("metrics", {})
        lines.append(f"| {_md(shown[name])} | " + " | ".join(_cell(metrics.get(c.name)) for c in columns) + " |")
    lines += ["", LEGEND]
    for name, entry in results["models"].items():
        lines += ["", f"## {shown[name]}: sample responses", ""]
        for example in entry.get("examples", []):
            lines += [f"- **{_md(example['prompt'])}** → {_md(example['response'])}"]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


#: The CSS of the reports' pages (the run report, :mod:`align.run_report`, uses it too).
REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 62rem; padding: 0 1rem; color: #222;
       background: #fff; line-height: 1.4; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .85rem; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; vertical-align: top;
         overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
th:first-child { text-align: left; }
thead th { background: #f0f0f0; text-align: center; }
td.best { font-weight: 700; }
figure { margin: 1rem 0; max-width: 100%; }
figcaption { font-weight: 600; margin-bottom: .3rem; }
figure svg, figure img { display: block; max-width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(18rem, 1fr)); gap: 0 1.5rem; }
.grid figure { margin: .5rem 0; }
.note { color: #555; font-size: .85rem; }
ul.samples li { margin-bottom: .4rem; overflow-wrap: anywhere; }
"""

#: With more metrics than this, the table turns: a row per metric and a column per model, so that it fits
#: the page (twelve metric columns do not).
WIDE = 6


def html_report(results: Mapping[str, Any]) -> str:
    """``report.html``: the evaluation (:func:`evaluation_html`) as a page of its own."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>align evaluation</title>
<style>{REPORT_STYLE}</style></head><body>
<h1>align evaluation</h1>
{evaluation_html(results)}
</body></html>
"""


def evaluation_html(results: Mapping[str, Any], level: int = 2, ident: str = "eval") -> str:
    """The body of the evaluation report, for a page of its own or a section of another: the settings,
    the table, reward against KL, a distribution per metric with samples, a bar chart per metric, and the
    sample responses.

    :param level: the level of its headings (``<h2>`` by default).
    :param ident: a prefix for the ids in its plots, unique on the page (a page may hold several).
    """
    columns = _columns(results)
    models = results["models"]
    shown, colours = _display_names(results), _colours(results)
    h = f"h{level}"
    parts = [
        f"<p>{html.escape(_about(results)).replace('`', '')}</p>",
        _table(results, columns, shown),
        f'<p class="note">{html.escape(LEGEND)}</p>',
    ]
    trade_off = _reward_against_kl(results, shown, colours, f"{ident}-tradeoff")
    if trade_off:
        parts.append(f"<{h}>Reward against KL</{h}>{trade_off}")
    distributions = []
    for column in columns:
        series = {
            name: entry["samples"][column.name]
            for name, entry in models.items()
            if entry.get("samples", {}).get(column.name)
        }
        if series:
            svg = _histograms(series, shown, colours, column.label, f"{ident}-dist-{column.name}")
            distributions.append(_figure(f"{column.heading}: distribution per model", svg, "distribution", column.name))
    if distributions:
        parts.append(f"<{h}>Distributions</{h}>" + "".join(distributions))
    bars = []
    for column in columns:
        rows = {
            name: entry["metrics"][column.name] for name, entry in models.items() if column.name in entry["metrics"]
        }
        svg = _bars(rows, shown, colours, column.label, f"{ident}-bars-{column.name}")
        bars.append(_figure(column.heading, svg, "bars", column.name))
    if bars:
        parts.append(f'<{h}>Each metric across models</{h}><div class="grid">{"".join(bars)}</div>')
    parts.append(f"<{h}>Sample responses</{h}>")
    sub = f"h{min(level + 1, 6)}"
    for name, entry in models.items():
        items = "".join(
            f"<li><b>{html.escape(e['prompt'])}</b><br>{html.escape(e['response'])}</li>"
            for e in entry.get("examples", [])
        )
        parts.append(f'<{sub}>{html.escape(shown[name])}</{sub}><ul class="samples">{items}</ul>')
    return "\n".join(parts)


def _table(results: Mapping[str, Any], columns: Sequence[_Column], shown: Mapping[str, str]) -> str:
    """Every metric of every model; the best value of a metric with a direction in bold. A column per
    metric, or, with more than :data:`WIDE` metrics, a row per metric."""
    models = results["models"]
    best = {column.name: _best(column, models) for column in columns}

    def cell(name: str, column: _Column) -> str:
        row = models[name].get("metrics", {}).get(column.name)
        mark = ' class="best"' if name in best[column.name] else ""
        return f"<td{mark}>{html.escape(_cell(row))}</td>"

    if len(columns) > max(WIDE, len(models)):
        head = "".join(f"<th>{html.escape(shown[name])}</th>" for name in models)
        body = "".join(
            f"<tr><th>{html.escape(column.heading)}</th>{''.join(cell(name, column) for name in models)}</tr>"
            for column in columns
        )
        return f'<table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table>'
    head = "".join(f"<th>{html.escape(column.heading)}</th>" for column in columns)
    body = "".join(
        f"<tr><th>{html.escape(shown[name])}</th>{''.join(cell(name, column) for column in columns)}</tr>"
        for name in models
    )
    return f'<table class="metrics"><thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def _best(column: _Column, models: Mapping[str, Any]) -> set[str]:
    """The models with the best value of a metric that has a direction (none when only one model has it)."""
    values = {
        name: entry["metrics"][column.name]["value"]
        for name, entry in models.items()
        if entry.get("metrics", {}).get(column.name, {}).get("value") is not None
    }
    if column.higher_is_better is None or len(values) < 2 or len(set(values.values())) < 2:
        return set()
    top = max(values.values()) if column.higher_is_better else min(values.values())
    return {name for name, value in values.items() if value == top}


def _figure(caption: str, svg: str, kind: str, metric: str = "") -> str:
    about = f' data-metric="{html.escape(metric)}"' if metric else ""
    return f'<figure class="plot {kind}"{about}><figcaption>{html.escape(caption)}</figcaption>{svg}</figure>'


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # lazily: importing matplotlib takes most of a second

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _svg(figure: Figure, ident: str) -> str:
    """A figure as inline SVG: text kept as text (smaller, searchable), ids salted by ``ident`` so that
    several plots on one page never share one, no date or metadata (the same results give the same page)."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    FigureCanvasSVG(figure)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": ident}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    # The XML prologue and the RDF metadata (creator, format) say nothing to a reader of the page.
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg") :], count=1, flags=re.DOTALL)


def _histograms(
    series: Mapping[str, Sequence[float]],
    shown: Mapping[str, str],
    colours: Mapping[str, str],
    label: str,
    ident: str,
) -> str:
    """Overlaid histograms over shared bins, one colour per model, a dashed line at each model's mean."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    values = np.concatenate([np.asarray(s, dtype=float) for s in series.values()])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return ""
    edges = [float(e) for e in np.histogram_bin_edges(values, bins=20 if np.ptp(values) > 0 else 1)]
    figure = _new_figure(8.6, 2.6)
    ax = figure.subplots()
    for name, samples in series.items():
        data = np.asarray(samples, dtype=float)
        data = data[np.isfinite(data)]
        ax.hist(data, bins=edges, color=colours[name], alpha=0.3, label=f"{shown[name]} (n={data.size})")
        ax.hist(data, bins=edges, color=colours[name], histtype="step", linewidth=1.5)
        if data.size:
            ax.axvline(float(data.mean()), color=colours[name], linestyle="--", linewidth=1)
    ax.set_xlabel(label)
    ax.set_ylabel("count")
    ax.yaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True))  # counts: no tick at 2.5 samples
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="dashed: mean", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _svg(figure, ident)


def _bars(
    rows: Mapping[str, Mapping[str, Any]],
    shown: Mapping[str, str],
    colours: Mapping[str, str],
    label: str,
    ident: str,
) -> str:
    """One bar per model, its value above it, and its 95 % interval as a whisker when it has one."""
    names = list(rows)
    values = [float(rows[name]["value"]) for name in names]
    whiskers = [[0.0] * len(names), [0.0] * len(names)]
    for k, name in enumerate(names):
        if rows[name].get("ci95"):
            low, high = rows[name]["ci95"]
            whiskers[0][k], whiskers[1][k] = max(values[k] - low, 0.0), max(high - values[k], 0.0)
    figure = _new_figure(3.3, 2.5)
    ax = figure.subplots()
    ticks = range(len(names))
    ax.bar(ticks, values, color=[colours[name] for name in names], width=0.6)
    if any(any(w) for w in whiskers):
        ax.errorbar(ticks, values, yerr=whiskers, fmt="none", ecolor="#222", capsize=4, linewidth=1)
    for k, value in enumerate(values):  # above the bar and its whisker (below, for a negative value)
        end = value + whiskers[1][k] if value >= 0 else value - whiskers[0][k]
        ax.annotate(
            _number(value),
            (k, end),
            xytext=(0, 3 if value >= 0 else -3),
            textcoords="offset points",
            ha="center",
            va="bottom" if value >= 0 else "top",
            fontsize=8,
        )
    ax.axhline(0, color="#444", linewidth=0.8)
    ax.set_xticks(list(ticks), [shown[name] for name in names], fontsize=8)
    if sum(len(shown[name]) for name in names) > 30:
        ax.tick_params(axis="x", labelrotation=20)
    if len(label) <= 16:  # the caption names the metric; a longer label would not fit beside the axis
        ax.set_ylabel(label)
    ends = [0.0, *(v + w for v, w in zip(values, whiskers[1], strict=True))]
    ends += [v - w for v, w in zip(values, whiskers[0], strict=True)]
    if max(ends) - min(ends) < 1e-12:  # every bar at zero: a unit axis, not matplotlib's ±1e-12
        ax.set_ylim(0, 1)
    else:
        ax.margins(y=0.18)
    ax.grid(True, axis="y", alpha=0.3)
    return _svg(figure, ident)


def _reward_against_kl(
    results: Mapping[str, Any], shown: Mapping[str, str], colours: Mapping[str, str], ident: str
) -> str:
    """Each model's mean ``reward`` against its ``kl`` to the reference, with 95 % intervals: what each
    policy bought and what it paid in drift. Drawn when some model has both metrics (whatever evaluators
    gave them: these two names are the convention, as ``results.json``'s rows carry no roles)."""
    points = {
        name: (entry["metrics"]["kl"], entry["metrics"]["reward"])
        for name, entry in results["models"].items()
        if "kl" in entry.get("metrics", {}) and "reward" in entry.get("metrics", {})
    }
    if not points:
        return ""
    figure = _new_figure(6.4, 3.4)
    ax = figure.subplots()
    for name, (kl, reward) in points.items():
        x, y = float(kl["value"]), float(reward["value"])
        xerr = [[max(x - kl["ci95"][0], 0.0)], [max(kl["ci95"][1] - x, 0.0)]] if kl.get("ci95") else None
        yerr = [[max(y - reward["ci95"][0], 0.0)], [max(reward["ci95"][1] - y, 0.0)]] if reward.get("ci95") else None
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=colours[name], markersize=7, capsize=3)
        ax.annotate(shown[name], (x, y), xytext=(7, 7), textcoords="offset points", fontsize=9, color=colours[name])
    ax.margins(0.25)  # room around the points (and their names) so that none sits in a corner
    first = next(iter(points.values()))
    ax.set_xlabel(f"{first[0].get('label') or 'kl'} to the reference (lower: closer)")
    ax.set_ylabel(first[1].get("label") or "reward")
    ax.grid(True, alpha=0.3)
    return _figure(
        "reward against KL to the reference, per model (whiskers: 95 % interval)", _svg(figure, ident), "tradeoff"
    )
