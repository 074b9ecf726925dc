"""Evaluation: align eval, the eval stage and its gates, reports, and the errors a user can meet."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from align import AlignError
from align.evaluation import EvalSettings, evaluate_models
from align.plugin_manager import get_plugin_manager
from browser import chromium, loaded_dom, non_white_share, screenshot
from conftest import EXTERNAL, REPO, run_align

pytestmark = pytest.mark.slow


def results_of(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def value(results: dict, model: str, metric: str) -> float:
    return results["models"][model]["metrics"][metric]["value"]


def test_the_quickstarts_eval_stage_compares_every_policy_with_sft(quickstart):
    results = results_of(quickstart / "eval")
    assert results["schema"] == "align.eval/2"
    assert list(results["models"]) == ["sft", "ppo", "dpo"]  # every policy-producing stage, by capability
    assert value(results, "ppo", "reward") > value(results, "sft", "reward")  # PPO beats SFT on RM score
    for policy in ("ppo", "dpo"):
        assert value(results, policy, "win_rate") >= 0.5  # the gate min_win_rate: 0.5 passed for both
    assert value(results, "ppo", "sentiment") > value(results, "sft", "sentiment")
    assert value(results, "ppo", "preference_accuracy/reward_model") >= 0.9  # the RM ranks held-out pairs
    assert 0 <= value(results, "dpo", "preference_accuracy/implicit_reward") <= 1
    assert "preference_accuracy/implicit_reward" not in results["models"]["sft"]["metrics"]  # π = π_ref
    for name in ("exact_match", "bleu", "rouge_l"):
        assert 0 <= value(results, "ppo", name) <= 1
    assert value(results, "ppo", "perplexity") > 1 and value(results, "ppo", "response_length") > 0

    reward = results["models"]["ppo"]["metrics"]["reward"]
    assert reward["evaluator"] == "reward_model" and reward["n"] == results["prompts"] == 64
    low, high = reward["ci95"]
    assert low < reward["value"] < high and reward["higher_is_better"] is True and reward["headline"] is True
    scores = results["models"]["ppo"]["samples"]["reward"]
    assert len(scores) == 64 and abs(sum(scores) / 64 - reward["value"]) < 1e-9
    assert set(results) == {"schema", "settings", "reference", "reward_model", "prompts", "models"}
    assert results["settings"]["engine"] == "hf"  # the fallback engine, as resolved, is recorded

    assert (quickstart / "eval" / "report.md").read_text().startswith("# Evaluation")
    metrics = json.loads((quickstart / "summary.json").read_text())["stages"]["eval"]["metrics"]
    for policy in ("ppo", "dpo"):  # headline rows, per policy
        assert metrics[f"{policy}_win_rate"] == value(results, policy, "win_rate")
        assert metrics[f"{policy}_kl"] == value(results, policy, "kl")
    assert metrics["ppo_sentiment"] == value(results, "ppo", "sentiment")
    assert "ppo_ended_share" not in metrics  # not a headline row
    assert list(metrics)[:2] == ["ppo_win_rate", "dpo_win_rate"]  # the compared policies come first


def test_a_model_compared_with_itself_wins_half_the_time_at_zero_kl(quickstart, tmp_path):
    output = tmp_path / "self"
    result = run_align(
        "eval",
        "--model",
        f"same={quickstart / 'sft'}",
        "--reference",
        str(quickstart / "sft"),
        "--reward-model",
        str(quickstart / "rm"),
        "--samples",
        "24",
        "--output",
        str(output),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    same = results_of(output)["models"]["same"]["metrics"]
    assert same["win_rate"]["value"] == 0.5 and same["kl"]["value"] == 0.0


def test_the_same_command_gives_the_same_numbers(quickstart, tmp_path):
    args = [
        "eval",
        "--model",
        str(quickstart / "ppo"),
        "--reference",
        str(quickstart / "sft"),
        "--reward-model",
        str(quickstart / "rm"),
        "--samples",
        "16",
        "--reward-function",
        "sentiment",
    ]
    first = run_align(*args, "--output", str(tmp_path / "a"), cwd=REPO)
    second = run_align(*args, "--output", str(tmp_path / "b"), cwd=REPO)
    assert first.returncode == second.returncode == 0, first.stderr[-2000:]
    assert results_of(tmp_path / "a") == results_of(tmp_path / "b")
    assert results_of(tmp_path / "a")["settings"]["seed"] == 0  # the sampling is recorded


VOWELS_PLUGIN = """
from align import hookimpl
from align.evaluation import Evaluator, Metric


class VowelShare(Evaluator):
    \"\"\"A third party's evaluator: the share of vowels in each response.\"\"\"

    name = "vowels"

    def evaluate(self, run, model):
        shares = [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in model.texts]
        mean = sum(shares) / len(shares)
        return [
            Metric("vowel_share", mean, "vowel share (plugin)", n=len(shares), samples=shares, headline=True),
            Metric("vowel_count", 1234.5678, "vowels counted (plugin)", higher_is_better=False),
        ]


@hookimpl
def align_register_evaluators():
    return [VowelShare()]
"""


def test_a_third_party_evaluator_reaches_results_and_both_reports(quickstart, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "vowels.py").write_text(VOWELS_PLUGIN)
    output = tmp_path / "out"
    result = run_align(
        "eval",
        "--plugins-dir",
        str(plugins),
        "--model",
        str(quickstart / "ppo"),
        "--reference",
        str(quickstart / "sft"),
        "--samples",
        "8",
        "--max-new-tokens",
        "12",
        "--output",
        str(output),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = results_of(output)
    row = results["models"]["ppo"]["metrics"]["vowel_share"]
    assert row["evaluator"] == "vowels" and row["label"] == "vowel share (plugin)" and row["n"] == 8
    assert 0 < row["value"] < 1 and len(results["models"]["ppo"]["samples"]["vowel_share"]) == 8
    assert results["models"]["ppo"]["metrics"]["vowel_count"]["value"] == 1234.5678
    assert "kl" in results["models"]["ppo"]["metrics"]  # beside the built-ins

    shown = f"{row['value']:.3f}"
    markdown = (output / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert "vowel share (plugin) |" in header and "vowels counted (plugin) ↓ |" in header
    ppo_line = next(line for line in markdown.splitlines() if line.startswith("| ppo |"))
    assert shown in ppo_line and "1234.6" in ppo_line
    page = (output / "report.html").read_text()
    assert "<th>vowel share (plugin)</th>" in page and f"<td>{shown}</td>" in page
    assert "vowel share (plugin): distribution per model" in page  # it has samples: a distribution
    assert "<figcaption>vowels counted (plugin) ↓</figcaption>" in page  # and a bar chart per metric


def test_an_evaluator_returning_the_old_dictionaries_is_named(quickstart):
    from align import hookimpl
    from align.evaluation import Evaluator

    class Old(Evaluator):
        name = "old_style"

        def evaluate(self, run, model):
            return {"score": 1.0}

    class Plugin:
        @hookimpl
        def align_register_evaluators(self):
            return [Old()]

    pm = get_plugin_manager()
    pm.add_plugin(Plugin(), "old_style_plugin")
    settings = EvalSettings(samples=2, max_new_tokens=4, evaluators=["old_style"])
    with pytest.raises(AlignError, match="evaluator 'old_style' returned dict, not a list of Metric rows"):
        evaluate_models({"ppo": str(quickstart / "ppo")}, str(quickstart / "sft"), None, settings, pm)


def test_the_reports_draw_whatever_rows_they_are_given():
    from align.report import html_report, markdown_report

    def row(value, **extra):
        return {"value": value, "label": None, "evaluator": "x", "ci95": None, "n": None, "higher_is_better": None,
                "headline": False, **extra}  # fmt: skip

    results = {
        "schema": "align.eval/2",
        "settings": {"temperature": 0.7, "seed": 0, "engine": "some-engine"},
        "reference": "/ckpt/a",
        "reward_model": None,
        "prompts": 3,
        "models": {
            "a": {"path": "/ckpt/a", "metrics": {"m1": row(-2.5, label="first")}, "samples": {}, "examples": []},
            "b": {
                "path": "/ckpt/b",
                "metrics": {
                    "m1": row(1.25, label="first", ci95=[0.5, 2.0], higher_is_better=True),
                    "m2": row(0.0),
                },
                "samples": {"m1": [0.5, 1.25, 2.0]},
                "examples": [{"prompt": "a | b", "response": "c\nd"}],
            },
        },
    }
    markdown = markdown_report(results)
    assert "| model | first | m2 |" in markdown
    assert "| a (reference) | -2.500 | - |" in markdown and "| b | 1.250 [0.500, 2.000] | 0.000 |" in markdown
    assert "- **a \\| b** → c d" in markdown
    page = html_report(results)
    assert page.count('<figure class="plot bars"') == 2  # m1, m2
    assert page.count('<figure class="plot distribution"') == 1  # m1 has samples
    assert "plot tradeoff" not in page  # no metrics named reward and kl
    assert page.count("<svg") == 3 and ">count</text>" in page and ">first</text>" in page  # axes, labelled
    assert "some-engine" in page and "<td>1.250 [0.500, 2.000]</td>" in page
    assert "<th>model</th><th>first</th><th>m2</th>" in page  # two metrics: a column each


def test_mt_bench_questions_are_a_prompt_set(quickstart, tmp_path):
    questions = EXTERNAL / "fastchat" / "mt_bench__question.jsonl"
    if not questions.exists():
        pytest.skip("../shared/external is not present")
    result = run_align(
        "eval",
        "--model",
        str(quickstart / "ppo"),
        "--reference",
        str(quickstart / "sft"),
        "--prompts",
        str(questions),
        "--samples",
        "8",
        "--max-new-tokens",
        "16",
        "--output",
        str(tmp_path / "mt"),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = results_of(tmp_path / "mt")
    assert results["prompts"] == 8
    assert results["models"]["ppo"]["examples"][0]["prompt"].startswith("Compose an engaging travel blog post")


def test_a_malformed_prompt_file_is_reported_with_file_and_line(quickstart, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    result = run_align(
        "eval",
        "--model",
        str(quickstart / "ppo"),
        "--reference",
        str(quickstart / "sft"),
        "--prompts",
        str(prompts),
        "--output",
        str(tmp_path / "out"),
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{prompts} line 2: invalid JSON" in result.stderr


def test_a_reward_model_with_another_tokenizer_is_refused(quickstart, tmp_path):
    from align.runner import align_home
    from align.schema import build

    source = get_plugin_manager().get("model source", "tiny-llama")
    other = source.materialize(build(source.Config, {"vocab_size": 700}, "model"), align_home() / "models")
    result = run_align(
        "eval",
        "--model",
        str(quickstart / "ppo"),
        "--reference",
        str(quickstart / "sft"),
        "--reward-model",
        other,
        "--output",
        str(tmp_path / "out"),
        cwd=REPO,
    )
    assert result.returncode == 2
    assert f"reward model ({other}) uses a different tokenizer from the reference" in result.stderr


def test_a_hub_only_metric_asked_for_offline_is_a_clear_error(quickstart):
    settings = EvalSettings(
        data="demo_sft_test", samples=4, max_new_tokens=8, task_metrics=["accuracy"], evaluators=["task_metrics"]
    )
    with pytest.raises(AlignError, match="task metric 'accuracy' cannot be loaded") as info:
        evaluate_models({"ppo": str(quickstart / "ppo")}, str(quickstart / "sft"), None, settings, get_plugin_manager())
    assert "load offline" in str(info.value)


def test_a_missed_gate_fails_the_run_saying_which(quickstart, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(quickstart, copy)
    result = run_align(
        "run",
        str(REPO / "examples" / "quickstart.yaml"),
        "--run-dir",
        str(copy),
        "stages.eval.min_win_rate=0.99",
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "[1/5] sft: cached" in result.stderr
    assert "gate missed: ppo's win rate against sft is" in result.stderr and "below min_win_rate 0.99" in result.stderr
    assert "; dpo's win rate against sft is" in result.stderr  # every policy but the reference is gated
    assert "sft's win rate" not in result.stderr
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["eval"]["status"] == "failed"


def test_the_html_report_opens_offline_and_is_not_blank(quickstart, tmp_path):
    page = (quickstart / "eval" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(["']?(https?:)?//""", page)  # no fetch
    results = results_of(quickstart / "eval")
    metrics = {name for entry in results["models"].values() for name in entry["metrics"]}
    sampled = {name for entry in results["models"].values() for name in entry["samples"]}
    assert sampled == {"reward", "kl", "response_length", "sentiment"}
    # a bar chart per metric, a histogram per sampled one, and reward against KL: each an SVG with axes
    assert page.count('<figure class="plot bars"') == len(metrics)
    assert page.count('<figure class="plot distribution"') == len(sampled)
    assert page.count('<figure class="plot tradeoff"') == 1
    assert page.count("<svg") == len(metrics) + len(sampled) + 1
    assert page.count(">count</text>") == len(sampled)  # the histograms' y-axis
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (the README's test command installs it)")
    dom, seen = loaded_dom(browser, quickstart / "eval" / "report.html", tmp_path)
    assert int(seen["scroll-width"]) <= int(seen["inner-width"])  # 12 metrics, and no sideways scroll
    assert "<title>align evaluation</title>" in dom
    assert non_white_share(screenshot(browser, quickstart / "eval" / "report.html", tmp_path / "report.png")) > 0.02
