"""The ``alpaca`` dataset format: instruction, input, output, with optional system and history.

As in LLaMA-Factory: the user turn is ``instruction`` followed by ``input`` on a new line, ``history`` is
a list of ``[user, assistant]`` pairs that come first (their replies are trained on too), and a ranking
dataset has ``chosen`` and ``rejected`` replies instead of ``output``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from align import hookimpl
from align.conversation import BadRow, Example, require_str
from align.dataformat import DatasetFormat


class Alpaca(DatasetFormat):
    name = "alpaca"
    fallback = True  # LLaMA-Factory reads an entry without `formatting` as alpaca
    columns = {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "chosen": "chosen",
        "rejected": "rejected",
    }

    def detect(self, row: Mapping[str, Any]) -> bool:
        return "instruction" in row

    def convert(
        self, row: Mapping[str, Any], columns: Mapping[str, str], tags: Mapping[str, str], ranking: bool
    ) -> Example:
        messages: list[dict[str, Any]] = []
        if columns.get("system"):
            system = require_str(row, columns["system"], optional=True)
            if system:
                messages.append({"role": "system", "content": system})
        if columns.get("history"):
            history = row.get(columns["history"]) or []
            if not isinstance(history, list):
                raise BadRow("wrong_type", f"the column '{columns['history']}' must be a list of [user, assistant]")
            for index, pair in enumerate(history):
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                    raise BadRow("wrong_type", f"history entry {index} must be a pair of strings [user, assistant]")
                messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = require_str(row, columns["prompt"])
        query = require_str(row, columns["query"], optional=True) if columns.get("query") else ""
        messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
        if ranking:
            return Example(
                messages,
                chosen={"role": "assistant", "content": require_str(row, columns["chosen"])},
                rejected={"role": "assistant", "content": require_str(row, columns["rejected"])},
            )
        messages.append({"role": "assistant", "content": require_str(row, columns["response"])})
        return Example(messages)


@hookimpl
def align_register_dataset_formats() -> list[DatasetFormat]:
    return [Alpaca()]
