"""Evaluation reports: a Markdown table and a self-contained HTML page whose plots are inline SVG.

Nothing is fetched when the page opens (no scripts, fonts or stylesheets from elsewhere), so it works
offline and can be attached to an issue or an email.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _rows(results: Mapping[str, Any]) -> list[tuple[str, dict[str, str]]]:
    rows = []
    for name, entry in results["models"].items():
        reward = entry.get("reward")
        cells = {
            "reward (95 % CI)": f"{reward['mean']:.3f} [{reward['ci95'][0]:.3f}, {reward['ci95'][1]:.3f}]"
            if reward
            else "-",
            "win rate": _number(entry.get("win_rate")),
            "KL": _number(entry.get("kl")),
            "length": _number(entry.get("response_length"), 1),
            "perplexity": _number(entry.get("perplexity"), 2),
        }
        for kind, value in (entry.get("preference_accuracy") or {}).items():
            cells[f"pref. accuracy ({kind})"] = _number(value)
        for rule, value in (entry.get("reward_functions") or {}).items():
            cells[rule] = _number(value)
        for metric, value in (entry.get("task_metrics") or {}).items():
            cells[metric] = _number(value)
        rows.append((name, cells))
    return rows


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_report(results: Mapping[str, Any]) -> str:
    rows = _rows(results)
    columns = list(dict.fromkeys(c for _, cells in rows for c in cells))
    lines = [
        "# Evaluation",
        "",
        f"Reference: `{results['reference']}`; reward model: `{results['reward_model'] or 'none'}`; "
        f"{results['prompts']} prompts; sampling: temperature {results['settings']['temperature']}, "
        f"seed {results['settings']['seed']}, engine {results['settings']['engine']}.",
        "",
        "| model | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += [f"| {name} | " + " | ".join(cells.get(c, "-") for c in columns) + " |" for name, cells in rows]
    for name, entry in results["models"].items():
        lines += ["", f"## {name}: sample responses", ""]
        for example in entry.get("examples", []):
            lines += [f"- **{_one_line(example['prompt'])}** → {_one_line(example['response'])}"]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def html_report(results: Mapping[str, Any]) -> str:
    rows = _rows(results)
    columns = list(dict.fromkeys(c for _, cells in rows for c in cells))
    table = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{html.escape(cells.get(c, '-'))}</td>" for c in columns)
        + "</tr>"
        for name, cells in rows
    )
    models = results["models"]
    plots = []
    scores = {name: entry["reward_scores"] for name, entry in models.items() if entry.get("reward_scores")}
    if scores:
        plots.append(("Reward-model score distributions", _histograms(scores)))
    wins = {name: entry["win_rate"] for name, entry in models.items() if entry.get("win_rate") is not None}
    if wins:
        plots.append(("Win rate against the reference (ties count half)", _bars(wins)))
    points = {
        name: (entry["kl"], entry["reward"]["mean"])
        for name, entry in models.items()
        if entry.get("reward") and entry.get("kl") is not None
    }
    if points:
        plots.append(("Reward against KL to the reference", _scatter(points)))
    figures = "".join(f"<figure><figcaption>{html.escape(t)}</figcaption>{svg}</figure>" for t, svg in plots)
    samples = "".join(
        f"<h3>{html.escape(name)}</h3><ul>"
        + "".join(
            f"<li><b>{html.escape(e['prompt'])}</b><br>{html.escape(e['response'])}</li>"
            for e in entry.get("examples", [])
        )
        + "</ul>"
        for name, entry in models.items()
    )
    settings = results["settings"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>align evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: .85rem; display: block; overflow-x: auto; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }}
th:first-child {{ text-align: left; }}
thead th {{ background: #f0f0f0; }}
figure {{ margin: 1.5rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .5rem; }}
</style></head><body>
<h1>align evaluation</h1>
<p>Reference <code>{html.escape(str(results["reference"]))}</code>, reward model
<code>{html.escape(str(results["reward_model"] or "none"))}</code>, {results["prompts"]} prompts, temperature
{settings["temperature"]}, seed {settings["seed"]}, engine {html.escape(settings["engine"])}.</p>
<table><thead><tr><th>model</th>{"".join(f"<th>{html.escape(c)}</th>" for c in columns)}</tr></thead>
<tbody>{table}</tbody></table>
{figures}
<h2>Sample responses</h2>{samples}
</body></html>
"""


def _histograms(series: Mapping[str, Sequence[float]], width: int = 640, height: int = 220) -> str:
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
    for k, c in enumerate(counts.values()):
        colour = COLOURS[k % len(COLOURS)]
        for i, n in enumerate(c):
            x = 50 + i * (width - 60) / bins + k * bar
            h = (height - 50) * n / top
            shapes.append(
                f'<rect x="{x:.1f}" y="{height - 30 - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour}" opacity="0.8"/>'
            )
    return _svg(width, height, shapes, series, f"{low:.2f}", f"{high:.2f}", "score")


def _bars(values: Mapping[str, float], width: int = 640, height: int = 220) -> str:
    shapes = []
    step = (width - 60) / max(len(values), 1)
    for k, value in enumerate(values.values()):
        h = (height - 50) * value
        x = 50 + k * step + step * 0.2
        shapes.append(
            f'<rect x="{x:.1f}" y="{height - 30 - h:.1f}" width="{step * 0.6:.1f}" height="{h:.1f}" '
            f'fill="{COLOURS[k % len(COLOURS)]}"/>'
        )
        shapes.append(
            f'<text x="{x + step * 0.3:.1f}" y="{height - 35 - h:.1f}" text-anchor="middle" '
            f'font-size="12">{value:.2f}</text>'
        )
    half = height - 30 - (height - 50) * 0.5
    shapes.append(
        f'<line x1="45" x2="{width - 10}" y1="{half:.1f}" y2="{half:.1f}" stroke="#999" stroke-dasharray="4 3"/>'
    )
    return _svg(width, height, shapes, values, "", "", "0.5 = as good as the reference")


def _scatter(points: Mapping[str, tuple[float, float]], width: int = 640, height: int = 260) -> str:
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    x0, x1 = min(xs + [0.0]), max(xs + [1e-6])
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 1, y1 + 1
    shapes = []
    for k, (name, (x, y)) in enumerate(points.items()):
        cx = 50 + (x - x0) / ((x1 - x0) or 1) * (width - 160)  # room for the label right of the point
        cy = height - 30 - (y - y0) / (y1 - y0) * (height - 60)
        shapes.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="7" fill="{COLOURS[k % len(COLOURS)]}"/>')
        shapes.append(f'<text x="{cx + 10:.1f}" y="{cy + 4:.1f}" font-size="12">{html.escape(name)}</text>')
    shapes.append(f'<text x="50" y="35" font-size="11">reward {y1:.2f}</text>')
    shapes.append(f'<text x="50" y="{height - 36}" font-size="11">{y0:.2f}</text>')
    return _svg(width, height, shapes, points, f"{x0:.2f}", f"{x1:.2f}", "KL to the reference (nats per response) →")


def _svg(
    width: int, height: int, shapes: list[str], legend: Mapping[str, Any], left: str, right: str, label: str
) -> str:
    keys = "".join(
        f'<rect x="{60 + k * 120}" y="6" width="10" height="10" fill="{COLOURS[k % len(COLOURS)]}"/>'
        f'<text x="{74 + k * 120}" y="15" font-size="12">{html.escape(name)}</text>'
        for k, name in enumerate(legend)
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
