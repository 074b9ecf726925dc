"""Datasets: registries in LLaMA-Factory's ``dataset_info.json`` form, loading, and bad-row handling.

A stage's ``data:`` names datasets by registry entry (``alpaca_en_demo``) or by file path. Entries come
from the recipe's ``dataset_dir`` (``--dataset-dir`` on the command line) and then from align's own
``datasets/dataset_info.json``. Files are read through HuggingFace ``datasets`` (json, jsonl, parquet,
csv, with its cache); every row is converted by its format plugin into an
:class:`~align.conversation.Example`. A row that cannot be converted stops the load with its file and
row, or, with ``on_bad_row: skip``, is skipped and counted by reason. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.conversation import BadRow, Example
from align.dataformat import DatasetFormat
from align.errors import AlignError
from align.schema import check_bounds, did_you_mean, setting

__all__ = [
    "DataSource",
    "DatasetEntry",
    "LoadReport",
    "apply_weight",
    "data_setting",
    "dataset_dirs",
    "load_examples",
    "on_bad_row_setting",
    "read_rows",
    "resolve",
    "sources",
    "split_held_out",
]

logger = logging.getLogger("align.data")

REGISTRY_FILE = "dataset_info.json"
# align's own registry: `datasets/` of the source tree, shipped in wheels as align/bundled_datasets.
_HERE = Path(__file__).resolve().parent
BUILTIN_DIR = next(
    (d for d in (_HERE / "bundled_datasets", _HERE.parent / "datasets") if (d / REGISTRY_FILE).is_file()),
    _HERE.parent / "datasets",
)
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Keys of a LLaMA-Factory entry, so that an existing dataset_info.json loads unchanged.
ENTRY_KEYS = (
    "file_name",
    "formatting",
    "ranking",
    "columns",
    "tags",
    "split",
    "num_samples",
    "subset",
    "folder",
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
)
MULTIMODAL_COLUMNS = ("images", "videos", "audios")


@dataclass
class DataSource:
    """One dataset of a stage's mixture."""

    dataset: str = setting(help="A registry entry's name, or the path of a json, jsonl, parquet or csv file.")
    format: str | None = setting(
        None,
        help="The dataset format (alpaca, sharegpt, messages, hh); "
        "default: the entry's `formatting`, or detected from the file's first row.",
    )
    weight: float = setting(
        1.0,
        help="How often each row is used per epoch: 2 repeats every row, 0.5 keeps a "
        "random half. Sets the mixture's proportions.",
        above=0,
    )
    eval_size: float = setting(
        0.0,
        help="Rows held out for evaluation: a fraction below 1, or a count. Each "
        "dataset's held-out loss is reported on its own.",
        minimum=0,
    )
    num_samples: int | None = setting(
        None, help="Use only the first this many rows (overrides the entry's).", minimum=1
    )

    def __post_init__(self) -> None:
        # build() checks the ranges with the key path; this catches sources made in code.
        check_bounds(self, "data")


def data_setting() -> Any:
    """The ``data`` setting every data-reading stage declares."""
    return setting(
        help="What to train on: a registry name or file, or a list of them with weights "
        "(`[{dataset: NAME, weight: 2, eval_size: 0.05}, ...]`)."
    )


def on_bad_row_setting() -> Any:
    return setting(
        "error",
        help="What a row that cannot be read does: `error` stops with its file and row; "
        "`skip` leaves it out and reports how many were skipped, by reason.",
    )


def sources(data: str | Sequence[str | DataSource]) -> list[DataSource]:
    """A ``data`` setting as a list of :class:`DataSource` (a plain name is a source with defaults)."""
    items = [data] if isinstance(data, str) else list(data)
    if not items:
        raise AlignError("data: the list of datasets is empty")
    return [DataSource(item) if isinstance(item, str) else item for item in items]


@dataclass
class DatasetEntry:
    """A resolved registry entry (or a bare file given by path)."""

    name: str
    path: Path
    formatting: str | None
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    num_samples: int | None = None
    registered: bool = True  #: from a registry (``False``: a file given by path)


@dataclass
class LoadReport:
    """What loading one dataset did, row by row."""

    name: str
    rows: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        text = f"{self.name}: read {self.rows} rows, converted {self.kept}"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
            text += f" (skipped {sum(self.skipped.values())}: {reasons})"
        return text


def dataset_dirs(recipe_dir: str | None) -> list[Path]:
    """Registry folders in lookup order: the user's, then align's own."""
    folders = [Path(recipe_dir).expanduser()] if recipe_dir else []
    return [*folders, BUILTIN_DIR]


def resolve(reference: str, dirs: Sequence[Path]) -> DatasetEntry:
    """A registry name or a file path → :class:`DatasetEntry`."""
    for folder in dirs:
        registry = read_registry(folder)
        if reference in registry:
            return _entry(reference, registry[reference], folder)
    path = Path(reference).expanduser()
    if path.suffix in FILE_TYPES or path.exists():
        if not path.is_file():
            raise AlignError(f"data: {path}: no such file")
        if path.suffix not in FILE_TYPES:
            raise AlignError(f"data: {path}: unsupported file type; use one of {', '.join(FILE_TYPES)}")
        return DatasetEntry(path.stem, path, formatting=None, registered=False)
    known = [name for folder in dirs for name in read_registry(folder)]
    raise AlignError(
        f"data: '{reference}' is neither a registry entry nor a file{did_you_mean(reference, known)}",
        hint=f"registries searched: {', '.join(str(d / REGISTRY_FILE) for d in dirs)}",
    )


def read_registry(folder: Path) -> dict[str, Any]:
    path = folder / REGISTRY_FILE
    if not folder.is_dir():
        raise AlignError(f"dataset_dir {folder}: no such folder")
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AlignError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(registry, dict):
        raise AlignError(f"{path}: expected an object mapping dataset names to entries")
    return registry


def _entry(name: str, raw: Any, folder: Path) -> DatasetEntry:
    where = f"{folder / REGISTRY_FILE}: entry '{name}'"
    if not isinstance(raw, dict):
        raise AlignError(f"{where} must be an object")
    for key in raw:
        if key not in ENTRY_KEYS:
            raise AlignError(f"{where} has the unknown key '{key}'{did_you_mean(key, ENTRY_KEYS)}")
    remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in raw]
    if "file_name" not in raw:
        raise AlignError(
            f"{where} loads from {remote[0] if remote else 'nowhere'}; align reads local files only",
            hint="download the data and give the entry a `file_name` relative to its dataset_dir",
        )
    columns = raw.get("columns") or {}
    multimodal = [c for c in MULTIMODAL_COLUMNS if c in columns]
    if multimodal:
        raise AlignError(f"{where} has {', '.join(multimodal)}: multimodal datasets are not supported")
    formatting = raw.get("formatting")  # none: the format that serves as the fallback (LLaMA-Factory's: alpaca)
    if formatting is None and set(columns) <= {"prompt"} and columns:
        raise AlignError(f"{where} is plain pre-training text; align's stages take conversations")
    return DatasetEntry(
        name=name,
        path=folder / raw["file_name"],
        formatting=formatting,
        ranking=bool(raw.get("ranking", False)),
        columns=dict(columns),
        tags=dict(raw.get("tags") or {}),
        split=raw.get("split", "train"),
        num_samples=raw.get("num_samples"),
    )


def read_rows(entry: DatasetEntry) -> list[dict[str, Any]]:
    """The file's rows as dicts, read through ``datasets`` (cached); errors name file and position."""
    path = entry.path
    if not path.is_file():
        raise AlignError(f"dataset '{entry.name}': {path}: no such file")
    _check_text(path)
    import datasets

    datasets.disable_progress_bars()
    builder = FILE_TYPES.get(path.suffix)
    if builder is None:
        raise AlignError(f"dataset '{entry.name}': {path}: unsupported file type; use {', '.join(FILE_TYPES)}")
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its "Failed to load JSON" is ours to report, below
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets' errors say little about where; find the place ourselves
        if builder == "json":
            return _read_json_by_hand(path, error)
        raise AlignError(f"dataset '{entry.name}': {path} cannot be read as {builder}: {error}") from None
    finally:
        quiet.setLevel(level)
    return loaded.to_list()


def _check_text(path: Path) -> None:
    if path.suffix == ".parquet":
        return
    with path.open("rb") as data:
        for number, line in enumerate(data, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise AlignError(
                    f"{path} line {number}: not UTF-8 text (byte {error.start} of the line)",
                    hint="re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
                ) from None


def _read_json_by_hand(path: Path, cause: Exception) -> list[dict[str, Any]]:
    """Parse JSON ourselves after ``datasets`` failed: for its exact error, or rows of mixed types."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise AlignError(
                        f"{path} line {number}: invalid JSON: {error.msg} (column {error.colno})"
                    ) from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise AlignError(
                f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from None
    if not isinstance(rows, list):
        raise AlignError(f"{path}: expected a list of rows (a JSON array, or one object per line)")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise AlignError(f"{path} row {index}: expected an object, got {type(row).__name__}")
    logger.debug("datasets could not load %s (%s); read it with the json module", path, cause)
    return rows


def load_examples(
    entry: DatasetEntry,
    formats: Mapping[str, DatasetFormat],
    on_bad_row: Literal["error", "skip"] = "error",
    num_samples: int | None = None,
    format_name: str | None = None,
    allow_prompts: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Read and convert a dataset; returns the examples and a report of kept and skipped rows.

    :param allow_prompts: accept rows that are prompts only (no reply), for generation.
    """
    rows = read_rows(entry)
    report = LoadReport(entry.name, rows=len(rows))
    if not rows:
        raise AlignError(f"dataset '{entry.name}': {entry.path} is empty")
    limit = num_samples or entry.num_samples
    if limit:
        rows = rows[:limit]
        report.rows = len(rows)
    fmt = _format(entry, formats, format_name, rows[0])
    columns = {**fmt.columns, **entry.columns}
    tags = {**fmt.tags, **entry.tags}
    read = set(columns.values())  # the columns the format reads; the rest travel with the example
    # A file named by path has no registry entry to say `ranking: true`: its own columns say it.
    ranking = entry.ranking or (
        not entry.registered and "chosen" in columns and bool({columns["chosen"], columns["rejected"]} & rows[0].keys())
    )
    examples = []
    for index, row in enumerate(rows):
        try:
            example = fmt.convert(row, columns, tags, ranking)
            if columns.get("kto_tag"):  # LLaMA-Factory's column of unpaired feedback, for every format
                example.label = _desirable(row, columns["kto_tag"])
            example.columns = {**{k: v for k, v in row.items() if k not in read}, **example.columns}
            examples.append(example.validate(allow_prompts))
        except BadRow as bad:
            if on_bad_row == "error":
                raise AlignError(
                    f"{entry.path} row {index}: {bad.detail}",
                    hint="fix the row, or set `on_bad_row: skip` to leave such rows out (they are counted)",
                ) from None
            report.skipped[bad.reason] += 1
    report.kept = len(examples)
    if not examples:
        raise AlignError(f"dataset '{entry.name}': none of its {report.rows} rows could be read: {report.describe()}")
    return examples, report


def _desirable(row: Mapping[str, Any], column: str) -> bool:
    value = row.get(column)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is None:
        raise BadRow("missing_column", f"the column '{column}' (kto_tag: whether the reply is desirable) is missing")
    raise BadRow("wrong_type", f"the column '{column}' (kto_tag) must be true or false, got {value!r}")


def _format(
    entry: DatasetEntry, formats: Mapping[str, DatasetFormat], name: str | None, first: Mapping[str, Any]
) -> DatasetFormat:
    name = name or entry.formatting
    if name is None and entry.registered:  # a registry entry without `formatting`: the fallback format
        name = next((fmt.name for fmt in formats.values() if getattr(fmt, "fallback", False)), None)
    if name is not None:
        if name not in formats:
            raise AlignError(
                f"dataset '{entry.name}': unknown format '{name}'{did_you_mean(name, formats)}",
                hint=f"known formats: {', '.join(sorted(formats))}",
            )
        return formats[name]
    matches = [fmt for fmt in formats.values() if fmt.detect(first)]
    if len(matches) != 1:
        found = "no known format" if not matches else f"several formats ({', '.join(m.name for m in matches)})"
        hint = f"name it with `format:`; known formats: {', '.join(sorted(formats))}"
        (column, value), *others = first.items()
        nested = isinstance(value, list) and value and all(isinstance(row, Mapping) for row in value)
        if not others and nested:  # `{"rows": [{...}, ...]}` reads as one row whose one column holds the rows
            hint = (
                f"the rows seem to be nested under '{column}': align reads a JSON array of rows, JSON Lines, "
                "or a JSON object of columns; move the rows to the top level"
            )
        raise AlignError(
            f"dataset '{entry.name}': the first row of {entry.path} (columns {', '.join(first)}) matches {found}",
            hint=hint,
        )
    return matches[0]


def split_held_out(examples: list[Example], eval_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle-free split: a seeded random ``eval_size`` (fraction or count) of rows is held out."""
    count = int(round(eval_size * len(examples))) if eval_size < 1 else int(eval_size)
    if count == 0:
        return examples, []
    if count >= len(examples):
        raise AlignError(f"data: eval_size {eval_size} leaves no training rows out of {len(examples)}")
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def apply_weight(items: list[Any], weight: float, seed: int) -> list[Any]:
    """Repeat the rows ``int(weight)`` times, plus a seeded random share for the fraction."""
    whole, fraction = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(items, int(round(fraction * len(items)))) if fraction else []
    return items * whole + extra
