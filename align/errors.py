"""The one exception type for mistakes a user can fix.

The CLI prints an :class:`AlignError` as a message without a traceback; anything else is a bug and keeps
its traceback. So raise ``AlignError`` for bad input (recipes, data, plugins, the machine at hand) and say
what is wrong, where, and how to fix it.
"""

from __future__ import annotations


class AlignError(Exception):
    """A problem with the user's input or environment, explained in plain words.

    :param message: what is wrong and where (file, row, key path).
    :param hint: how to fix it, printed on a line of its own.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"
