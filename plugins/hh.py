"""The ``hh`` dataset format: Anthropic HH-RLHF transcripts (``\\n\\nHuman: …\\n\\nAssistant: …``).

Each row has ``chosen`` and ``rejected`` transcripts that share every turn but the last assistant reply.
Rows where they part earlier (a handful in the real data) cannot be a prompt with two replies: they are
bad rows (``preference_mismatch``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from align import hookimpl
from align.conversation import BadRow, Example, require_str
from align.dataformat import DatasetFormat

_MARKER = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class HH(DatasetFormat):
    name = "hh"
    kinds = ("preferences", "feedback", "prompts")
    columns = {"chosen": "chosen", "rejected": "rejected"}

    def detect(self, row: Mapping[str, Any]) -> bool:
        chosen = row.get("chosen")
        return isinstance(chosen, str) and chosen.lstrip(" ").startswith("\n\nHuman:")

    def convert(
        self, row: Mapping[str, Any], columns: Mapping[str, str], tags: Mapping[str, str], ranking: bool
    ) -> Example:
        chosen = parse_transcript(require_str(row, columns["chosen"]), columns["chosen"])
        rejected = parse_transcript(require_str(row, columns["rejected"]), columns["rejected"])
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadRow("preference_mismatch", "chosen and rejected differ before their last assistant turn")
        return Example(chosen[:-1], chosen=chosen[-1], rejected=rejected[-1])


def parse_transcript(text: str, column: str) -> list[dict[str, Any]]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` → user and assistant messages."""
    parts = _MARKER.split(text)
    if parts[0].strip():
        raise BadRow("wrong_type", f"the column '{column}' does not start with '\\n\\nHuman:'")
    return [
        {"role": _ROLES[speaker], "content": said.strip()}
        for speaker, said in zip(parts[1::2], parts[2::2], strict=True)
    ]


@hookimpl
def align_register_dataset_formats() -> list[DatasetFormat]:
    return [HH()]
