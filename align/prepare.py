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

from align.data import DataSource, LoadReport, apply_weight, load_examples, resolve, sources, split_held_out
from align.errors import AlignError
from align.plugin_manager import AlignPluginManager
from align.render import Renderer, RenderReport

logger = logging.getLogger("align.data")


@dataclass
class Prepared:
    """Tokenized rows ready for a trainer, and what happened to every row on the way."""

    train: dict[str, list[list[int]]]
    held_out: dict[str, dict[str, list[list[int]]]]  #: dataset name → rows
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


def prepare(
    data: str | Sequence[str | DataSource],
    renderer: Renderer,
    plugins: AlignPluginManager,
    *,
    kind: Literal["sft", "preference"],
    dataset_dir: str | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    seed: int = 0,
    default_eval_size: float = 0.0,
) -> Prepared:
    """Load, split, render and weight every dataset of ``data``.

    :param default_eval_size: rows to hold out of each dataset that does not set its own ``eval_size``.
    """
    from align.data import dataset_dirs

    formats = {name: entry.obj for name, entry in plugins.registry("dataset format").items()}
    prepared = Prepared(train={}, held_out={})
    for index, source in enumerate(sources(data)):
        entry = resolve(source.dataset, dataset_dirs(dataset_dir))
        examples, loaded = load_examples(entry, formats, on_bad_row, source.num_samples, source.format)
        wrong = [e for e in examples if e.is_preference != (kind == "preference")]
        if wrong:
            wanted = "preference pairs (chosen/rejected)" if kind == "preference" else "conversations (not pairs)"
            raise AlignError(
                f"dataset '{entry.name}' holds {'preference pairs' if wrong[0].is_preference else 'conversations'}, "
                f"but this stage trains on {wanted}",
                hint="for an alpaca or sharegpt file, `ranking: true` in its registry entry marks a preference set",
            )
        train, held = split_held_out(examples, source.eval_size or default_eval_size, seed + index)
        render = renderer.sft if kind == "sft" else renderer.preference
        rows, report = render(train, entry.name)
        prepared.loaded.append(loaded)
        prepared.rendered.append(report)
        logger.info("  data %s", loaded.describe())
        logger.info("  data %s", report.describe())
        if not next(iter(rows.values())):
            raise AlignError(f"dataset '{entry.name}': no row survived rendering: {report.describe()}")
        if held:
            prepared.held_out[entry.name], held_report = render(held, f"{entry.name} (held out)")
            prepared.rendered.append(held_report)
            logger.info("  data %s", held_report.describe())
        picked = apply_weight(list(range(report.kept)), source.weight, seed + index)
        for column, values in rows.items():
            prepared.train.setdefault(column, []).extend(values[i] for i in picked)
    return prepared


def load_prompts(
    data: str | Sequence[str | DataSource],
    plugins: AlignPluginManager,
    *,
    dataset_dir: str | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> list[list[dict[str, Any]]]:
    """The prompts of ``data``: prompt-only rows as they are, conversations without their last reply,
    and the shared prompt of preference pairs. Each source's ``weight`` and ``num_samples`` apply."""
    from align.data import dataset_dirs

    formats = {name: entry.obj for name, entry in plugins.registry("dataset format").items()}
    prompts: list[list[dict[str, Any]]] = []
    for index, source in enumerate(sources(data)):
        entry = resolve(source.dataset, dataset_dirs(dataset_dir))
        examples, loaded = load_examples(
            entry, formats, on_bad_row, source.num_samples, source.format, allow_prompts=True
        )
        logger.info("  prompts %s", loaded.describe())
        prompts += apply_weight([e.prompt for e in examples], source.weight, index)
    return prompts
