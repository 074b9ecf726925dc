"""Rendering conversations into token ids and loss masks with the tokenizer's chat template.

The loss covers every assistant turn and nothing else, for any chat template: a turn's span is found
by rendering the conversation up to the turn (with the generation prompt) and up to its end, and the
tokens whose text falls in a span are trained on. Rows are rendered as text and tokenized in batches by
the fast tokenizer, which is what makes this quicker than tokenizing row by row. A row where a token would
hold both a reply's edge and the text beside it (a template's markers that are no tokens of this
tokenizer) is tokenized again piece by piece, so that the masks stay exact.

Conversations longer than ``max_length`` lose their oldest exchanges first; one whose last exchange
alone is too long is dropped. Both are counted, by reason, in a :class:`RenderReport`.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align.chat_template import ChatTemplate
from align.conversation import Example
from align.errors import AlignError

__all__ = ["IGNORE", "RenderReport", "Renderer", "padding_waste"]

IGNORE = -100  # the label of a token that carries no loss (transformers' convention)
BATCH = 512


@dataclass
class RenderReport:
    """What rendering did to a dataset's rows."""

    name: str
    rows: int = 0
    kept: int = 0
    tokens: int = 0  #: tokens of the kept rows
    trained_tokens: int = 0  #: of which carry loss
    history_truncated: int = 0  #: rows that lost their oldest exchanges to fit max_length
    dropped: Counter[str] = field(default_factory=Counter)
    #: tool calls the chat template left out of the text, and the rows they were in (refused: see ``check``)
    lost_tool_calls: int = 0
    rows_losing_tool_calls: int = 0

    def count_lost_tool_calls(self, lost: int) -> None:
        self.lost_tool_calls += lost
        self.rows_losing_tool_calls += bool(lost)

    def check(self) -> None:
        """Refuse what must not be trained on: tool calls rendered as nothing."""
        if self.lost_tool_calls:
            raise AlignError(
                f"dataset '{self.name}': the chat template leaves out {self.lost_tool_calls} tool calls in "
                f"{self.rows_losing_tool_calls} rows, so those turns would be trained on as empty or partial text",
                hint="give the stage a `chat_template:` that renders tool calls (a registered one, see `align "
                "plugins`, or a .jinja file, e.g. a tool-capable model's template), or drop the tool-call rows",
            )

    def describe(self) -> str:
        text = f"{self.name}: rendered {self.kept} of {self.rows} rows"
        text += f", {self.tokens} tokens ({self.trained_tokens} trained)"
        if self.history_truncated:
            text += f", {self.history_truncated} with history cut to fit"
        if self.dropped:
            text += ", dropped " + ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        return text


class Renderer:
    """Turns :class:`Example` rows into ``input_ids`` and ``labels`` (SFT) or preference pairs."""

    def __init__(self, tokenizer: Any, max_length: int, chat_template: str | ChatTemplate | None = None) -> None:
        """:param chat_template: replaces the tokenizer's: a :class:`ChatTemplate` (see
        :func:`~align.chat_template.resolve_chat_template`) or the Jinja text."""
        if isinstance(chat_template, str):
            chat_template = ChatTemplate("given", chat_template, "given as text") if chat_template else None
        #: what ends a reply, where it is not the tokenizer's end-of-sequence token
        self.stop = chat_template.install(tokenizer) if chat_template else None
        if not getattr(tokenizer, "chat_template", None):
            raise AlignError(
                "the tokenizer has no chat template",
                hint="give the stage a `chat_template:` (a registered name, a Jinja file or the template itself), "
                "or use an instruct model",
            )
        if not getattr(tokenizer, "is_fast", False):
            raise AlignError("align needs a fast (Rust) tokenizer to find assistant turns; this one is slow")
        self.tokenizer, self.max_length = tokenizer, max_length

    # ------------------------------------------------------------------ text
    def text(self, messages: Sequence[dict[str, Any]], tools: Any = None, generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as error:  # the template's own raise_exception(...), or a mistake in it
            raise AlignError(
                f"the chat template cannot render a conversation: {error}",
                hint="give the stage a `chat_template:` that renders these roles, or fix the data",
            ) from None

    def text_and_spans(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        messages, tools = example.messages, example.tools
        full = self.text(messages, tools)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.text(messages[:index], tools, generation_prompt=True)
            end = full if index == len(messages) - 1 else self.text(messages[: index + 1], tools)
            if not (full.startswith(end) and end.startswith(start)):
                raise AlignError(
                    "the chat template renders a conversation's beginning differently from the whole "
                    "conversation, so assistant turns cannot be located",
                    hint="give the stage a `chat_template:` that renders earlier turns unchanged",
                )
            spans.append((len(start), self._end_of_reply(full, len(start), len(end))))
        return full, spans

    def _end_of_reply(self, text: str, start: int, end: int) -> int:
        """Where a reply ends: just after its end-of-sequence token (or the template's end of a reply),
        leaving the template's separator."""
        eos = self.stop or self.tokenizer.eos_token
        found = text.rfind(eos, start, end) if eos else -1
        return found + len(eos) if found >= 0 else end

    def prompt_ids(self, messages: Sequence[dict[str, Any]], tools: Any = None) -> list[int]:
        """Token ids of a prompt, ending with the template's cue for the assistant's reply."""
        text = self.text(messages, tools, generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ SFT
    def sft(self, examples: Sequence[Example], name: str) -> tuple[dict[str, list[Any]], RenderReport]:
        """``{"input_ids", "labels"}`` for each example that fits, and the report."""
        report = RenderReport(name, rows=len(examples))
        out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        for begin in range(0, len(examples), BATCH):
            batch = examples[begin : begin + BATCH]
            rendered = [self.text_and_spans(e) for e in batch]
            for example, (text, spans) in zip(batch, rendered, strict=True):
                replies = [m for m in example.messages if m["role"] == "assistant"]
                report.count_lost_tool_calls(
                    sum(lost_tool_calls([m], text[start:end]) for m, (start, end) in zip(replies, spans, strict=True))
                )
            encoded = self.tokenizer(
                [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
            )
            for example, (text, spans), ids, offsets in zip(
                batch, rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
            ):
                if _straddles(offsets, spans):
                    ids, offsets = self._encode_apart(text, spans)
                if len(ids) > self.max_length:
                    fitted = self._fit(example, report)
                    if fitted is None:
                        continue
                    ids, labels = fitted
                else:
                    labels = _labels(ids, offsets, spans)
                self._keep(out, ids, labels, report)
        report.check()
        return out, report

    def _keep(self, out: dict[str, list[Any]], ids: list[int], labels: list[int], report: RenderReport) -> None:
        trained = sum(1 for label in labels if label != IGNORE)
        if trained == 0:
            report.dropped["no_trained_tokens"] += 1
            return
        out["input_ids"].append(list(ids))
        out["labels"].append(labels)
        report.kept += 1
        report.tokens += len(ids)
        report.trained_tokens += trained

    def _fit(self, example: Example, report: RenderReport) -> tuple[list[int], list[int]] | None:
        """Cut the oldest exchanges until the conversation fits; None (and counted) if it never does."""
        messages = list(example.messages)
        system = messages[:1] if messages[0]["role"] == "system" else []
        dialogue = messages[len(system) :]
        while True:
            users = [i for i, m in enumerate(dialogue) if m["role"] == "user"]
            if len(users) < 2:
                report.dropped["too_long"] += 1
                return None
            dialogue = dialogue[users[1] :]
            shorter = Example(system + dialogue, tools=example.tools)
            text, spans = self.text_and_spans(shorter)
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            if _straddles(offsets, spans):
                ids, offsets = self._encode_apart(text, spans)
            if len(ids) <= self.max_length:
                report.history_truncated += 1
                return ids, _labels(ids, offsets, spans)

    def _encode_apart(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """``text`` tokenized piece by piece, cut at the replies' edges, so that no token holds both a
        reply's text and the text around it. Needed where a template's markers are not tokens of this
        tokenizer: ``<|eot_id|><|start_header_id|>`` then tokenizes with ``|><|`` as one token."""
        cuts = sorted({0, len(text), *(edge for span in spans for edge in span)})
        pieces = [(begin, end) for begin, end in zip(cuts, cuts[1:], strict=False) if end > begin]
        encoded = self.tokenizer(
            [text[begin:end] for begin, end in pieces], add_special_tokens=False, return_offsets_mapping=True
        )
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for (begin, _), piece_ids, piece_offsets in zip(
            pieces, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            ids += piece_ids
            offsets += [(begin + start, begin + end) for start, end in piece_offsets]
        return ids, offsets

    # ------------------------------------------------------------------ preference and feedback
    def preference(self, examples: Sequence[Example], name: str) -> tuple[dict[str, list[Any]], RenderReport]:
        """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (replies only) per pair."""
        report = RenderReport(name, rows=len(examples))
        out: dict[str, list[Any]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        for example in examples:
            assert example.chosen is not None and example.rejected is not None  # Example.validate
            rendered = self._prompt_and_replies(example.messages, [example.chosen, example.rejected], example, report)
            if rendered is None:
                continue
            prompt, (chosen, rejected) = rendered
            out["prompt_ids"].append(prompt)
            out["chosen_ids"].append(chosen)
            out["rejected_ids"].append(rejected)
            report.tokens += len(prompt) * 2 + len(chosen) + len(rejected)
            report.trained_tokens += len(chosen) + len(rejected)
        report.check()
        return out, report

    def feedback(self, examples: Sequence[Example], name: str) -> tuple[dict[str, list[Any]], RenderReport]:
        """``prompt_ids``, ``completion_ids`` (the final reply) and ``label`` (desirable or not) per row."""
        report = RenderReport(name, rows=len(examples))
        out: dict[str, list[Any]] = {"prompt_ids": [], "completion_ids": [], "label": []}
        for example in examples:
            rendered = self._prompt_and_replies(example.messages[:-1], [example.messages[-1]], example, report)
            if rendered is None:
                continue
            prompt, (completion,) = rendered
            out["prompt_ids"].append(prompt)
            out["completion_ids"].append(completion)
            out["label"].append(bool(example.label))
            report.tokens += len(prompt) + len(completion)
            report.trained_tokens += len(completion)
        report.check()
        return out, report

    def _prompt_and_replies(
        self,
        prompt: Sequence[dict[str, Any]],
        replies: Sequence[dict[str, Any]],
        example: Example,
        report: RenderReport,
    ) -> tuple[list[int], list[list[int]]] | None:
        """The prompt's ids and each reply's, history cut to fit max_length; None (and counted) if it never fits."""
        messages = list(prompt)
        system = messages[:1] if messages[0]["role"] == "system" else []
        dialogue = messages[len(system) :]
        truncated = False
        while True:
            prompt_messages = system + dialogue
            prompt_text = self.text(prompt_messages, example.tools, generation_prompt=True)
            prompt_ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            reply_ids, lost_in_replies = [], 0
            for reply in replies:
                full = self.text([*prompt_messages, reply], example.tools)
                if not full.startswith(prompt_text):
                    raise AlignError("the chat template renders a reply's prompt differently from the prompt alone")
                end = self._end_of_reply(full, len(prompt_text), len(full))
                lost_in_replies += lost_tool_calls([reply], full[len(prompt_text) : end])
                reply_ids.append(self.tokenizer(full[len(prompt_text) : end], add_special_tokens=False)["input_ids"])
            if len(prompt_ids) + max(len(r) for r in reply_ids) <= self.max_length:
                break
            users = [i for i, m in enumerate(dialogue) if m["role"] == "user"]
            if len(users) < 2:
                report.dropped["too_long"] += 1
                return None
            dialogue, truncated = dialogue[users[1] :], True
        report.count_lost_tool_calls(lost_tool_calls(prompt_messages, prompt_text) + lost_in_replies)
        if not all(reply_ids):
            report.dropped["no_trained_tokens"] += 1
            return None
        report.kept += 1
        report.history_truncated += truncated
        return prompt_ids, reply_ids

    # ------------------------------------------------------------------ prompts
    def prompts(self, examples: Sequence[Example], name: str) -> tuple[dict[str, list[Any]], RenderReport]:
        """``prompt_ids`` (ending with the cue for the reply) and the row's other ``columns``, per prompt."""
        report = RenderReport(name, rows=len(examples))
        out: dict[str, list[Any]] = {"prompt_ids": [], "columns": []}
        for example in examples:
            text = self.text(example.messages, example.tools, generation_prompt=True)
            report.count_lost_tool_calls(lost_tool_calls(example.messages, text))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_length:
                report.dropped["too_long"] += 1
                continue
            out["prompt_ids"].append(ids)
            out["columns"].append(dict(example.columns))
            report.kept += 1
            report.tokens += len(ids)
        report.check()
        return out, report


def _labels(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    import numpy as np  # here, not at the top: plugins import this module and `align plugins` must start fast

    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    keep = np.zeros(len(ids), dtype=bool)
    for begin, end in spans:
        keep |= (starts >= begin) & (starts < end)
    return np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def _straddles(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> bool:
    """Whether a token begins on one side of a reply's edge and ends on the other."""
    for edge in (edge for span in spans for edge in span):
        before = bisect.bisect_left(offsets, edge, key=lambda offset: offset[0])  # tokens that begin before it
        if before and offsets[before - 1][1] > edge:  # offsets are in order: the last of them reaches furthest
            return True
    return False


def padding_waste(lengths: Sequence[int], batch_size: int) -> float:
    """Share of a padded batch that is padding, batching ``lengths`` in order ``batch_size`` at a time."""
    if not lengths:
        return 0.0
    padded = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
    return 1.0 - sum(lengths) / padded


def lost_tool_calls(messages: Sequence[dict[str, Any]], text: str) -> int:
    """How many of ``messages``' tool calls ``text``, their rendering, does not show (by function name)."""
    lost = 0
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            if function.get("name") and function["name"] not in text:
                lost += 1
    return lost
