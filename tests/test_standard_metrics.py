"""The task metrics `bleu` and `rouge_l` give sacrebleu's and rouge-score's numbers, offline (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from align.evaluation import EvalRun, EvalSettings, evaluate_models
from align.plugin_manager import get_plugin_manager
from align.plugins.evaluators import _metric_module, _score
from conftest import REPO, tiny_llama

#: (prediction, reference) pairs on which whitespace tokens disagree with the standard tokenizers.
CASES = {
    "final full stop": ("The cat sat on the mat", "The cat sat on the mat."),
    "punctuation": ("Hello, world! Isn't it (really) great?", "Hello world, isn't it really great?"),
    "case": ("THE ENDING WAS GREAT", "The ending was great"),
    "empty prediction": ("", "A reply that was expected."),
    "unicode": ("Ein naïves Café — 東京へ行きます…", "Ein naives Cafe, 東京に行きます."),
    "sentences": ("It rained. We stayed in! Did you?", "It rained; we stayed inside. Did you go out?"),
    "numbers": ("It is 3.5 km (about 2 miles).", "It's 3.5 km, about two miles."),
    "identical": ("A dull experience: the ending was horrible.", "A dull experience: the ending was horrible."),
}


def sacrebleu_bleu(predictions: list[str], references: list[str]) -> float:
    return sacrebleu.corpus_bleu(predictions, [references]).score / 100  # align reports BLEU on 0-1


def rouge_score_rouge_l(predictions: list[str], references: list[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def align_metric(name: str, predictions: list[str], references: list[str]) -> float:
    """The metric as the task_metrics evaluator loads and computes it."""
    return _score(name, _metric_module(name), predictions, references)


@pytest.mark.parametrize("case", CASES)
def test_bleu_and_rouge_l_of_one_pair_are_sacrebleus_and_rouge_scores(case):
    prediction, reference = CASES[case]
    assert align_metric("bleu", [prediction], [reference]) == pytest.approx(
        sacrebleu_bleu([prediction], [reference]), abs=1e-12
    )
    assert align_metric("rouge_l", [prediction], [reference]) == pytest.approx(
        rouge_score_rouge_l([prediction], [reference]), abs=1e-12
    )


def test_bleu_is_one_corpus_score_and_rouge_l_the_mean_over_pairs():
    predictions, references = (list(column) for column in zip(*CASES.values(), strict=True))
    bleu = align_metric("bleu", predictions, references)
    assert bleu == pytest.approx(sacrebleu_bleu(predictions, references), abs=1e-12)
    assert 0 < bleu < 1  # on align's 0-1 scale, not sacrebleu's 0-100
    rouge_l = align_metric("rouge_l", predictions, references)
    assert rouge_l == pytest.approx(rouge_score_rouge_l(predictions, references), abs=1e-12)


def test_a_reply_that_differs_only_by_a_final_full_stop_has_rouge_l_one():
    prediction, reference = CASES["final full stop"]
    assert align_metric("rouge_l", [prediction], [reference]) == 1.0  # the whitespace version gave 0.75
    assert align_metric("bleu", [prediction], [reference]) < 1.0  # 13a makes the "." a token of its own
    assert align_metric("bleu", [reference], [reference]) == pytest.approx(1.0)


def test_what_the_tokenizers_ignore_and_what_they_keep():
    assert align_metric("rouge_l", ["the CAT, sat!"], ["The cat sat"]) == 1.0  # case and punctuation
    assert align_metric("rouge_l", ["東京"], ["東京"]) == 0.0  # rouge-score keeps only a-z and 0-9
    assert align_metric("bleu", ["THE CAT SAT ON THE MAT"], ["the cat sat on the mat"]) == 0.0  # case counts
    assert align_metric("bleu", [""], ["A reply."]) == 0.0
    assert align_metric("bleu", [], []) == align_metric("rouge_l", [], []) == 0.0


def test_the_eval_task_metrics_report_the_standard_scores(monkeypatch, tmp_path):
    """A model that answers each held-out prompt with its reply, less the final ".": ROUGE-L 1."""
    from transformers import AutoTokenizer

    model = tiny_llama()
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = json.loads((REPO / "datasets" / "demo_sft_test.json").read_text(encoding="utf-8"))[:6]
    answers = [row["output"].removesuffix(".") for row in rows]
    assert all(row["output"].endswith(".") for row in rows)

    def generate(self, path, prompts, *sampling_and_progress):  # the reply to the instruction in each prompt
        responses = []
        for prompt in prompts:
            text = tokenizer.decode(prompt)
            answer = next((a for row, a in zip(rows, answers, strict=True) if row["instruction"] in text), "")
            responses.append(tokenizer.encode(answer, add_special_tokens=False))
        return responses

    monkeypatch.setattr(EvalRun, "generate", generate)
    settings = EvalSettings(data="demo_sft_test", samples=len(rows), evaluators=["task_metrics"])
    results = evaluate_models({"echo": str(model)}, str(model), None, settings, get_plugin_manager())

    metrics = results["models"]["echo"]["metrics"]
    references = [row["output"] for row in rows]
    assert metrics["rouge_l"]["value"] == 1.0
    assert metrics["bleu"]["value"] == pytest.approx(sacrebleu_bleu(answers, references), abs=1e-12)
    assert 0.5 < metrics["bleu"]["value"] < 1.0
    assert metrics["exact_match"]["value"] == 0.0
    for name in ("bleu", "rouge_l"):
        assert metrics[name]["n"] == len(rows) and metrics[name]["higher_is_better"] is True


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            "sacrebleu",
            "task metric 'bleu' needs the package sacrebleu, which is not installed\n"
            "  hint: pip install 'sacrebleu>=2.6,<3'",
        ),
        (
            "rouge_score",
            "task metric 'rouge_l' needs the package rouge-score, which is not installed\n"
            "  hint: pip install 'rouge-score>=0.1.2,<0.2'",
        ),
    ],
)
def test_a_missing_metric_package_stops_align_eval_naming_the_pip_command(tmp_path, module, message):
    """align installed without its dependencies: a message that says what to install, not a traceback."""
    site = tmp_path / "site"
    site.mkdir()
    # Runs at interpreter start: the package looks uninstalled to align's metric module.
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n", encoding="utf-8")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    model = str(tiny_llama())
    command = [sys.executable, "-m", "align.cli", "eval", "--model", f"tiny={model}", "--reference", model]
    command += ["--data", "demo_sft_test", "--samples", "2", "--max-new-tokens", "2", "--output", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "results.json").exists()
