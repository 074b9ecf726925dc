"""``align data preview``: what a dataset looks like to the model, with the trained tokens marked."""

from __future__ import annotations

import sys
from typing import Any

from align.data import DataSource, dataset_dirs, load_examples, resolve
from align.kinds import kind_of
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
) -> str:
    """Render ``count`` rows of ``dataset`` and the counts for all of it, as text.

    :param model: whose tokenizer and chat template; ``None`` for the fallback model source.
    """
    from transformers import AutoTokenizer

    from align.recipe import validate_model

    model = model or plugins.fallback("model source", "--model").name
    spec = validate_model(model, plugins)
    path = plugins.get("model source", spec.source).materialize(spec.config, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    renderer = Renderer(tokenizer, max_length)
    entry = resolve(DataSource(dataset).dataset, dataset_dirs(dataset_dir))
    formats = {name: e.obj for name, e in plugins.registry("dataset format").items()}
    kinds = {name: e.obj for name, e in plugins.registry("data kind").items()}
    examples, loaded = load_examples(
        entry,
        formats,
        on_bad_row,
        format_name=format_name,
        allow_prompts=True,  # type: ignore[arg-type]
    )
    kind = kind_of(examples[0], kinds)
    rows, rendered = kinds[kind].render(renderer, as_kind(examples, kinds[kind], plugins, entry.name), entry.name)
    mark = _MARKS[sys.stdout.isatty()]
    lines = [f"{entry.name} ({entry.path}), {kind}, tokenizer of {model}; trained tokens {mark[0]}marked{mark[1]}", ""]
    for index in range(min(count, rendered.kept)):
        lines.append(f"--- row {index} " + "-" * 40)
        if "labels" in rows:  # conversations: the tokens that carry loss are marked
            lines.append(_marked(tokenizer, rows["input_ids"][index], rows["labels"][index], mark))
            continue
        prompt = rows["prompt_ids"][index]
        replies = [(side, rows[f"{side}_ids"][index]) for side in ("chosen", "rejected") if f"{side}_ids" in rows]
        if "completion_ids" in rows:
            replies.append(("desirable" if rows["label"][index] else "undesirable", rows["completion_ids"][index]))
        if not replies:
            lines.append(tokenizer.decode(prompt))
        for side, reply in replies:
            lines.append(f"[{side}]")
            lines.append(_marked(tokenizer, prompt + reply, [IGNORE] * len(prompt) + reply, mark))
    lines += ["", loaded.describe(), rendered.describe()]
    return "\n".join(lines)


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
