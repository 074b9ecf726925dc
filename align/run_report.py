"""The run report: one self-contained page about a whole run, ``RUN/report.html``.

:func:`write_run_report` reads a run folder (see :mod:`align.runner`) and writes, top to bottom:

* the run's folder, status, start and time, and its error if it failed;
* a table of the stages: plugin, status, time and headline metrics;
* a section per stage: status, time, the error of a failed stage, every metric it returned, its data
  counts (``logs/<stage>.data.json``: rows read, kept and skipped, rendered, tokens and trained tokens,
  rows dropped and why, train rows; held-out rows as a dataset of their own) and its training curves
  (``plots/<stage>.png``, drawn now from ``logs/<stage>.metrics.jsonl`` when a run left none; see
  :mod:`align.plots`);
* the evaluation of every stage whose output holds a ``results.json`` (schema ``align.eval/2``), as the
  evaluation report draws it (:func:`align.report.evaluation_html`); for a failed evaluation (a missed
  gate) the one its work folder holds;
* the recipe, as run (``recipe.yaml``).

A failed or interrupted run gets a report too: stages that did not run are shown as pending. The page
needs nothing from elsewhere (its plots are inlined, PNGs as ``data:`` URIs, its CSS in the page, no
scripts), so it can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from align.errors import AlignError
from align.evaluation import SCHEMA
from align.plots import plot_is_stale, plot_path, plot_stage
from align.plugin_manager import AlignPluginManager
from align.progress import format_duration, headline
from align.report import REPORT_STYLE, evaluation_html

__all__ = ["REPORT", "run_report_html", "write_run_report"]

logger = logging.getLogger("align")

#: The report's file name in the run folder.
REPORT = "report.html"

_STYLE = """
nav { font-size: .9rem; margin: .5rem 0 1.5rem; } nav a { margin-right: .8rem; }
.status { display: inline-block; padding: 0 .5rem; border-radius: .6rem; font-size: .8rem; font-weight: 600;
          color: #fff; background: #777; vertical-align: middle; }
.status.done { background: #2e7d32; } .status.cached { background: #1565c0; } .status.failed { background: #c62828; }
.status.running, .status.interrupted { background: #ef6c00; } .status.pending { background: #9e9e9e; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: .6rem; font-size: .8rem; white-space: pre-wrap;
      overflow-wrap: anywhere; }
pre.error { background: #fdecea; border-color: #f5c2c0; }
.pairs { display: grid; grid-template-columns: repeat(auto-fill, minmax(17rem, 1fr)); gap: .1rem 1.5rem;
         font-size: .85rem; margin: .5rem 0; }
.pairs div { display: flex; justify-content: space-between; gap: .5rem; border-bottom: 1px dotted #ccc; }
.pairs span { overflow-wrap: anywhere; } .pairs b { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.stages td, table.stages th, table.data td:first-child { text-align: left; }
table.stages td.time { text-align: right; }
section.stage { border-top: 2px solid #eee; margin-top: 2rem; }
img.curves { display: block; max-width: 100%; height: auto; margin: .5rem 0; }
"""


def write_run_report(run_dir: Path, plugins: AlignPluginManager | None = None) -> Path:
    """Write ``RUN/report.html`` (see the module's docstring); returns its path.

    :param run_dir: the run folder ``align run`` made.
    :param plugins: the plugin manager of the run, whose stages' ``key_metrics`` choose each stage's
        headline metrics; by default the installed plugins (without them, when they cannot be loaded).
    :raises AlignError: the folder is missing, is not a run folder, or its ``summary.json`` is unreadable.
    """
    run_dir = Path(run_dir)
    page = run_report_html(run_dir, plugins)
    path = run_dir / REPORT
    partial = path.with_name(f".{REPORT}.{os.getpid()}.partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, path)  # a browser open on the old report never reads half of the new one
    return path


def run_report_html(run_dir: Path, plugins: AlignPluginManager | None = None) -> str:
    """The run report's page, as :func:`write_run_report` writes it."""
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    stages: Mapping[str, Mapping[str, Any]] = summary["stages"]
    recipe_text, plugin_of = _read_recipe(run_dir)
    plugins = plugins if plugins is not None else _installed_plugins()
    keys = {name: _key_metrics(plugins, plugin_of.get(name)) for name in stages}
    evaluations = {name: found for name in stages if (found := _evaluation(run_dir, name, stages[name]))}

    status = str(summary.get("status", "unknown"))
    nav = ['<a href="#stages">stages</a>', *(f'<a href="#stage-{_id(n)}">{html.escape(n)}</a>' for n in stages)]
    if evaluations:
        nav.append('<a href="#evaluation">evaluation</a>')
    nav.append('<a href="#recipe">recipe</a>')
    parts = [
        f"<h1>align run {html.escape(run_dir.resolve().name)} {_badge(status)}</h1>",
        f"<p>{_about_run(run_dir, summary)}</p>",
    ]
    if summary.get("error"):
        parts.append(f'<pre class="error">{html.escape(str(summary["error"]))}</pre>')
    parts += [
        f"<nav>{''.join(nav)}</nav>",
        '<h2 id="stages">Stages</h2>',
        _stage_table(stages, plugin_of, keys),
    ]
    for name, outcome in stages.items():
        parts.append(_stage_section(run_dir, name, outcome, plugin_of.get(name), keys[name], name in evaluations))
    if evaluations:
        parts.append('<h2 id="evaluation">Evaluation</h2>')
        for name, (results, where) in evaluations.items():
            note = f' <span class="note">(from {html.escape(where)})</span>' if where else ""
            parts.append(f'<h3 id="evaluation-{_id(name)}">stage {html.escape(name)}{note}</h3>')
            parts.append(evaluation_html(results, level=4, ident=f"run-{_id(name)}"))
    parts += ['<h2 id="recipe">Recipe</h2>', f"<pre>{html.escape(recipe_text)}</pre>"]
    title = f"align run {run_dir.resolve().name}: {status}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{REPORT_STYLE}{_STYLE}</style></head><body>
{chr(10).join(parts)}
<p class="note">Written by align on {time.strftime("%Y-%m-%d %H:%M")}.</p>
</body></html>
"""


def _read_summary(run_dir: Path) -> dict[str, Any]:
    if not run_dir.exists():
        raise AlignError(
            f"{run_dir}: no such folder",
            hint="give the folder `align run` made: runs/<recipe name> where it ran, or the --run-dir it was given",
        )
    if not run_dir.is_dir():
        raise AlignError(f"{run_dir} is a file, not a run folder", hint="give the folder that holds summary.json")
    path = run_dir / "summary.json"
    if not path.is_file():
        inside = sorted(p.parent.name for p in run_dir.glob("*/summary.json"))
        hint = (
            f"it holds run folders: {', '.join(inside)}; give one of them"
            if inside
            else "`align run` writes summary.json into the run folder as it starts: is this the right folder?"
        )
        raise AlignError(f"{run_dir} is not a run folder: it has no summary.json", hint=hint)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise AlignError(
            f"{path} cannot be read: {error}",
            hint="the file is damaged; run the recipe again into this folder (finished stages are cached)",
        ) from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), dict):
        raise AlignError(
            f"{path} is not a run summary: it has no 'stages' table",
            hint="the file is damaged or was written by something else; run the recipe again into this folder",
        )
    summary["stages"] = {str(k): v if isinstance(v, dict) else {} for k, v in summary["stages"].items()}
    return summary


def _read_recipe(run_dir: Path) -> tuple[str, dict[str, str]]:
    """recipe.yaml's text, and each stage's plugin from it."""
    path = run_dir / "recipe.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return "(the run folder has no recipe.yaml)", {}
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError:
        return text, {}
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    if not isinstance(stages, dict):
        return text, {}
    return text, {
        str(name): str(spec["plugin"]) for name, spec in stages.items() if isinstance(spec, dict) and "plugin" in spec
    }


def _installed_plugins() -> AlignPluginManager | None:
    from align.plugin_manager import get_plugin_manager

    try:
        return get_plugin_manager()
    except AlignError as error:  # a broken plugin costs the headlines their order, not the report
        logger.warning("the run report shows the first metrics of each stage: %s", error)
        return None


def _key_metrics(plugins: AlignPluginManager | None, plugin: str | None) -> Sequence[str]:
    if plugins is None or plugin is None:
        return ()
    entry = plugins.registry("stage").get(plugin)
    return tuple(getattr(entry.obj, "key_metrics", ())) if entry else ()


def _evaluation(run_dir: Path, name: str, outcome: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The stage's evaluation results and, when they come from a work folder, which; None without any."""
    found = [run_dir / name / "results.json"]
    if outcome.get("status") == "failed":  # a missed gate: its results are in the unpublished work folder
        found += sorted((run_dir / ".work").glob(f"{name}-*/results.json"))
    found = [path for path in found if path.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            logger.warning("%s cannot be read, the run report leaves it out: %s", path, error)
            continue
        if isinstance(results, dict) and results.get("schema") == SCHEMA and results.get("models"):
            published = path.parent == run_dir / name
            return results, "" if published else str(path.parent.relative_to(run_dir))
    return None


def _about_run(run_dir: Path, summary: Mapping[str, Any]) -> str:
    facts = [f"folder <code>{html.escape(str(run_dir.resolve()))}</code>"]
    if summary.get("recipe"):
        facts.append(f"recipe <code>{html.escape(str(summary['recipe']))}</code>")
    started = summary.get("started")
    if isinstance(started, (int, float)):
        facts.append(f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}")
    seconds = summary.get("seconds")
    if isinstance(seconds, (int, float)):
        facts.append(f"took {format_duration(seconds)}")
    return "; ".join(facts) + "."


def _stage_table(
    stages: Mapping[str, Mapping[str, Any]], plugin_of: Mapping[str, str], keys: Mapping[str, Sequence[str]]
) -> str:
    rows = "".join(
        f'<tr><th><a href="#stage-{_id(name)}">{html.escape(name)}</a></th>'
        f"<td>{html.escape(plugin_of.get(name, '-'))}</td><td>{_badge(str(outcome.get('status', '?')))}</td>"
        f'<td class="time">{_duration(outcome)}</td>'
        f"<td>{html.escape(headline(_numbers(outcome), keys[name]) or '-')}</td></tr>"
        for name, outcome in stages.items()
    )
    return (
        '<table class="stages"><thead><tr><th>stage</th><th>plugin</th><th>status</th><th>time</th>'
        f"<th>headline metrics</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _stage_section(
    run_dir: Path,
    name: str,
    outcome: Mapping[str, Any],
    plugin: str | None,
    keys: Sequence[str],
    evaluated: bool,
) -> str:
    status = str(outcome.get("status", "?"))
    about = f" <small>({html.escape(plugin)})</small>" if plugin and plugin != name else ""
    parts = [
        f'<section class="stage" id="stage-{_id(name)}">',
        f"<h2>{html.escape(name)}{about} {_badge(status)}</h2>",
        f"<p>{_describe(status, outcome)}</p>",
    ]
    if outcome.get("error"):
        parts.append(f'<pre class="error">{html.escape(str(outcome["error"]))}</pre>')
    metrics = _numbers(outcome)
    if metrics:
        parts.append(
            '<h3>Metrics</h3><div class="pairs">'
            + "".join(
                f"<div><span>{html.escape(metric)}</span><b>{_number(value)}</b></div>"
                for metric, value in metrics.items()
            )
            + "</div>"
        )
    counts = _data_counts(run_dir / "logs" / f"{name}.data.json")
    if counts:
        parts.append(f"<h3>Data</h3>{counts}")
    curves = _curves(run_dir, name)
    if curves:
        parts.append(f"<h3>Training curves</h3>{curves}")
    if evaluated:
        parts.append(f'<p>Its evaluation: <a href="#evaluation-{_id(name)}">below</a>.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _describe(status: str, outcome: Mapping[str, Any]) -> str:
    what = {
        "done": "Ran",
        "cached": "Cached: its output from an earlier run was up to date",
        "failed": "Failed",
        "pending": "Not run: the run ended before it",
        "running": "Was running when this report was written (or when the run was killed)",
    }.get(status, html.escape(status))
    took = _duration(outcome)
    return f"{what}{f' in {took}' if took != '-' and status != 'pending' else ''}."


def _data_counts(path: Path) -> str:
    """The data report as tables: a list of rows per dataset as a table, a number as a line."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return ""
    if not isinstance(report, dict):
        return ""
    titles = {"loaded": "read", "rendered": "rendered (tokenized, within max_length)"}
    parts, lines = [], []
    for key, value in report.items():
        label = titles.get(key, key.replace("_", " "))
        if isinstance(value, list) and all(isinstance(row, dict) for row in value) and value:
            columns = list(dict.fromkeys(column for row in value for column in row))
            head = "".join(f"<th>{html.escape(column.replace('_', ' '))}</th>" for column in columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_count(row.get(column)))}</td>" for column in columns) + "</tr>"
                for row in value
            )
            parts.append(
                f'<p><b>{html.escape(label)}</b></p><table class="data"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>"
            )
        else:
            lines.append(f"{html.escape(label)}: <b>{html.escape(_count(value))}</b>")
    if lines:
        parts.append(f"<p>{'; '.join(lines)}</p>")
    return "".join(parts)


def _count(value: Any) -> str:
    """``1,234``; a dict of reasons as ``too long 3, empty 1``; nothing as ``-``."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return ", ".join(f"{reason} {_count(n)}" for reason, n in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(_count(v) for v in value) or "none"
    return str(value)


def _curves(run_dir: Path, name: str) -> str:
    path = plot_path(run_dir, name)
    if plot_is_stale(run_dir, name):
        try:  # a run that was killed left no final plot, and one from before this version none at all
            plot_stage(run_dir, name)
        except Exception as error:  # the report still tells everything else
            return (
                f'<p class="note">The curves could not be drawn: {html.escape(f"{type(error).__name__}: {error}")}</p>'
            )
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    size = ""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        size = f' width="{width}" height="{height}"'
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<img class="curves" data-stage="{html.escape(name)}"{size} '
        f'alt="training curves of stage {html.escape(name)}" src="data:image/png;base64,{encoded}">'
    )


def _numbers(outcome: Mapping[str, Any]) -> dict[str, float]:
    metrics = outcome.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _number(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _duration(outcome: Mapping[str, Any]) -> str:
    seconds = outcome.get("seconds")
    if not isinstance(seconds, (int, float)) or (outcome.get("status") == "pending" and not seconds):
        return "-"
    return format_duration(seconds) if seconds >= 1 else f"{seconds:.2f} s"


def _badge(status: str) -> str:
    return f'<span class="status {html.escape(_id(status))}">{html.escape(status)}</span>'


def _id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
