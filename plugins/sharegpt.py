"""The ``sharegpt`` dataset format: a list of turns tagged ``from``/``value`` (or ``role``/``content``).

Roles follow LLaMA-Factory's ``tags``: ``human``, ``gpt``, ``system``, ``observation`` (a tool result)
and ``function_call`` (the assistant calling a tool, given as JSON ``{"name", "arguments"}``). A
``tools`` column holds the tool descriptions as a JSON string or list. A ranking dataset ends its
conversation on a user turn and has ``chosen`` and ``rejected`` assistant turns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from align import hookimpl
from align.conversation import BadRow, Example, require_list, require_str
from align.dataformat import DatasetFormat

# A file whose turns use role/content keys gets these tags unless its entry says otherwise.
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "function_call",
}


class ShareGPT(DatasetFormat):
    name = "sharegpt"
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "tools": "tools"}
    tags = {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "system_tag": "system",
        "observation_tag": "observation",
        "function_tag": "function_call",
    }

    def detect(self, row: Mapping[str, Any]) -> bool:
        return "conversations" in row

    def convert(
        self, row: Mapping[str, Any], columns: Mapping[str, str], tags: Mapping[str, str], ranking: bool
    ) -> Example:
        turns = require_list(row, columns["messages"])
        if turns and isinstance(turns[0], dict) and tags["role_tag"] not in turns[0] and "role" in turns[0]:
            tags = {**tags, **OPENAI_TAGS}
        roles = {
            tags["user_tag"]: "user",
            tags["assistant_tag"]: "assistant",
            tags["system_tag"]: "system",
            tags["observation_tag"]: "tool",
            tags["function_tag"]: "function_call",
        }
        messages = [self._turn(turn, index, tags, roles) for index, turn in enumerate(turns)]
        if columns.get("system") and row.get(columns["system"]):
            if messages and messages[0]["role"] == "system":
                raise BadRow("turn_order", "the row has both a system column and a system turn")
            messages.insert(0, {"role": "system", "content": require_str(row, columns["system"])})
        example = Example(messages, tools=_tools(row, columns.get("tools")))
        if ranking:
            example.chosen = self._turn(_reply(row, columns["chosen"]), "chosen", tags, roles)
            example.rejected = self._turn(_reply(row, columns["rejected"]), "rejected", tags, roles)
        return example

    def _turn(self, turn: Any, index: int | str, tags: Mapping[str, str], roles: Mapping[str, str]) -> dict[str, Any]:
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"turn {index} must be an object, got {type(turn).__name__}")
        tag = turn.get(tags["role_tag"])
        if tag is None:
            raise BadRow("missing_column", f"turn {index} has no '{tags['role_tag']}' key")
        if tag not in roles:
            known = ", ".join(repr(t) for t in roles)
            raise BadRow("unknown_role", f"turn {index} has the role {tag!r}; this dataset's roles are {known}")
        content = turn.get(tags["content_tag"])
        if not isinstance(content, str):
            kind = "missing" if content is None else f"of type {type(content).__name__}"
            raise BadRow("wrong_type", f"turn {index} ({tag}): its '{tags['content_tag']}' is {kind}, not a string")
        role = roles[tag]
        if role == "function_call":
            return {"role": "assistant", "content": "", "tool_calls": _tool_calls(content, index)}
        return {"role": role, "content": content}


def _reply(row: Mapping[str, Any], column: str) -> Any:
    if column not in row or row[column] is None:
        raise BadRow("missing_column", f"the column '{column}' is missing")
    return row[column]


def _tool_calls(text: str, index: int | str) -> list[dict[str, Any]]:
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        raise BadRow("wrong_type", f"turn {index} (function_call) is not JSON") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise BadRow("wrong_type", f'turn {index} (function_call) must be {{"name": ..., "arguments": ...}}')
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def _tools(row: Mapping[str, Any], column: str | None) -> list[dict[str, Any]] | None:
    value = row.get(column) if column else None
    if value in (None, "", "[]", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow("wrong_type", f"the column '{column}' is not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRow("wrong_type", f"the column '{column}' must be a list of tool descriptions")
    # transformers' chat templates expect OpenAI's {"type": "function", "function": {...}} wrapping.
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in value] or None


@hookimpl
def align_register_dataset_formats() -> list[DatasetFormat]:
    return [ShareGPT()]
