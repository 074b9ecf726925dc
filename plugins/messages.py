"""The ``messages`` dataset format: OpenAI-style ``{"role", "content"}`` turns, as TRL uses them.

SFT rows have a ``messages`` list. Preference rows have either ``prompt`` (turns) with ``chosen`` and
``rejected`` replies (a string, a message, or a list of messages), or ``chosen`` and ``rejected`` as two
whole conversations that share everything but their last assistant turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from align import hookimpl
from align.conversation import BadRow, Example, require_list
from align.dataformat import DatasetFormat


class Messages(DatasetFormat):
    name = "messages"
    columns = {"messages": "messages", "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}

    def detect(self, row: Mapping[str, Any]) -> bool:
        if "messages" in row:
            return True
        return isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)

    def convert(
        self, row: Mapping[str, Any], columns: Mapping[str, str], tags: Mapping[str, str], ranking: bool
    ) -> Example:
        ranking = ranking or (columns["messages"] not in row and columns["chosen"] in row)
        if not ranking:
            return Example(_turns(require_list(row, columns["messages"]), "messages"))
        if columns["prompt"] in row:
            prompt = row[columns["prompt"]]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turns(prompt, "prompt")
            return Example(messages, chosen=_reply(row, columns["chosen"]), rejected=_reply(row, columns["rejected"]))
        chosen = _turns(require_list(row, columns["chosen"]), "chosen")
        rejected = _turns(require_list(row, columns["rejected"]), "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise BadRow("preference_mismatch", "chosen and rejected differ before their last turn")
        return Example(chosen[:-1], chosen=chosen[-1], rejected=rejected[-1])


def _turns(value: Any, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"the column '{column}' must be a list of turns, got {type(value).__name__}")
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn:
            raise BadRow("wrong_type", f"{column} turn {index} must be an object with 'role' and 'content'")
        turns.append(dict(turn))
    return turns


def _reply(row: Mapping[str, Any], column: str) -> dict[str, Any]:
    value = row.get(column)
    if value is None:
        raise BadRow("missing_column", f"the column '{column}' is missing")
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise BadRow("wrong_type", f"the column '{column}' must be a reply (a string or one assistant message)")
    return dict(value)


@hookimpl
def align_register_dataset_formats() -> list[DatasetFormat]:
    return [Messages()]
