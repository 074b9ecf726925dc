"""``align data preview``: what a dataset looks like to the model, with the trained tokens marked.

Rows are numbered as in the file (row 0 is its first), as the loader's errors number them ("data.jsonl
row 12: ..."): a row left out, as unreadable (``--on-bad-row skip``) or too long, keeps its number, so a
gap in the numbers is a row that was dropped, and the counts at the end say why.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from align.chat_template import resolve_chat_template
from align.conversation import Example
from align.data import DataSource, dataset_dirs, load_examples, resolve
from align.dataformat import DatasetFormat
from align.kinds import DataKind, kind_of
from align.plugin_manager import AlignPluginManager
from align.prepare import as_kind
from align.render import IGNORE, Renderer

# Trained text is shown green on a terminal, and between [[ and ]] elsewhere (files, pipes, tests).
_MARKS = {True: ("\033[32m", "\033[0m"), False: ("[[", "]]")}


def preview(
    plugins: AlignPluginManager,
    dataset: str,
    *,
    model: str | None,
    dataset_dir: str | None,
    format_name: str | None,
    count: int,
    max_length: int,
    on_bad_row: str,
    cache_dir: Any,
    chat_template: str | None = None,
) -> str:
    """Render ``count`` rows of ``dataset`` and the counts for all of it, as text.

    :param model: whose tokenizer and chat template; ``None`` for the fallback model source.
    :param chat_template: a registered template's name, a ``.jinja`` file or the template itself, replacing
        the tokenizer's (as a stage's ``chat_template:`` does).
    """
    from transformers import AutoTokenizer

    from align.recipe import validate_model

    # Before the model loads: a mistyped name or path fails at once.
    template = resolve_chat_template(chat_template, plugins, "--chat-template")
    model = model or plugins.fallback("model source", "--model").name
    spec = validate_model(model, plugins)
    path = plugins.get("model source", spec.source).materialize(spec.config, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    renderer = Renderer(tokenizer, max_length, template)
    entry = resolve(DataSource(dataset).dataset, dataset_dirs(dataset_dir))
    file_rows: dict[int, int] = {}
    formats = {name: _Numbered(e.obj, file_rows) for name, e in plugins.registry("dataset format").items()}
    kinds = {name: e.obj for name, e in plugins.registry("data kind").items()}
    examples, loaded = load_examples(
        entry,
        formats,
        on_bad_row,  # type: ignore[arg-type]
        format_name=format_name,
        allow_prompts=True,
    )
    kind = kind_of(examples[0], kinds)
    # Each row of the kind keeps the number of the file row it was made from (a preference pair makes
    # two rows of feedback, both numbered as the pair).
    numbered = [
        (file_rows[id(example)], row)
        for example in examples
        for row in as_kind([example], kinds[kind], plugins, entry.name)
    ]
    _, rendered = kinds[kind].render(renderer, [row for _, row in numbered], entry.name)  # counts for all
    mark = _MARKS[sys.stdout.isatty()]
    template_note = ""
    if chat_template is not None:  # a file is named; a template's text is not repeated (a tag marks it)
        template_note = f", chat template {'given' if '{' in chat_template else chat_template}"
    lines = [
        f"{entry.name} ({entry.path}), {kind}, tokenizer of {model}{template_note}; "
        f"trained tokens {mark[0]}marked{mark[1]}",
        "",
    ]
    shown = 0
    for number, row in numbered:
        if shown >= min(count, rendered.kept):
            break
        block = _render_one(renderer, kinds[kind], row, entry.name, tokenizer, mark)
        if block is None:  # dropped (too long, or nothing to train on): counted below, not shown
            continue
        lines += [f"--- row {number} " + "-" * 40, *block]
        shown += 1
    lines += ["", loaded.describe(), rendered.describe()]
    return "\n".join(lines)


class _Numbered(DatasetFormat):
    """A dataset format that notes which file row each example it converts comes from.

    load_examples converts every row once, in file order, so the n-th call is file row n, whether the
    row is then kept or not; the example is noted by identity, as examples carry no row number.
    """

    def __init__(self, format: DatasetFormat, file_rows: dict[int, int]) -> None:
        self.format, self.file_rows, self.calls = format, file_rows, 0
        self.name, self.columns, self.tags = format.name, format.columns, format.tags  # type: ignore[misc]
        self.kinds, self.fallback = format.kinds, format.fallback  # type: ignore[misc]

    def detect(self, row: Mapping[str, Any]) -> bool:
        return self.format.detect(row)

    def convert(
        self, row: Mapping[str, Any], columns: Mapping[str, str], tags: Mapping[str, str], ranking: bool
    ) -> Example:
        number, self.calls = self.calls, self.calls + 1  # counted before converting: a bad row has one too
        example = self.format.convert(row, columns, tags, ranking)
        self.file_rows[id(example)] = number
        return example


def _render_one(
    renderer: Renderer, kind: DataKind, row: Example, name: str, tokenizer: Any, mark: tuple[str, str]
) -> list[str] | None:
    """The lines showing one row as the model sees it; None when rendering drops it (too long, say)."""
    rows, rendered = kind.render(renderer, [row], name)
    if not rendered.kept:
        return None
    if "labels" in rows:  # conversations: the tokens that carry loss are marked
        return [_marked(tokenizer, rows["input_ids"][0], rows["labels"][0], mark)]
    prompt = rows["prompt_ids"][0]
    replies = [(side, rows[f"{side}_ids"][0]) for side in ("chosen", "rejected") if f"{side}_ids" in rows]
    if "completion_ids" in rows:
        replies.append(("desirable" if rows["label"][0] else "undesirable", rows["completion_ids"][0]))
    if not replies:
        return [tokenizer.decode(prompt)]
    lines = []
    for side, reply in replies:
        lines.append(f"[{side}]")
        lines.append(_marked(tokenizer, prompt + reply, [IGNORE] * len(prompt) + reply, mark))
    return lines


def _marked(tokenizer: Any, ids: list[int], labels: list[int], mark: tuple[str, str]) -> str:
    pieces: list[str] = []
    run: list[int] = []
    trained = False
    for token, label in zip(ids, labels, strict=True):
        if (label != IGNORE) != trained and run:
            text = tokenizer.decode(run)
            pieces.append(f"{mark[0]}{text}{mark[1]}" if trained else text)
            run = []
        trained = label != IGNORE
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{mark[0]}{text}{mark[1]}" if trained else text)
    return "".join(pieces)
