"""Datasets: registries in LLaMA-Factory's ``dataset_info.json`` form, loading, and bad-row handling.

A stage's ``data:`` names datasets by registry entry (``alpaca_en_demo``) or by file path. Entries come
from the recipe's ``dataset_dir`` (``--dataset-dir`` on the command line) and then from align's own
``datasets/dataset_info.json``. Files are read through HuggingFace ``datasets`` (json, jsonl, parquet,
csv, with its cache), and so are entries with an ``hf_hub_url`` (``datasets.load_dataset``, online or
from its cache); every row is converted by its format plugin into an
:class:`~align.conversation.Example`. A row that cannot be converted stops the load with its file and
row, or, with ``on_bad_row: skip``, is skipped and counted by reason. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
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
# Sources LLaMA-Factory can load and align cannot, with what to do instead.
_ELSEWHERE = {
    "ms_hub_url": (
        "ModelScope",
        "give the entry the dataset's `hf_hub_url` (most ModelScope datasets are on the Hugging Face Hub too), "
        "or download it (`modelscope download --dataset ID --local_dir DIR`) and give the entry a `file_name` "
        "relative to its dataset_dir",
    ),
    "om_hub_url": (
        "Modelers (openMind)",
        "give the entry the dataset's `hf_hub_url`, or download it and give the entry a `file_name` relative "
        "to its dataset_dir",
    ),
    "script_url": (
        "a dataset loading script",
        "datasets no longer runs loading scripts: save the data as json, jsonl, parquet or csv and give the "
        "entry a `file_name` relative to its dataset_dir",
    ),
    "cloud_file_name": (
        "cloud storage",
        "download the file (e.g. `aws s3 cp`, `gcloud storage cp`) and give the entry a `file_name` relative "
        "to its dataset_dir",
    ),
}


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
    #: The Hugging Face Hub dataset the rows come from (the entry's ``hf_hub_url``); ``path`` is then its
    #: copy in the ``datasets`` cache, so that a new revision changes the stage's fingerprint.
    hub: str | None = None
    subset: str | None = None  #: the hub dataset's configuration (``load_dataset``'s ``name``)
    folder: str | None = None  #: a folder of the hub repository (``load_dataset``'s ``data_dir``)

    @property
    def origin(self) -> str:
        """Where the rows come from, as error messages name it: the file, or the hub dataset and its split."""
        if self.hub is None:
            return str(self.path)
        parts = [f"subset '{self.subset}'"] if self.subset else []
        parts += [f"folder '{self.folder}'"] if self.folder else []
        return f"the hub dataset {self.hub} ({', '.join([*parts, f'split {self.split!r}'])})"


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
    hint = f"registries searched: {', '.join(str(d / REGISTRY_FILE) for d in dirs)}"
    if reference.count("/") == 1 and not reference.startswith((".", "/", "~")):  # reads like a hub id
        hint += (
            "; a dataset of the Hugging Face Hub is named through a registry entry: "
            f'{{"NAME": {{"hf_hub_url": "{reference}", "formatting": ..., "columns": ...}}}} '
            "in the dataset_info.json of the recipe's dataset_dir"
        )
    raise AlignError(
        f"data: '{reference}' is neither a registry entry nor a file{did_you_mean(reference, known)}", hint=hint
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
    columns = raw.get("columns") or {}
    multimodal = [c for c in MULTIMODAL_COLUMNS if c in columns]
    if multimodal:
        raise AlignError(f"{where} has {', '.join(multimodal)}: multimodal datasets are not supported")
    formatting = raw.get("formatting")  # none: the format that serves as the fallback (LLaMA-Factory's: alpaca)
    if formatting is None and set(columns) <= {"prompt"} and columns:
        raise AlignError(f"{where} is plain pre-training text; align's stages take conversations")
    for key in ("file_name", "hf_hub_url", "subset", "split", "folder"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise AlignError(f"{where}: `{key}` must be a non-empty string, got {raw[key]!r}")
    num_samples = raw.get("num_samples")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):  # bool is an int too
        raise AlignError(f"{where}: `num_samples` must be a whole number of rows, at least 1, got {num_samples!r}")
    entry = DatasetEntry(
        name=name,
        path=folder / REGISTRY_FILE,
        formatting=formatting,
        ranking=bool(raw.get("ranking", False)),
        columns=dict(columns),
        tags=dict(raw.get("tags") or {}),
        split=raw.get("split", "train"),
        num_samples=num_samples,
    )
    # A local file wins over the hub (LLaMA-Factory prefers the hub): it reads offline, always the same
    # rows, and "add a `file_name`" is then all it takes to pin a hub dataset to a downloaded copy.
    if "file_name" in raw:
        entry.path = folder / raw["file_name"]
        if "hf_hub_url" in raw and not entry.path.exists():
            raise AlignError(
                f"{where}: file_name {entry.path}: no such file",
                hint=f"the entry also names hf_hub_url '{raw['hf_hub_url']}'; align reads the `file_name` of an "
                "entry that has both: remove `file_name` to load the dataset from the Hugging Face Hub",
            )
        return entry
    if "hf_hub_url" in raw:
        entry.hub, entry.subset, entry.folder = _hub_id(raw["hf_hub_url"], where), raw.get("subset"), raw.get("folder")
        copy = _hub_split(entry, entry.hub, where)
        # Its cached Arrow file: what the rows are read from, hashed into the stage's fingerprint. Its folder
        # is named after the hub revision, so a new revision reruns the stage. (A copy kept in memory has
        # none: the registry file stands in.)
        files = [Path(f["filename"]) for f in copy.cache_files]
        if files:
            entry.path = files[0]
        return entry
    for key, (place, hint) in _ELSEWHERE.items():
        if key in raw:
            raise AlignError(
                f"{where} loads from {place} ({key} '{raw[key]}'); align reads local files and the Hugging Face "
                "Hub (`hf_hub_url`)",
                hint=hint,
            )
    raise AlignError(f"{where} names no data: give it a `file_name` (relative to its dataset_dir) or an `hf_hub_url`")


def _hub_id(url: str, where: str) -> str:
    """The repository id of an ``hf_hub_url`` (``org/name``); a pasted web address is turned back into one."""
    hub_id = url.strip().removeprefix("hf://datasets/")
    for prefix in ("https://huggingface.co/datasets/", "http://huggingface.co/datasets/", "huggingface.co/datasets/"):
        hub_id = hub_id.removeprefix(prefix)
    hub_id = hub_id.strip("/")
    if "://" in hub_id or hub_id.count("/") > 1:
        raise AlignError(
            f"{where}: hf_hub_url '{url}' is not a Hugging Face Hub dataset id",
            hint="write the repository id, `ORG/NAME` (as in https://huggingface.co/datasets/ORG/NAME); "
            "a subset goes in `subset`, a folder of the repository in `folder`",
        )
    return hub_id


# Hub datasets loaded in this process: resolve(), data_files() and the load itself each ask for one, and
# without network every ask would wait out the hub's retries again.
_HUB_COPIES: dict[tuple[Any, ...], Any] = {}


def _hub_split(entry: DatasetEntry, hub: str, where: str) -> Any:
    """The entry's split of its hub dataset ``hub`` (a ``datasets.Dataset``), loaded once per process."""
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    key = (hub, entry.subset, entry.folder, str(datasets.config.HF_DATASETS_CACHE), offline)
    if key not in _HUB_COPIES:
        datasets.disable_progress_bars()
        named = f"{where} loads the hub dataset '{hub}'" + (f" (subset '{entry.subset}')" if entry.subset else "")
        # Offline, datasets warns that it falls back to its cache: that is what offline means, not news.
        try:
            with _quiet(logging.ERROR, "datasets.load", "datasets.packaged_modules.cache.cache"):
                # Every split: datasets prepares them all anyway, and a wrong `split` can then name the others.
                _HUB_COPIES[key] = datasets.load_dataset(hub, entry.subset, data_dir=entry.folder)
        except Exception as error:  # datasets' errors name neither the registry nor its entry
            raise _hub_error(error, named, entry, offline) from None
        logger.debug("%s: %s", named, _HUB_COPIES[key])
    splits = _HUB_COPIES[key]
    if entry.split not in splits:
        raise AlignError(
            f"{where}: the hub dataset '{hub}' has no split '{entry.split}'{did_you_mean(entry.split, splits)}",
            hint=f"its splits: {', '.join(splits)}; set the entry's `split` (default `train`); to take the "
            "first rows only, use `num_samples`",
        )
    return splits[entry.split]


def _hub_error(error: Exception, named: str, entry: DatasetEntry, offline: bool) -> AlignError:
    from datasets.exceptions import DatasetNotFoundError

    detail = " ".join(str(error).split())  # datasets' messages span lines
    download = (
        "download it once online (run `align config RECIPE` with network access, and HF_HUB_OFFLINE and "
        "HF_DATASETS_OFFLINE unset: it lands in the datasets cache, HF_DATASETS_CACHE), or download the data "
        "and point the entry at a local `file_name` (it takes precedence over `hf_hub_url`)"
    )
    # Offline, or with the hub out of reach, datasets looks in its cache; a dataset cached under other
    # subsets only gets "Couldn't find cache ... for config".
    not_cached = "Couldn't find cache" in detail
    if isinstance(error, ConnectionError) or not_cached:
        missing = f"subset '{entry.subset}' is" if entry.subset and not_cached else "it is"
        cached = detail.partition("Available configs in the cache: ")[2].strip("[]").replace("'", "")
        if offline:
            why, hint = "offline mode is on (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1)", download
        else:
            reason = "" if not_cached else f" ({detail})"
            why = f"the Hugging Face Hub cannot be reached{reason}; HF_HUB_OFFLINE is not set"
            hint = f"{download}; with HF_HUB_OFFLINE=1, cached datasets load without waiting on the hub"
        cached_note = f" (cached: {cached})" if cached else ""
        return AlignError(f"{named}, but {missing} not in the local cache{cached_note}: {why}", hint=hint)
    if isinstance(error, DatasetNotFoundError):
        return AlignError(
            f"{named}, which the Hugging Face Hub does not have or does not let you read: {detail}",
            hint="check the entry's `hf_hub_url` (ORG/NAME, as in https://huggingface.co/datasets/ORG/NAME); for a "
            "gated or private dataset, accept its terms on its page and log in (`hf auth login`, or HF_TOKEN)",
        )
    # Online: "BuilderConfig 'x' not found" or "Config name is missing"; offline: "multiple ... configurations".
    subsets = ("BuilderConfig", "Config name is missing", "configurations in the cache")
    if isinstance(error, ValueError) and any(words in detail for words in subsets):
        subset = f" with subset '{entry.subset}'" if entry.subset else ""
        return AlignError(
            f"{named}, which cannot be read{subset}: {detail}",
            hint="set the entry's `subset` to one of the dataset's subsets (configs), listed on its hub page",
        )
    return AlignError(
        f"{named}, which cannot be loaded: {type(error).__name__}: {detail}", hint=download if offline else None
    )


def read_rows(entry: DatasetEntry, limit: int | None = None) -> list[dict[str, Any]]:
    """The dataset's rows as dicts, read through ``datasets`` (cached); errors name file and position.

    :param limit: read only the first this many rows.
    """
    if entry.hub is not None:
        rows = _hub_split(entry, entry.hub, f"dataset '{entry.name}'")
        return rows.select(range(min(limit, len(rows)))).to_list() if limit else rows.to_list()
    rows = _read_file(entry)
    return rows[:limit] if limit else rows


def _read_file(entry: DatasetEntry) -> list[dict[str, Any]]:
    path = entry.path
    if not path.is_file():
        raise AlignError(f"dataset '{entry.name}': {path}: no such file")
    _check_text(path)
    import datasets

    datasets.disable_progress_bars()
    builder = FILE_TYPES.get(path.suffix)
    if builder is None:
        raise AlignError(f"dataset '{entry.name}': {path}: unsupported file type; use {', '.join(FILE_TYPES)}")
    try:
        # Its "Failed to load JSON" is ours to report, below.
        with _quiet(logging.CRITICAL, "datasets.packaged_modules.json.json"):
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets' errors say little about where; find the place ourselves
        if builder == "json":
            return _read_json_by_hand(path, error)
        raise AlignError(f"dataset '{entry.name}': {path} cannot be read as {builder}: {error}") from None
    return loaded.to_list()


@contextlib.contextmanager
def _quiet(level: int, *names: str) -> Iterator[None]:
    """Raise the loggers ``names`` to ``level`` for the block, and put them back."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [found.level for found in loggers]
    for found in loggers:
        found.setLevel(level)
    try:
        yield
    finally:
        for found, previous in zip(loggers, saved, strict=True):
            found.setLevel(previous)


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
    rows = read_rows(entry, num_samples or entry.num_samples)
    report = LoadReport(entry.name, rows=len(rows))
    if not rows:
        raise AlignError(f"dataset '{entry.name}': {entry.origin} is empty")
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
                # a file names itself; a hub dataset's origin needs the registry name beside it
                source = entry.origin if entry.hub is None else f"dataset '{entry.name}': {entry.origin}"
                raise AlignError(
                    f"{source} row {index}: {bad.detail}",
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
            f"dataset '{entry.name}': the first row of {entry.origin} (columns {', '.join(first)}) matches {found}",
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
