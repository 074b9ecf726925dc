"""Evaluation: align eval, the eval stage and its gates, reports, and the errors a user can meet."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from align import AlignError
from align.evaluation import EvalSettings, evaluate_models
from align.plugin_manager import get_plugin_manager
from conftest import EXTERNAL, REPO, run_align

pytestmark = pytest.mark.slow


def results_of(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def test_the_quickstarts_eval_stage_shows_that_ppo_helped(quickstart):
    results = results_of(quickstart / "eval")
    assert results["schema"] == "align.eval/1"
    sft, ppo = results["models"]["sft"], results["models"]["ppo"]
    assert ppo["reward"]["mean"] > sft["reward"]["mean"]  # PPO's policy beats SFT's on reward-model score
    assert ppo["win_rate"] >= 0.5  # and the gate min_win_rate: 0.5 passed
    assert ppo["reward_functions"]["sentiment"] > sft["reward_functions"]["sentiment"]
    assert ppo["preference_accuracy"]["reward_model"] >= 0.9  # the RM ranks held-out pairs
    assert 0 <= ppo["preference_accuracy"]["implicit_reward"] <= 1
    for name in ("exact_match", "bleu", "rouge_l"):
        assert 0 <= ppo["task_metrics"][name] <= 1
    assert ppo["perplexity"] > 1 and ppo["response_length"] > 0
    assert (quickstart / "eval" / "report.md").read_text().startswith("# Evaluation")
    summary = json.loads((quickstart / "summary.json").read_text())
    assert summary["stages"]["eval"]["metrics"]["win_rate"] == ppo["win_rate"]


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
    same = results_of(output)["models"]["same"]
    assert same["win_rate"] == 0.5 and same["kl"] == 0.0


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
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["eval"]["status"] == "failed"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_html_report_opens_offline_and_is_not_blank(quickstart, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (the README's test command installs it)")
    page = (quickstart / "eval" / "report.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert page.count("<svg") == 3  # score distributions, win rates, reward against KL
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1000,1200",
            (quickstart / "eval" / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert non_white_share(screenshot) > 0.02


def non_white_share(png: Path) -> float:
    """The share of a PNG's pixels that are not white (8-bit RGB or RGBA, as Chromium writes them)."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and colour in (2, 6)
    channels = 4 if colour == 6 else 3
    chunks, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            chunks.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    previous = bytearray(stride)
    coloured = 0
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):  # undo the PNG row filter (None, Sub, Up, Average, Paeth)
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                guess = left + up - corner
                nearest = min((abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - corner), 2, corner))
                line[x] = (line[x] + nearest[2]) & 255
        coloured += sum(1 for x in range(0, stride, channels) if min(line[x : x + 3]) < 240)
        previous = line
    return coloured / (width * height)
