"""The ``mt_bench`` dataset format: FastChat's MT-Bench and Vicuna-Bench question files.

Each row has a ``question_id``, a ``category`` and ``turns`` (the user's messages). As prompts, only the
first turn is used: the second asks about the model's own first answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from align import hookimpl
from align.conversation import BadRow, Example, require_list
from align.dataformat import DatasetFormat


class MTBench(DatasetFormat):
    name = "mt_bench"
    kinds = ("prompts",)
    columns = {"turns": "turns"}

    def detect(self, row: Mapping[str, Any]) -> bool:
        return "question_id" in row and "turns" in row

    def convert(
        self, row: Mapping[str, Any], columns: Mapping[str, str], tags: Mapping[str, str], ranking: bool
    ) -> Example:
        turns = require_list(row, columns["turns"])
        if not turns or not isinstance(turns[0], str):
            raise BadRow("wrong_type", f"the column '{columns['turns']}' must be a list of questions (strings)")
        return Example([{"role": "user", "content": turns[0]}])  # its other columns (category…) travel along


@hookimpl
def align_register_dataset_formats() -> list[DatasetFormat]:
    return [MTBench()]
