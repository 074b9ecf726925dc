"""The canonical example every dataset format converts to, and the rules it must obey.

An :class:`Example` is a conversation in OpenAI/TRL form: a list of ``{"role", "content"}`` messages
with roles ``system``, ``user``, ``assistant`` and ``tool`` (assistant messages may carry
``tool_calls``). A preference example holds the shared prompt in ``messages`` and one assistant reply in
each of ``chosen`` and ``rejected``. Format plugins raise :class:`BadRow` for a row they cannot convert;
the loader turns it into an error naming file and row, or skips and counts the row by its reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ROLES", "BadRow", "Example", "require_list", "require_str"]

ROLES = ("system", "user", "assistant", "tool")


class BadRow(Exception):
    """A row that cannot become an :class:`Example`.

    :param reason: a short, stable key used to count skipped rows (``missing_column``, ``empty_turn``…).
    :param detail: what exactly is wrong, for the error message.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Example:
    """One conversation (SFT), one prompt with a chosen and a rejected reply (preference), or one
    conversation whose final reply is marked desirable or not (``label``, unpaired feedback)."""

    messages: list[dict[str, Any]]
    chosen: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    label: bool | None = None  #: unpaired feedback (KTO): whether the final reply is desirable
    columns: dict[str, Any] = field(default_factory=dict)  #: the row's other columns (a reference answer…)

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None

    @property
    def prompt(self) -> list[dict[str, Any]]:
        """What a policy is asked: the conversation up to its final assistant turn (or all of a prompt)."""
        if not self.is_preference and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    def validate(self, allow_prompt: bool = False) -> Example:
        """Check the conversation's shape; raises :class:`BadRow` with the first problem found.

        :param allow_prompt: accept a conversation that ends on a user turn with no reply (a prompt).
        """
        if not self.messages:
            raise BadRow("empty_conversation", "the conversation has no turns")
        for index, message in enumerate([*self.messages, *self._replies()]):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise BadRow("unknown_role", f"turn {index} has the role {role!r}; known roles: {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise BadRow("wrong_type", f"turn {index} ({role}) has content of type {type(content).__name__}")
            if not content.strip() and not message.get("tool_calls"):
                raise BadRow("empty_turn", f"turn {index} ({role}) is empty")
        if any(m["role"] == "system" for m in self.messages[1:]):
            raise BadRow("turn_order", "a system message may only come first")
        dialogue = [m for m in self.messages if m["role"] != "system"]
        turns = [m["role"] for m in dialogue]
        if not turns or turns[0] != "user":
            raise BadRow("turn_order", "the conversation must start with a user turn (after an optional system)")
        for previous, current in zip(dialogue, dialogue[1:], strict=False):
            pair = (previous["role"], current["role"])
            # The rule of ShareGPT data (LLaMA-Factory's): user and tool turns alternate with assistant turns.
            # An assistant turn may announce a tool call in plain text, so a tool result needs no tool_calls.
            if pair in (
                ("user", "user"),
                ("user", "tool"),
                ("tool", "user"),
                ("tool", "tool"),
                ("assistant", "assistant"),
            ):
                raise BadRow("turn_order", f"{_a(pair[1])} turn follows {_a(pair[0])} turn")
        if self.is_preference:
            if self.rejected is None:
                raise BadRow("missing_column", "the row has a chosen reply but no rejected one")
            if turns[-1] == "assistant":
                raise BadRow("turn_order", "a preference prompt must end with a user (or tool) turn")
            for name, reply in (("chosen", self.chosen), ("rejected", self.rejected)):
                if reply is not None and reply.get("role") != "assistant":
                    raise BadRow("turn_order", f"the {name} reply must be an assistant turn")
        elif allow_prompt and turns[-1] in ("user", "tool"):
            return self
        elif "assistant" not in turns:
            raise BadRow("no_assistant_turn", "the conversation has no assistant turn, so there is nothing to learn")
        elif turns[-1] != "assistant":
            raise BadRow("turn_order", "the conversation must end with an assistant turn")
        return self

    def _replies(self) -> list[dict[str, Any]]:
        return [r for r in (self.chosen, self.rejected) if r is not None]


def _a(role: str) -> str:
    return "an assistant" if role == "assistant" else f"a {role}"


def require_str(row: Mapping[str, Any], column: str, *, optional: bool = False) -> str:
    """A string column's value; raises :class:`BadRow` naming the column when missing or mistyped."""
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise BadRow("missing_column", f"the column '{column}' is missing")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"the column '{column}' must be a string, got {type(value).__name__}")
    return value


def require_list(row: Mapping[str, Any], column: str) -> Sequence[Any]:
    value = row.get(column)
    if value is None:
        raise BadRow("missing_column", f"the column '{column}' is missing")
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"the column '{column}' must be a list, got {type(value).__name__}")
    return value
