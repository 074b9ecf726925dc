"""Evaluation reports: a Markdown table and a self-contained HTML page whose plots are inline SVG.

Both are drawn from the metric rows of ``results.json`` (schema ``align.eval/2``) alone: a column per
metric, headed by its label (↑ where higher is better, ↓ where lower is), a bar chart per metric across the
models (with its 95 % confidence interval when there is one), and a distribution per metric that has
per-item samples. No evaluator or metric is known here by name, so a third party's evaluator shows up like
a built-in one.

Nothing is fetched when the page opens (no scripts, fonts or stylesheets from elsewhere), so it works
offline and can be attached to an issue or an email.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COLOURS", "html_report", "markdown_report"]

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


def html_report(results: Mapping[str, Any]) -> str:
    """``report.html``: the table, a distribution per metric with samples, a bar chart per metric."""
    columns = _columns(results)
    models = results["models"]
    shown, colours = _display_names(results), _colours(results)
    table = "".join(
        f"<tr><th>{html.escape(shown[name])}</th>"
        + "".join(f"<td>{html.escape(_cell(entry.get('metrics', {}).get(c.name)))}</td>" for c in columns)
        + "</tr>"
        for name, entry in models.items()
    )
    distributions = []
    for column in columns:
        series = {
            shown[name]: entry["samples"][column.name]
            for name, entry in models.items()
            if entry.get("samples", {}).get(column.name)
        }
        if series:
            tints = {shown[name]: colours[name] for name in models}
            svg = _histograms(series, tints, column.label)
            distributions.append(_figure(f"{column.heading}: distribution per model", svg))
    bars = []
    for column in columns:
        rows = {
            name: entry["metrics"][column.name] for name, entry in models.items() if column.name in entry["metrics"]
        }
        bars.append(_figure(column.heading, _bars(rows, colours)))
    samples = "".join(
        f"<h3>{html.escape(shown[name])}</h3><ul>"
        + "".join(
            f"<li><b>{html.escape(e['prompt'])}</b><br>{html.escape(e['response'])}</li>"
            for e in entry.get("examples", [])
        )
        + "</ul>"
        for name, entry in models.items()
    )
    about = html.escape(_about(results)).replace("`", "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>align evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 62rem; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: .85rem; display: block; overflow-x: auto; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }}
th:first-child {{ text-align: left; }}
thead th {{ background: #f0f0f0; }}
figure {{ margin: 1.5rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .5rem; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 0 1.5rem; }} .grid figure {{ margin: .75rem 0; }}
.note {{ color: #555; font-size: .85rem; }}
</style></head><body>
<h1>align evaluation</h1>
<p>{about}</p>
<table><thead><tr><th>model</th>{"".join(f"<th>{html.escape(c.heading)}</th>" for c in columns)}</tr></thead>
<tbody>{table}</tbody></table>
<p class="note">{html.escape(LEGEND)}</p>
{"<h2>Distributions</h2>" if distributions else ""}{"".join(distributions)}
{"<h2>Each metric across models</h2>" if bars else ""}<div class="grid">{"".join(bars)}</div>
<h2>Sample responses</h2>{samples}
</body></html>
"""


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{html.escape(caption)}</figcaption>{svg}</figure>"


def _histograms(
    series: Mapping[str, Sequence[float]],
    colours: Mapping[str, str],
    label: str,
    width: int = 640,
    height: int = 220,
) -> str:
    """Overlaid histograms (20 bins over the common range), one colour per model."""
    values = [v for s in series.values() for v in s]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    bins = 20
    counts = {}
    for name, s in series.items():
        counts[name] = [0] * bins
        for v in s:
            counts[name][min(bins - 1, int((v - low) / span * bins))] += 1
    top = max(max(c) for c in counts.values()) or 1
    bar = (width - 60) / bins / len(series)
    shapes = []
    for k, (name, c) in enumerate(counts.items()):
        for i, n in enumerate(c):
            x = 50 + i * (width - 60) / bins + k * bar
            h = (height - 50) * n / top
            shapes.append(
                f'<rect x="{x:.1f}" y="{height - 30 - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colours[name]}" opacity="0.8"/>'
            )
    legend = {name: colours[name] for name in series}
    return _svg(width, height, shapes, legend, _number(low), _number(high), f"{label} →")


def _bars(rows: Mapping[str, Mapping[str, Any]], colours: Mapping[str, str], height: int = 170) -> str:
    """One bar per model from zero to its value, with its 95 % interval as a whisker when it has one."""
    width = max(280, 20 + 80 * len(rows))
    ends = [0.0]
    for row in rows.values():
        ends += [row["value"], *(row.get("ci95") or [])]
    low, high = min(ends), max(ends)
    if high - low < 1e-12:
        high = low + 1.0
    top, bottom = 24, height - 34

    def y(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    step = (width - 20) / max(len(rows), 1)
    shapes = [f'<line x1="10" x2="{width - 10}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#444"/>']
    for k, (name, row) in enumerate(rows.items()):
        x, value = 10 + k * step + step * 0.2, row["value"]
        centre = x + step * 0.3
        top_y, bar_h = min(y(value), y(0)), abs(y(value) - y(0))
        shapes.append(
            f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{step * 0.6:.1f}" height="{bar_h:.1f}" fill="{colours[name]}"/>'
        )
        if row.get("ci95"):
            lo, hi = row["ci95"]
            shapes.append(
                f'<line x1="{centre:.1f}" x2="{centre:.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" stroke="#222"/>'
                f'<line x1="{centre - 5:.1f}" x2="{centre + 5:.1f}" y1="{y(lo):.1f}" y2="{y(lo):.1f}" stroke="#222"/>'
                f'<line x1="{centre - 5:.1f}" x2="{centre + 5:.1f}" y1="{y(hi):.1f}" y2="{y(hi):.1f}" stroke="#222"/>'
            )
        label_y = min(top_y, y(max(row.get("ci95") or [value]))) - 4
        shapes.append(
            f'<text x="{centre:.1f}" y="{max(label_y, 12):.1f}" text-anchor="middle" font-size="11">'
            f"{_number(value)}</text>"
        )
        shapes.append(
            f'<text x="{centre:.1f}" y="{height - 18}" text-anchor="middle" font-size="11">{html.escape(name)}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">{"".join(shapes)}</svg>'
    )


def _svg(
    width: int,
    height: int,
    shapes: list[str],
    legend: Mapping[str, str],
    left: str,
    right: str,
    label: str,
) -> str:
    keys = "".join(
        f'<rect x="{60 + k * 150}" y="6" width="10" height="10" fill="{colour}"/>'
        f'<text x="{74 + k * 150}" y="15" font-size="12">{html.escape(name)}</text>'
        for k, (name, colour) in enumerate(legend.items())
    )
    axes = (
        f'<line x1="45" y1="{height - 30}" x2="{width - 10}" y2="{height - 30}" stroke="#444"/>'
        f'<line x1="45" y1="25" x2="45" y2="{height - 30}" stroke="#444"/>'
        f'<text x="45" y="{height - 12}" font-size="11">{html.escape(left)}</text>'
        f'<text x="{width - 10}" y="{height - 12}" font-size="11" text-anchor="end">{html.escape(right)}</text>'
        f'<text x="{width / 2}" y="{height - 12}" font-size="11" text-anchor="middle">{html.escape(label)}</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">{keys}{axes}{"".join(shapes)}</svg>'
    )
