"""Data kinds: the shapes of data stages train on, and how rows of one kind become another.

Every dataset format converts a file's rows into :class:`~align.conversation.Example` objects; a data
kind says which of them a stage can train on and how they become token ids. A stage names the kind it
takes (``data_kind``), and :func:`align.prepare.prepare` hands it rows of that kind: rows of the kind as
they are, rows of another kind converted when the kind knows how (each preference pair gives one
desirable and one undesirable reply for ``feedback``), and an error naming the dataset otherwise.

The kinds of the contract, registered here (this module is a core plugin, like the runner):

============== ================================================= =======================================
kind           a row is                                          rendered columns
============== ================================================= =======================================
conversations  a conversation ending with an assistant turn       ``input_ids``, ``labels``
preferences    a prompt, a chosen and a rejected reply            ``prompt_ids``, ``chosen_ids``,
                                                                  ``rejected_ids``
feedback       a prompt and one reply marked desirable or not     ``prompt_ids``, ``completion_ids``,
               (KTO; LLaMA-Factory's ``kto_tag`` column)          ``label``
prompts        a conversation awaiting its reply, with the row's  ``prompt_ids``, ``columns``
               other columns (a reference answer, say)
============== ================================================= =======================================

A plugin adds a kind by registering a :class:`DataKind` with ``align_register_data_kinds``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from align import hookimpl
from align.conversation import Example
from align.render import Renderer, RenderReport

__all__ = ["CONVERSATIONS", "FEEDBACK", "PREFERENCES", "PROMPTS", "DataKind", "kind_of"]

CONVERSATIONS, PREFERENCES, FEEDBACK, PROMPTS = "conversations", "preferences", "feedback", "prompts"

Rendered = tuple[dict[str, list[Any]], RenderReport]


class DataKind:
    """Base class for data-kind plugins (registered with ``align_register_data_kinds``).

    * ``name``: what a stage's ``data_kind`` and a format's ``kinds`` say.
    * ``help``: one line for ``align plugins`` and error messages.
    * ``prompt_rows``: rows may end on a user turn, without a reply (prompts for generation).
    """

    name: ClassVar[str]
    help: ClassVar[str] = ""
    prompt_rows: ClassVar[bool] = False

    def holds(self, example: Example) -> bool:
        """Whether ``example`` is already of this kind."""
        raise NotImplementedError

    def convert(self, example: Example) -> list[Example] | None:
        """Rows of this kind made from ``example``, a row of another kind; ``None`` when it cannot be done."""
        return None

    def render(self, renderer: Renderer, examples: Sequence[Example], name: str) -> Rendered:
        """Token-id columns (one list entry per kept row) and a report of what rendering kept and dropped."""
        raise NotImplementedError


def kind_of(example: Example, kinds: Mapping[str, DataKind]) -> str:
    """The name of the first kind that holds ``example`` (``"unknown"`` if none does)."""
    return next((name for name, kind in kinds.items() if kind.holds(example)), "unknown")


def _ends_with_reply(example: Example) -> bool:
    return example.messages[-1]["role"] == "assistant"


class Conversations(DataKind):
    name = CONVERSATIONS
    help = "conversations ending with an assistant turn (SFT); every assistant turn is trained on"

    def holds(self, example: Example) -> bool:
        return not example.is_preference and example.label is None and _ends_with_reply(example)

    def render(self, renderer: Renderer, examples: Sequence[Example], name: str) -> Rendered:
        return renderer.sft(examples, name)


class Preferences(DataKind):
    name = PREFERENCES
    help = "a prompt with a chosen and a rejected reply (reward models, DPO, ORPO, SimPO)"

    def holds(self, example: Example) -> bool:
        return example.is_preference

    def render(self, renderer: Renderer, examples: Sequence[Example], name: str) -> Rendered:
        return renderer.preference(examples, name)


class Feedback(DataKind):
    name = FEEDBACK
    help = "a prompt with one reply marked desirable or not (KTO); preference pairs give one of each"

    def holds(self, example: Example) -> bool:
        return example.label is not None and not example.is_preference

    def convert(self, example: Example) -> list[Example] | None:
        if not example.is_preference:
            return None
        return [
            Example([*example.messages, reply], tools=example.tools, label=label, columns=example.columns)
            for reply, label in ((example.chosen, True), (example.rejected, False))
            if reply is not None
        ]

    def render(self, renderer: Renderer, examples: Sequence[Example], name: str) -> Rendered:
        return renderer.feedback(examples, name)


class Prompts(DataKind):
    name = PROMPTS
    help = "prompts awaiting a reply, with the row's other columns (online RL, scoring, evaluation)"
    prompt_rows = True

    def holds(self, example: Example) -> bool:
        return not example.is_preference and example.label is None and not _ends_with_reply(example)

    def convert(self, example: Example) -> list[Example] | None:
        return [Example(list(example.prompt), tools=example.tools, columns=example.columns)]

    def render(self, renderer: Renderer, examples: Sequence[Example], name: str) -> Rendered:
        return renderer.prompts(examples, name)


@hookimpl
def align_register_data_kinds() -> list[DataKind]:
    return [Conversations(), Preferences(), Feedback(), Prompts()]
