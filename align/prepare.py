"""What a training stage calls to turn its ``data`` setting into tokenized train and held-out sets.

For each dataset of the mixture: load and convert (:mod:`align.data`), hold out its evaluation rows,
render (:mod:`align.render`), then weight it. The held-out rows stay apart per dataset, so that each
dataset's evaluation loss is reported on its own rather than one loss for the whole mixture.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.conversation import Example
from align.data import DataSource, LoadReport, apply_weight, load_examples, resolve, sources, split_held_out
from align.errors import AlignError
from align.kinds import PROMPTS, DataKind, kind_of
from align.plugin_manager import AlignPluginManager
from align.render import Renderer, RenderReport

__all__ = ["Prepared", "as_kind", "check_data", "data_files", "load_prompts", "prepare"]

logger = logging.getLogger("align.data")


@dataclass
class Prepared:
    """Tokenized rows ready for a trainer, and what happened to every row on the way."""

    train: dict[str, list[Any]]  #: column → one value per row (token ids, labels, …: see the data kind)
    held_out: dict[str, dict[str, list[Any]]]  #: dataset name → columns
    loaded: list[LoadReport] = field(default_factory=list)
    rendered: list[RenderReport] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """A JSON-able account of loading and rendering, per dataset."""
        return {
            "loaded": [
                {"dataset": r.name, "rows": r.rows, "kept": r.kept, "skipped": dict(r.skipped)} for r in self.loaded
            ],
            "rendered": [
                {
                    "dataset": r.name,
                    "rows": r.rows,
                    "kept": r.kept,
                    "tokens": r.tokens,
                    "trained_tokens": r.trained_tokens,
                    "history_truncated": r.history_truncated,
                    "dropped": dict(r.dropped),
                }
                for r in self.rendered
            ],
            "train_rows": len(next(iter(self.train.values()))),
        }


def data_files(data: Any, dataset_dir: str | None) -> list[Path]:
    """The files behind a ``data`` setting (for fingerprints); raises for an unknown name."""
    from align.data import dataset_dirs

    return [resolve(source.dataset, dataset_dirs(dataset_dir)).path for source in sources(data)]


def check_data(
    data: str | Sequence[str | DataSource],
    plugins: AlignPluginManager,
    *,
    kind: str,
    dataset_dir: str | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> None:
    """Read every dataset of ``data`` as :func:`prepare` will, and raise what it would raise: a malformed
    row (naming file and row), a missing column, an unknown role, an empty file, data of another kind.

    Stages call it from ``Stage.check``, when the recipe loads, so that a later stage's bad data stops the
    run before an earlier stage trains. Only what depends on the tokenizer (lengths) waits for the stage.
    """
    from align.data import dataset_dirs

    data_kind: DataKind = plugins.get("data kind", kind)
    formats = {name: entry.obj for name, entry in plugins.registry("dataset format").items()}
    for source in sources(data):
        entry = resolve(source.dataset, dataset_dirs(dataset_dir))
        examples, loaded = load_examples(
            entry, formats, on_bad_row, source.num_samples, source.format, allow_prompts=data_kind.prompt_rows
        )
        if not examples:
            raise AlignError(f"dataset '{entry.name}': no usable row: {loaded.describe()}")
        as_kind(examples, data_kind, plugins, entry.name)


def prepare(
    data: str | Sequence[str | DataSource],
    renderer: Renderer,
    plugins: AlignPluginManager,
    *,
    kind: str,
    dataset_dir: str | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    seed: int = 0,
    default_eval_size: float = 0.0,
) -> Prepared:
    """Load, split, render and weight every dataset of ``data`` as rows of the data kind ``kind``.

    :param kind: a registered data kind (``conversations``, ``preferences``, ``feedback``, ``prompts``, …);
        rows of another kind are converted when the kind knows how, and refused otherwise.
    :param default_eval_size: rows to hold out of each dataset that does not set its own ``eval_size``.
    """
    from align.data import dataset_dirs

    data_kind: DataKind = plugins.get("data kind", kind)
    formats = {name: entry.obj for name, entry in plugins.registry("dataset format").items()}
    prepared = Prepared(train={}, held_out={})
    for index, source in enumerate(sources(data)):
        entry = resolve(source.dataset, dataset_dirs(dataset_dir))
        examples, loaded = load_examples(
            entry, formats, on_bad_row, source.num_samples, source.format, allow_prompts=data_kind.prompt_rows
        )
        train, held = split_held_out(examples, source.eval_size or default_eval_size, seed + index)
        # Split before converting, so that the two halves of a pair never land on both sides.
        train, held = as_kind(train, data_kind, plugins, entry.name), as_kind(held, data_kind, plugins, entry.name)
        rows, report = data_kind.render(renderer, train, entry.name)
        prepared.loaded.append(loaded)
        prepared.rendered.append(report)
        logger.info("  data %s", loaded.describe())
        logger.info("  data %s", report.describe())
        if not next(iter(rows.values())):
            raise AlignError(f"dataset '{entry.name}': no row survived rendering: {report.describe()}")
        if held:
            # Held out before rendering (a pair must stay whole), so some may not fit: the report counts them.
            held_rows, held_report = data_kind.render(renderer, held, f"{entry.name} (held out)")
            prepared.rendered.append(held_report)
            logger.info("  data %s", held_report.describe())
            if held_report.kept:
                prepared.held_out[entry.name] = held_rows
            else:
                logger.info("  data %s: none of the %d held-out rows survived: not evaluated", entry.name, len(held))
        picked = apply_weight(list(range(report.kept)), source.weight, seed + index)
        for column, values in rows.items():
            prepared.train.setdefault(column, []).extend(values[i] for i in picked)
    return prepared


def as_kind(examples: Sequence[Example], kind: DataKind, plugins: AlignPluginManager, dataset: str) -> list[Example]:
    """``examples`` as rows of ``kind``: kept, converted, or refused with what the dataset holds instead."""
    found: list[Example] = []
    for example in examples:
        if kind.holds(example):
            found.append(example)
            continue
        converted = kind.convert(example)
        if converted is None:
            kinds = {name: entry.obj for name, entry in plugins.registry("data kind").items()}
            held = kind_of(example, kinds)
            raise AlignError(
                f"dataset '{dataset}' holds {held}, but this stage trains on {kind.name} ({kind.help})",
                hint="for an alpaca or sharegpt file, `ranking: true` in its registry entry marks preference pairs "
                "and a `kto_tag` column unpaired feedback; `align plugins` lists the data kinds",
            )
        found += converted
    return found


def load_prompts(
    data: str | Sequence[str | DataSource],
    plugins: AlignPluginManager,
    *,
    dataset_dir: str | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> list[Example]:
    """The prompts of ``data`` (the ``prompts`` data kind): prompt-only rows as they are, conversations
    without their last reply, and the shared prompt of preference pairs. Each source's ``weight`` and
    ``num_samples`` apply. Each :class:`~align.conversation.Example` keeps its row's other columns
    (``columns``: a reference answer, say) for reward functions."""
    from align.data import dataset_dirs

    kind: DataKind = plugins.get("data kind", PROMPTS)
    formats = {name: entry.obj for name, entry in plugins.registry("dataset format").items()}
    prompts: list[Example] = []
    for index, source in enumerate(sources(data)):
        entry = resolve(source.dataset, dataset_dirs(dataset_dir))
        examples, loaded = load_examples(
            entry, formats, on_bad_row, source.num_samples, source.format, allow_prompts=True
        )
        logger.info("  prompts %s", loaded.describe())
        prompts += apply_weight(as_kind(examples, kind, plugins, entry.name), source.weight, index)
    return prompts
