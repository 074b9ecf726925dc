"""Built-in reward functions: rules that score a response without a reward model.

``sentiment`` is the ground truth of align's controlled-sentiment demo (see datasets/README.md): a
response's share of positive sentiment words among all its sentiment words, from -1 (all negative) to 1
(all positive), 0 when it has none. Because it is a rule, it measures whether alignment helped without
trusting a learned reward model.

``exact_answer`` is the verifiable reward of tasks with one right answer, such as the demo arithmetic
task (``demo_math_*``): 1 when the response's final answer equals the prompt row's ``answer`` column,
else 0. ``format`` is 1 when the response matches a regular expression (by default, when it ends with a
line ``Answer: …``), a small shaping reward to add to ``exact_answer`` with a lower weight.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from align import AlignError, hookimpl
from align.reward import RewardFunction
from align.schema import setting

POSITIVE = frozenset(
    """wonderful great excellent delightful brilliant lovely fantastic enjoyable amazing good nice beautiful
    pleasant superb perfect""".split()
)
NEGATIVE = frozenset(
    """terrible awful boring dull poor horrible disappointing bad ugly worst mediocre dreadful weak""".split()
)
_WORD = re.compile(r"[a-z]+")


class Sentiment(RewardFunction):
    """(positive words - negative words) / sentiment words of the response, in [-1, 1]."""

    name = "sentiment"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        return [sentiment(text) for text in responses]


def sentiment(text: str) -> float:
    words = _WORD.findall(text.lower())
    positive = sum(word in POSITIVE for word in words)
    negative = sum(word in NEGATIVE for word in words)
    return (positive - negative) / (positive + negative) if positive + negative else 0.0


# A minus sign only where it cannot be a subtraction ("7-5" ends in the number 5, not -5); thousands
# separated by commas; a decimal part; a fraction.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_BOXED = "\\boxed{"


@dataclass
class ExactAnswerConfig:
    column: str = setting("answer", help="The prompt rows' column holding the right answer.")
    marker: str = setting(
        "Answer:",
        help="The final answer is the rest of the line after the last occurrence of this (any case); "
        "without it, the last \\boxed{…}, else the last number. An empty marker skips this rule.",
    )


class ExactAnswer(RewardFunction):
    """1.0 when the response's final answer equals the row's answer (numbers compared as numbers), else 0.0."""

    name = "exact_answer"
    Config = ExactAnswerConfig
    config: ExactAnswerConfig = ExactAnswerConfig()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        column = self.config.column
        if column not in columns:
            present = ", ".join(sorted(columns)) or "none"
            raise AlignError(
                f"reward function '{self.name}' needs the prompt rows' column '{column}'; "
                f"the rows have these columns: {present}",
                hint=f"give each prompt row its right answer in an `{column}` column (as demo_math_prompts "
                "does), or name the column holding it with `options: {column: ...}`",
            )
        answers = columns[column]
        scores = []
        for index, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            if answer is None:
                raise AlignError(
                    f"reward function '{self.name}': prompt row {index} has no value in its column '{column}'",
                    hint="every prompt scored by exact_answer needs its right answer",
                )
            given = final_answer(response, self.config.marker)
            scores.append(1.0 if given is not None and same_answer(given, str(answer)) else 0.0)
        return scores


def final_answer(response: str, marker: str = "Answer:") -> str | None:
    """The answer a response gives: the rest of the line after the last ``marker``, else the contents of the
    last ``\\boxed{…}``, else the last number; ``None`` when it gives none.

    A response that writes the marker commits to what follows it, even to nothing: falling back to the
    last number there would credit "12 Answer: I don't know".
    """
    if marker:
        found = [m.end() for m in re.finditer(re.escape(marker), response, re.IGNORECASE)]
        if found:
            answer = response[found[-1] :].split("\n", 1)[0].strip()
            return answer or None
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    return None if start < 0 else _boxed_at(text, start)


def _boxed_at(text: str, start: int) -> str | None:
    depth = 1
    for position in range(start + len(_BOXED), len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start + len(_BOXED) : position].strip()
    return None  # unclosed: no boxed answer rather than a guess at where it ends


def same_answer(given: str, expected: str) -> bool:
    """Whether two answers are the same after normalisation: numbers by value ("1,000.0" is "1000",
    "1/2" is "0.5"), text ignoring case, surrounding ``$`` and spaces and a final period."""
    given, expected = normalise_answer(given), normalise_answer(expected)
    a, b = _as_number(given), _as_number(expected)
    if a is not None and b is not None:
        return a == b
    return given.casefold() == expected.casefold()


def normalise_answer(text: str) -> str:
    text = text.strip().removesuffix(".").strip().strip("$").strip().removesuffix(".").strip()
    if text.startswith(_BOXED):  # the line after a marker may box its answer too
        text = _boxed_at(text, 0) or text
    text = _LATEX_FRACTION.sub(r"\1/\2", text)
    if _GROUPED.fullmatch(text):
        text = text.replace(",", "")
    return " ".join(text.split())


def _as_number(text: str) -> Fraction | None:
    # Fraction reads integers, decimals and "a/b" exactly, so 0.1 + 0.2 style float error never decides.
    try:
        return Fraction(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


@dataclass
class FormatConfig:
    pattern: str = setting(
        r"(?m)^Answer:[ \t]*\S.*\s*\Z",
        help="A Python regular expression, found anywhere in the response (re.search, no flags: write "
        "(?m), (?s) or (?i) in it). The default asks for a last line `Answer: <something>`.",
    )

    def __post_init__(self) -> None:
        # A typo in a recipe's pattern should stop the run before training, not score every response 0.
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise AlignError(
                f"reward function 'format': pattern {self.pattern!r} is not a valid regular expression ({error})",
                hint="check its brackets and escapes; in YAML, a single-quoted string keeps backslashes as written",
            ) from None


class Format(RewardFunction):
    """1.0 when re.search finds the pattern in the response, else 0.0."""

    name = "format"
    Config = FormatConfig
    config: FormatConfig = FormatConfig()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        pattern = re.compile(self.config.pattern)
        return [1.0 if pattern.search(text) else 0.0 for text in responses]


@hookimpl
def align_register_reward_functions() -> list[RewardFunction]:
    return [Sentiment(), ExactAnswer(), Format()]
