"""The built-in reward functions (exact_answer, format, sentiment) and the demo math task they judge."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from align import AlignError
from align.plugin_manager import get_plugin_manager
from align.plugins.reward_functions import ExactAnswer, Format, Sentiment, final_answer, same_answer
from align.reward import RewardFunction, RewardSpec, resolve_reward_functions
from conftest import REPO

DATASETS = REPO / "datasets"


def exact(response: str, answer: object, **options: object) -> float:
    rule = ExactAnswer().with_options(options, "test") if options else ExactAnswer()
    return rule.score(["q"], [response], {"answer": [answer]})[0]


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("7 + 5 = 12\nAnswer: 12", "12"),
        ("Answer: 12", 12),  # a JSON number in the row
        ("answer: 12", "12"),  # the marker in any case
        ("Answer: 3\nno, wait.\nAnswer: 12", "12"),  # the last marker decides
        ("Answer: 12\nI hope that helps.", "12"),  # the marker's line only
        ("Answer:12.", "12"),
        ("Answer: $12$", "12"),
        ("Answer: \\boxed{12}", "12"),
        ("Answer: 1,000", "1000"),
        ("Answer: 1,234,567.5", "1234567.5"),
        ("Answer: 3.0", "3"),
        ("Answer: -0", "0"),
        ("Answer: -7", "-7"),
        ("Answer: 0.5", "1/2"),
        ("Answer: \\frac{1}{2}", "0.5"),
        ("Answer: Paris", "paris"),
        ("Answer:  New   York ", "new york"),
        ("so the total is \\boxed{12}", "12"),
        ("\\boxed{3} at first, then \\boxed{12}", "12"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{x^{2}+1}", "x^{2}+1"),  # nested braces
        ("\\boxed{12", "12"),  # unclosed: the last number instead
        ("7 and 5 make 12.", "12"),  # the last number
        ("it is -3", "-3"),
        ("9-12=-3", "-3"),
        ("1,000 plus 2,000 is 3,000", "3000"),
        ("halve it: 1/2", "0.5"),
    ],
)
def test_exact_answer_credits_the_final_answer(response: str, answer: object):
    assert exact(response, answer) == 1.0


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("Answer: 13", "12"),
        ("Answer: 12\nAnswer: 13", "12"),  # the last marker decides
        ("12 Answer: I don't know", "12"),  # a marker commits: no falling back to the last number
        ("12\nAnswer:", "12"),
        ("12 + 1 = 13", "12"),
        ("7-5", "-5"),  # a subtraction, not a negative number: the last number is 5
        ("", "12"),
        ("no idea", "12"),
        ("Answer: 12 apples", "12"),
        ("Answer: 1,2", "12"),  # not a thousands separator
    ],
)
def test_exact_answer_refuses_others(response: str, answer: str):
    assert exact(response, answer) == 0.0


def test_final_answer_says_what_it_found():
    assert final_answer("Answer: 12") == "12"
    assert final_answer("so \\boxed{a{b}c} then") == "a{b}c"
    assert final_answer("between 3 and 4.5") == "4.5"
    assert final_answer("nothing here") is None
    assert final_answer("#### 72", marker="####") == "72"
    assert final_answer("Answer: 5 #### 72", marker="") == "72"  # no marker: the last number
    assert same_answer(" $1,000.$ ", "1e3")


def test_exact_answer_options_name_the_column_and_marker():
    rule = ExactAnswer().with_options({"column": "gold", "marker": "####"}, "test")
    responses = ["work\n#### 72", "#### 72\n#### 71", "Answer: 72"]  # the last: no "####", so its last number
    assert rule.score(["q"] * 3, responses, {"gold": ["72"] * 3}) == [1.0, 0.0, 1.0]
    assert ExactAnswer().config.column == "answer"  # with_options made a copy


def test_exact_answer_without_its_column_says_which_and_how():
    with pytest.raises(AlignError) as error:
        ExactAnswer().score(["q"], ["Answer: 1"], {"solution": ["1"], "source": ["x"]})
    text = str(error.value)
    assert "exact_answer" in text and "'answer'" in text and "solution, source" in text
    assert "options: {column: ...}" in text
    with pytest.raises(AlignError, match="columns: none"):
        ExactAnswer().score(["q"], ["Answer: 1"])


def test_exact_answer_refuses_a_row_without_an_answer():
    with pytest.raises(AlignError, match="row 1 has no value in its column 'answer'"):
        ExactAnswer().score(["q", "q"], ["1", "2"], {"answer": ["1", None]})


def test_format_default_asks_for_a_last_answer_line():
    rule = Format()
    responses = ["7 + 5 = 12\nAnswer: 12", "Answer: 12\n", "Answer:", "Answer: 12\nmore", "the answer is 12"]
    assert rule.score(["q"] * 5, responses) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_pattern_is_searched_as_written():
    rule = Format().with_options({"pattern": r"\d+$"}, "test")
    assert rule.score(["q"] * 3, ["Answer: 12", "12 apples", "Answer: 12\n"]) == [1.0, 0.0, 1.0]
    multiline = Format().with_options({"pattern": r"(?mi)^answer: \d+$"}, "test")
    assert multiline.score(["q"] * 2, ["answer: 1\nmore", "x answer: 1"]) == [1.0, 0.0]


def test_format_refuses_an_invalid_pattern_when_configured():
    with pytest.raises(AlignError) as error:
        Format().with_options({"pattern": "Answer: (\\d+"}, "stages.grpo.reward_functions[1].options")
    text = str(error.value)
    assert "format" in text and "'Answer: (\\\\d+'" in text and "missing )" in text


def test_sentiment_ignores_the_columns():
    assert Sentiment().score(["q"], ["a great, wonderful film"], {"answer": ["1"]}) == [1.0]


def test_builtins_are_registered_and_resolved_with_options():
    pm = get_plugin_manager()
    assert {"sentiment", "exact_answer", "format"} <= set(pm.registry("reward function"))
    resolved = resolve_reward_functions(
        ["exact_answer", RewardSpec(function="format", weight=0.5, options={"pattern": "^Answer"})],
        pm,
        "stages.grpo.reward_functions",
    )
    (answer, w1), (fmt, w2) = resolved
    assert (answer.name, w1, fmt.name, w2) == ("exact_answer", 1.0, "format", 0.5)
    assert fmt.score(["q"], ["Answer: 1"]) == [1.0] and fmt.config.pattern == "^Answer"
    assert pm.get("reward function", "format").config.pattern != "^Answer"  # the registered one is unchanged


def test_resolve_names_a_bad_option():
    pm = get_plugin_manager()
    with pytest.raises(AlignError, match=r"unknown key 'rf\[0\]\.options\.colum' \(did you mean 'column'\?\)"):
        resolve_reward_functions([RewardSpec(function="exact_answer", options={"colum": "x"})], pm, "rf")
    with pytest.raises(AlignError, match="not a valid regular expression"):
        resolve_reward_functions([RewardSpec(function="format", options={"pattern": "("})], pm, "rf")


class Miscounts(RewardFunction):
    name = "miscounts"

    def __call__(self, prompts, responses, **columns):
        return [1.0]


class ReturnsNaN(RewardFunction):
    name = "returns_nan"

    def __call__(self, prompts, responses, **columns):
        return [0.0, float("nan")]


class TakesNoColumns(RewardFunction):
    name = "old_style"

    def __call__(self, prompts, responses):
        return [0.0 for _ in responses]


def test_score_refuses_what_a_rule_gets_wrong():
    with pytest.raises(AlignError, match="'miscounts' returned 1 scores for 2 responses"):
        Miscounts().score(["q", "q"], ["a", "b"])
    with pytest.raises(AlignError, match="'returns_nan' returned nan for response 1: 'b'"):
        ReturnsNaN().score(["q", "q"], ["a", "b"])
    with pytest.raises(AlignError, match="'old_style' does not accept the prompt rows' columns"):
        TakesNoColumns().score(["q"], ["a"], {"answer": ["1"]})
    assert TakesNoColumns().score(["q"], ["a"]) == [0.0]


# The demo math task: files as the generator writes them, with their answers, and held-out pairs held out.


def _pairs(texts: list[str]) -> set[tuple[int, ...]]:
    return {tuple(int(n) for n in re.findall(r"\d+", text)) for text in texts}


def test_demo_math_prompts_load_with_their_answers():
    from align.prepare import load_prompts

    pm = get_plugin_manager()
    for name, rows in (("demo_math_prompts", 200), ("demo_math_test", 120)):
        prompts = load_prompts(name, pm)
        assert len(prompts) == rows
        for prompt in prompts:
            (message,) = prompt.messages
            a, b = _pairs([message["content"]]).pop()
            assert prompt.columns["answer"] == str(a + b)
        responses = [f"Answer: {p.columns['answer']}" for p in prompts]
        texts = [p.messages[0]["content"] for p in prompts]
        answers = [p.columns["answer"] for p in prompts]
        assert ExactAnswer().score(texts, responses, {"answer": answers}) == [1.0] * rows


def test_demo_math_held_out_pairs_are_in_no_training_file():
    sft = json.loads((DATASETS / "demo_math_sft.json").read_text())
    rl = [json.loads(line) for line in (DATASETS / "demo_math_prompts.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (DATASETS / "demo_math_test.jsonl").read_text().splitlines()]
    sft_pairs = _pairs([row["instruction"] for row in sft])
    rl_pairs = _pairs([row["messages"][0]["content"] for row in rl])
    test_pairs = _pairs([row["messages"][0]["content"] for row in test])
    assert len(test_pairs) == 40 and len(rl_pairs) == 40
    assert not test_pairs & (sft_pairs | rl_pairs)
    assert not rl_pairs & sft_pairs
    assert test_pairs == {(b, a) for a, b in rl_pairs}  # what RL teaches about a + b shows on b + a
    for row in sft:
        (pair,) = _pairs([row["instruction"]])
        assert row["output"] == f"Answer: {sum(pair)}"


def test_demo_data_generator_rewrites_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "datasets").mkdir()
    monkeypatch.chdir(tmp_path)
    module.main()
    written = sorted(p.name for p in (tmp_path / "datasets").iterdir())
    assert "demo_math_test.jsonl" in written and "demo_sft.json" in written
    for name in written:
        assert (tmp_path / "datasets" / name).read_bytes() == (DATASETS / name).read_bytes(), name
