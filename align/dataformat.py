"""What a dataset-format plugin is: a converter from a file's rows to :class:`~align.conversation.Example`.

Formats register through ``align_register_dataset_formats``. A registry entry (``dataset_info.json``)
selects one with ``formatting``; a file given by path without an entry is matched by :meth:`detect`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from align.conversation import Example

__all__ = ["DatasetFormat"]


class DatasetFormat:
    """Base class for dataset-format plugins.

    * ``name``: what ``formatting:`` (or a recipe's ``format:``) says.
    * ``columns``: the default column names this format reads, by role, as in LLaMA-Factory's
      ``dataset_info.json`` (``{"prompt": "instruction", ...}``); an entry's ``columns`` override them.
    * ``tags``: default ``tags`` (sharegpt's role and content keys), likewise overridable.
    * ``fallback``: the format of a registry entry that names no ``formatting`` (LLaMA-Factory's rule
      makes that alpaca); a file given by path is detected instead.
    * ``kinds``: the data kinds (:mod:`align.kinds`) its rows can be. Whatever the format, an entry's
      ``kto_tag`` column marks each row's reply desirable or not (``feedback``), and every row can serve
      as a prompt.
    """

    name: ClassVar[str]
    columns: ClassVar[Mapping[str, str]] = {}
    tags: ClassVar[Mapping[str, str]] = {}
    kinds: ClassVar[tuple[str, ...]] = ("conversations", "preferences", "feedback", "prompts")
    fallback: ClassVar[bool] = False

    def detect(self, row: Mapping[str, Any]) -> bool:
        """Whether a row (the file's first) looks like this format; used when no format is named."""
        return False

    def convert(
        self, row: Mapping[str, Any], columns: Mapping[str, str], tags: Mapping[str, str], ranking: bool
    ) -> Example:
        """Turn one row into an :class:`Example`; raise :class:`~align.conversation.BadRow` if it cannot.

        :param columns: column role → column name (defaults merged with the entry's ``columns``).
        :param tags: sharegpt tags (defaults merged with the entry's ``tags``).
        :param ranking: whether the dataset is a preference dataset (``chosen``/``rejected``).
        """
        raise NotImplementedError
