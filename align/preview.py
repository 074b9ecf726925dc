"""``align data preview``: what a dataset looks like to the model, with the trained tokens marked."""

from __future__ import annotations

import sys
from typing import Any

from align.data import DataSource, dataset_dirs, load_examples, resolve
from align.plugin_manager import AlignPluginManager
from align.render import IGNORE, Renderer

# Trained text is shown green on a terminal, and between [[ and ]] elsewhere (files, pipes, tests).
_MARKS = {True: ("\033[32m", "\033[0m"), False: ("[[", "]]")}


def preview(
    plugins: AlignPluginManager,
    dataset: str,
    *,
    model: str,
    dataset_dir: str | None,
    format_name: str | None,
    count: int,
    max_length: int,
    on_bad_row: str,
    cache_dir: Any,
) -> str:
    """Render ``count`` rows of ``dataset`` and the counts for all of it, as text."""
    from transformers import AutoTokenizer

    from align.recipe import validate_model

    spec = validate_model(model, plugins)
    path = plugins.get("model source", spec.source).materialize(spec.config, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    renderer = Renderer(tokenizer, max_length)
    entry = resolve(DataSource(dataset).dataset, dataset_dirs(dataset_dir))
    formats = {name: e.obj for name, e in plugins.registry("dataset format").items()}
    examples, loaded = load_examples(entry, formats, on_bad_row, format_name=format_name)  # type: ignore[arg-type]
    kind = "preference" if examples[0].is_preference else "sft"
    rows, rendered = (renderer.preference if kind == "preference" else renderer.sft)(examples, entry.name)
    mark = _MARKS[sys.stdout.isatty()]
    lines = [f"{entry.name} ({entry.path}), {kind}, tokenizer of {model}; trained tokens {mark[0]}marked{mark[1]}", ""]
    for index in range(min(count, rendered.kept)):
        lines.append(f"--- row {index} " + "-" * 40)
        if kind == "sft":
            lines.append(_marked(tokenizer, rows["input_ids"][index], rows["labels"][index], mark))
        else:
            prompt = rows["prompt_ids"][index]
            for side in ("chosen", "rejected"):
                reply = rows[f"{side}_ids"][index]
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
