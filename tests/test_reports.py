"""Training curves (align.plots), the run report (align.run_report), and both HTML reports in a browser."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from align import AlignError
from align.plots import curves_figure, panels, plot_path, plot_stage, read_rows, step_rows
from align.recipe import load_recipe
from align.run_report import write_run_report
from align.runner import run_recipe
from browser import chromium, loaded_dom, non_white_share, screenshot
from conftest import FAKE_PLUGIN


def titles(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_visible()]


def rows(*steps: int | None, **metrics: float) -> list[dict]:
    """A row per step (None: a closing row); each metric rises by one a row from the value given."""
    return [{"step": step, **{name: value + k for name, value in metrics.items()}} for k, step in enumerate(steps)]


# The curves


def test_panels_are_chosen_from_the_metric_names_alone():
    names = [
        "loss", "eval_loss", "eval_demo_pref_loss", "policy_loss", "value_loss", "grad_norm", "entropy",
        "rewards/chosen", "rewards/margins", "rm_score", "margin", "kl", "approx_kl", "kl_coef",
        "rewards/accuracies", "mean_token_accuracy", "eval_accuracy", "learning_rate", "epoch", "train_loss",
    ]  # fmt: skip
    found = {panel.title: panel.metrics for panel in panels(names)}
    assert list(found) == ["loss", "policy loss", "value loss", "reward", "KL", "accuracy", "learning rate"]
    assert found["loss"] == ["loss", "eval_loss", "eval_demo_pref_loss"]
    assert found["reward"] == ["rewards/chosen", "rewards/margins", "rm_score", "margin"]
    assert found["KL"] == ["kl"]  # approx_kl is PPO's step-size diagnostic, kl_coef a setting
    assert found["accuracy"] == ["rewards/accuracies", "mean_token_accuracy", "eval_accuracy"]
    assert found["learning rate"] == ["learning_rate"]
    assert panels(["grad_norm", "entropy", "train_loss", "epoch"]) == []


def test_a_third_party_stage_that_logs_loss_gets_a_loss_panel():
    figure = curves_figure(rows(1, 2, 3, loss=2.0, my_own_thing=5.0), "my-stage")
    assert figure is not None and titles(figure) == ["loss"]
    ax = figure.axes[0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    assert [line.get_label() for line in ax.get_lines()] == ["loss"]
    assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3]
    assert figure.get_suptitle() == "my-stage"


def test_a_stage_without_two_logged_steps_gets_no_plot(tmp_path):
    assert curves_figure(rows(None, loss=1.0), "closing row only") is None
    assert curves_figure(rows(7, None, loss=1.0), "one step") is None
    assert curves_figure(rows(1, 2, grad_norm=1.0), "nothing that belongs on a panel") is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "eval.metrics.jsonl").write_text('{"step": null, "win_rate": 0.5}\n')
    assert plot_stage(tmp_path, "eval") is None and not plot_path(tmp_path, "eval").exists()
    assert plot_stage(tmp_path, "never-ran") is None


def test_only_the_latest_attempt_of_a_stage_is_drawn():
    forced = rows(5, 10, None, 5, 10, 15, loss=0.0)  # ran, closed; rerun with --force
    assert [(r["step"], r["loss"]) for r in step_rows(forced)] == [(5, 3.0), (10, 4.0), (15, 5.0)]
    resumed = rows(5, 10, 15, 20, 15, 20, 25, loss=0.0)  # killed after step 20, resumed from checkpoint 10
    assert [(r["step"], r["loss"]) for r in step_rows(resumed)] == [(5, 0), (10, 1), (15, 4), (20, 5), (25, 6)]
    held_out = rows(10, 10, 20, loss=0.0)  # a training row and a held-out row share a step
    assert [r["step"] for r in step_rows(held_out)] == [10, 10, 20]


def test_a_metrics_file_becomes_a_png_with_held_out_points_beside_their_curve(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [*rows(1, 2, 3, loss=1.0, learning_rate=0.1, kl=0.5), {"step": 3, "eval_demo_loss": 0.7}]
    lines.append({"step": None, "train_loss": 1.5})  # the closing row
    (logs / "st.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    path = plot_stage(tmp_path, "st")
    assert path == tmp_path / "plots" / "st.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "plots").glob(".*"))  # written whole, by a rename
    figure = curves_figure(read_rows(logs / "st.metrics.jsonl"), "st")  # the half-written last line is skipped
    assert titles(figure) == ["loss", "KL", "learning rate"]
    loss, held_out = figure.axes[0].get_lines()
    assert held_out.get_label() == "eval_demo_loss" and held_out.get_color() == loss.get_color() == "C0"


# Plotting while a stage trains, through the runner

CURVES_PLUGIN = '''
from dataclasses import dataclass

from align import hookimpl
from align.stage import Input, Stage


@dataclass
class Settings:
    pass


class Curves(Stage):
    """Logs a falling loss; records whether its plot existed before it ended."""

    name = "curves"
    Config = Settings
    key_metrics = ("loss",)
    inputs = {"policy": Input("unused", default=("base",))}

    def run(self, context):
        for step in range(1, 6):
            context.log_metrics({"loss": 1.0 / step, "learning_rate": 0.1}, step=step)
        plot = context.run_dir / "plots" / f"{context.name}.png"
        (context.output_dir / "plot-while-training").write_text(str(plot.exists()))
        return {"first_loss": 1.0, "last_loss": 0.2}


@hookimpl
def align_register_stages():
    return [Curves()]
'''

RECIPE = """
model: fake-model
stages:
  train:
    plugin: curves
  broken:
    plugin: count
    fail: align
  after:
    plugin: count
"""


@pytest.fixture
def curves_pm(tmp_path):
    from align.plugin_manager import get_plugin_manager

    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(FAKE_PLUGIN, folder / FAKE_PLUGIN.name)
    (folder / "curves_stage.py").write_text(CURVES_PLUGIN)
    return get_plugin_manager(plugins_dir=folder)


def run(tmp_path: Path, pm, recipe: str = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(recipe))
    run_recipe(load_recipe(path, [], pm), pm, run_dir=tmp_path / "run")
    return tmp_path / "run"


def test_a_stage_is_plotted_while_it_trains_and_when_it_ends(tmp_path, curves_pm, monkeypatch):
    monkeypatch.setattr("align.plots.REDRAW_SECONDS", 0.0)  # no throttle: a plot at the second row already
    run_dir = run(tmp_path, curves_pm)
    assert (run_dir / "train" / "plot-while-training").read_text() == "True"
    log = run_dir / "logs" / "train.metrics.jsonl"
    assert titles(curves_figure(read_rows(log), "train")) == ["loss", "learning rate"]
    assert (run_dir / "plots" / "train.png").stat().st_mtime >= log.stat().st_mtime
    assert not (run_dir / "plots" / "broken.png").exists()  # one row with a step: no curve


def test_redraws_are_throttled(tmp_path, curves_pm):
    run_dir = run(tmp_path, curves_pm)  # 5 rows in well under REDRAW_SECONDS: only the final plot
    assert (run_dir / "train" / "plot-while-training").read_text() == "False"
    assert (run_dir / "plots" / "train.png").exists()


def test_a_plot_that_fails_is_a_warning_not_a_failed_stage(tmp_path, curves_pm, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr("align.plots.curves_figure", broken)
    run_dir = run(tmp_path, curves_pm, RECIPE.split("  broken:")[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["stages"]["train"]["status"] == "done"
    log = (run_dir / "logs" / "run.log").read_text()
    assert "could not plot the curves of stage train (at its end): RuntimeError: no fonts on this machine" in log


# The run report


def test_a_failed_run_gets_a_report_with_its_error_and_its_pending_stages(tmp_path, curves_pm):
    run_dir = run(tmp_path, curves_pm)
    page = write_run_report(run_dir, curves_pm).read_text()  # the run's plugins: its stages' key metrics
    assert "<title>align run run: failed</title>" in page
    assert re.search(r'id="stage-broken">\s*<h2>broken <small>\(count\)</small> <span class="status failed">', page)
    assert "the fake stage was told to fail" in page
    assert '<span class="status pending">pending</span>' in page and "Not run: the run ended before it." in page
    assert page.count('<img class="curves"') == 1 and 'data-stage="train"' in page  # the only stage with curves
    assert "<td>loss 1 → 0.2</td>" in page  # the stage's key metric, from its first and last values
    assert "plugin: curves" in page  # the recipe


def test_the_report_draws_curves_a_run_left_none_of(tmp_path, curves_pm):
    run_dir = run(tmp_path, curves_pm)
    shutil.rmtree(run_dir / "plots")  # a run from before plots, or killed before its last plot
    page = write_run_report(run_dir).read_text()
    assert 'data-stage="train"' in page and (run_dir / "plots" / "train.png").exists()


def test_bad_run_folders_are_named_with_a_hint(tmp_path):
    with pytest.raises(AlignError, match="no such folder") as info:
        write_run_report(tmp_path / "nowhere")
    assert "runs/<recipe name>" in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AlignError, match="is a file, not a run folder"):
        write_run_report(tmp_path / "file")
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    (tmp_path / "runs" / "quick" / "summary.json").write_text("{")
    with pytest.raises(AlignError, match="is not a run folder: it has no summary.json") as info:
        write_run_report(tmp_path / "runs")
    assert "it holds run folders: quick" in str(info.value)
    with pytest.raises(AlignError, match=r"summary.json cannot be read") as info:
        write_run_report(tmp_path / "runs" / "quick")
    assert "run the recipe again" in str(info.value)
    (tmp_path / "runs" / "quick" / "summary.json").write_text("[1, 2]")
    with pytest.raises(AlignError, match="is not a run summary"):
        write_run_report(tmp_path / "runs" / "quick")


@pytest.fixture(scope="module")
def quickstart_report(quickstart, tmp_path_factory) -> Path:
    """A copy of the quickstart's run (without weights) with its run report written."""
    copy = tmp_path_factory.mktemp("report") / "quickstart"
    shutil.copytree(quickstart, copy, ignore=shutil.ignore_patterns("*.safetensors", "tensorboard", ".work"))
    write_run_report(copy)
    return copy


@pytest.mark.slow
def test_the_quickstart_plots_each_training_stage_as_it_runs(quickstart):
    assert sorted(p.name for p in (quickstart / "plots").iterdir()) == ["dpo.png", "ppo.png", "rm.png", "sft.png"]


@pytest.mark.slow
def test_the_quickstarts_run_report_holds_every_stage_and_the_evaluation(quickstart_report):
    page = (quickstart_report / "report.html").read_text()
    assert "<title>align run quickstart: done</title>" in page
    for stage in ("sft", "rm", "ppo", "dpo", "eval"):
        assert f'<section class="stage" id="stage-{stage}">' in page
    assert [m for m in re.findall(r'<img class="curves" data-stage="(\w+)"', page)] == ["sft", "rm", "ppo", "dpo"]
    assert "demo_pref (held out)" in page and "13,126" in page  # data counts: held-out rows, sft's tokens
    evaluation = page[page.index('<h2 id="evaluation">') :]
    assert "<th>sft (reference)</th><th>ppo</th><th>dpo</th>" in evaluation  # a column per evaluated policy
    assert evaluation.count('<figure class="plot tradeoff"') == 1
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(["']?(https?:)?//|<script|@import""", page)


@pytest.mark.slow
def test_both_reports_render_in_a_browser_with_their_plots_and_no_sideways_scroll(quickstart_report, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (the README's test command installs it)")
    run_page, eval_page = quickstart_report / "report.html", quickstart_report / "eval" / "report.html"

    dom, seen = loaded_dom(browser, run_page, tmp_path)
    assert "<title>align run quickstart: done</title>" in dom and "<h1>align run quickstart" in dom
    assert int(seen["images"]) == 4  # a curve per training stage, each decoded (naturalWidth > 0)
    assert int(seen["scroll-width"]) <= int(seen["inner-width"])
    evaluation = dom[dom.index('id="evaluation"') :]
    for policy in ("sft (reference)", "ppo", "dpo"):
        assert f"<th>{policy}</th>" in evaluation
    assert non_white_share(screenshot(browser, run_page, tmp_path / "run.png", "1000,3000")) > 0.02

    dom, seen = loaded_dom(browser, eval_page, tmp_path)
    assert "<title>align evaluation</title>" in dom
    assert int(seen["scroll-width"]) <= int(seen["inner-width"])
    tradeoff = dom[dom.index('class="plot tradeoff"') :]
    tradeoff = tradeoff[: tradeoff.index("</figure>")]
    for policy in ("sft (reference)", "ppo", "dpo"):
        assert f">{policy}</text>" in tradeoff  # each policy's point is labelled
    assert non_white_share(screenshot(browser, eval_page, tmp_path / "eval.png", "1000,3000")) > 0.02


# The evaluation report's table and plots


def eval_row(value, label=None, ci95=None, higher_is_better=None):
    row = {"value": value, "label": label, "evaluator": "x", "ci95": ci95, "n": 4, "headline": True}
    return {**row, "higher_is_better": higher_is_better}


def test_many_metrics_turn_the_table_and_reward_is_drawn_against_kl():
    from align.report import html_report

    metrics = {f"m{k}": eval_row(float(k), higher_is_better=True) for k in range(6)}
    results = {
        "schema": "align.eval/2",
        "settings": {},
        "reference": "/ckpt/a",
        "reward_model": None,
        "prompts": 4,
        "models": {
            "a": {"path": "/ckpt/a", "metrics": {**metrics, "reward": eval_row(1.0), "kl": eval_row(0.0, "KL")}},
            "b": {
                "path": "/ckpt/b",
                "metrics": {
                    **{name: {**row, "value": row["value"] + 1} for name, row in metrics.items()},
                    "reward": eval_row(2.0, ci95=[1.5, 2.5]),
                    "kl": eval_row(3.0, "KL", ci95=[2.0, 4.0]),
                },
            },
        },
    }
    page = html_report(results)
    assert "<thead><tr><th>metric</th><th>a (reference)</th><th>b</th></tr></thead>" in page  # 8 metrics: rows
    assert '<tr><th>m3 ↑</th><td>3.000</td><td class="best">4.000</td></tr>' in page  # the best in bold
    tradeoff = page[page.index('<figure class="plot tradeoff"') :]
    tradeoff = tradeoff[: tradeoff.index("</figure>")]
    assert ">a (reference)</text>" in tradeoff and ">b</text>" in tradeoff  # each point named
    assert ">KL to the reference (lower: closer)</text>" in tradeoff and ">reward</text>" in tradeoff
    assert page.count('<figure class="plot bars"') == 8 and "plot distribution" not in page  # no samples
