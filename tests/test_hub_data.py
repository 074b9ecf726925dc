"""Registry entries with `hf_hub_url`: loaded through `datasets.load_dataset`, offline from its cache.

Nothing is downloaded: :func:`publish` leaves in a temporary datasets cache what an online
``load_dataset(hub_id, subset)`` leaves there (the Arrow files of every split, under
``ORG___NAME/SUBSET/0.0.0/REVISION``), built by the same ``datasets`` code the hub loader uses; with
HF_HUB_OFFLINE=1, ``load_dataset`` then finds it exactly as it finds a real download.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from align import AlignError
from align.data import dataset_dirs, load_examples, resolve
from align.plugin_manager import get_plugin_manager
from align.render import Renderer
from conftest import LLAMA_FACTORY, needs_external, run_align

REVISION = "4f3c9a1d2b7e8f6a5c4d3e2f1a0b9c8d7e6f5a4b"  # the hub commit the cached copy was made from
ALPACA = [{"instruction": f"Name the number {i}.", "input": "", "output": f"It is {i}."} for i in range(6)]
HELD_OUT = [{"instruction": f"Spell {i}.", "input": "", "output": f"{i} is spelled out."} for i in range(3)]
# LLaMA-Factory's dpo_mix_en form: sharegpt turns, and the two replies as single turns.
PAIRS = [
    {
        "conversations": [{"from": "human", "value": f"Is {i} even?"}],
        "chosen": {"from": "gpt", "value": "Yes." if i % 2 == 0 else "No."},
        "rejected": {"from": "gpt", "value": "No." if i % 2 == 0 else "Yes."},
    }
    for i in range(5)
]
REGISTRY = {
    "numbers": {
        "hf_hub_url": "some-org/some-data",
        "subset": "en",
        "split": "validation",
        "num_samples": 2,
        "columns": {"prompt": "instruction", "query": "input", "response": "output"},
    },
    "parity_pairs": {
        "hf_hub_url": "some-org/Parity-Pairs",
        "ms_hub_url": "modelscope-org/parity-pairs",  # ignored: the Hugging Face Hub id is used
        "ranking": True,
        "formatting": "sharegpt",
        "num_samples": 4,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
}


def publish(
    cache: Path, hub_id: str, subsets: dict[str | None, dict[str, list[dict[str, Any]]]], revision: str = REVISION
) -> None:
    """Leave in the datasets cache ``cache`` what ``load_dataset(hub_id, subset)`` leaves after loading
    ``subsets`` (subset, or None for a dataset without subsets → split → rows) from the hub: the hub
    loader's builder configurations (one per subset, data files by split), prepared as Arrow files."""
    import datasets
    from datasets.load import configure_builder_class, create_builder_configs_from_metadata_configs, import_main_class
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from datasets.utils.metadata import MetadataConfigs

    datasets.disable_progress_bars()
    org, name = hub_id.split("/")
    repository = cache.parent / "repositories" / hub_id  # the repository's files, as the hub serves them
    configs = {}
    for subset, splits in subsets.items():
        files = []
        for split, rows in splits.items():
            path = repository / (subset or "data") / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            files.append({"split": split, "path": str(path.relative_to(repository))})
        configs[subset or "default"] = {"data_files": files}
    module = _PACKAGED_DATASETS_MODULES["json"][0]
    builder_configs, default = create_builder_configs_from_metadata_configs(
        module, MetadataConfigs(configs), base_path=str(repository)
    )
    dataset_name = camelcase_to_snakecase(name)
    builder_class = configure_builder_class(
        import_main_class(module), builder_configs, default_config_name=default, dataset_name=dataset_name
    )
    for config in configs:
        builder = builder_class(
            config_name=config,
            dataset_name=dataset_name,
            hash=revision,
            base_path=str(repository),
            cache_dir=str(cache),
        )
        builder.download_and_prepare()
        # Online, the builder also knows the repository id, which puts its organization in the folder name
        # (it then wants hf:// data files, so it is left out here and the folder moved).
        version = Path(builder.cache_dir).relative_to(cache / dataset_name)  # SUBSET/0.0.0/REVISION
        target = cache / f"{org}___{dataset_name}" / version
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(builder.cache_dir, target)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline datasets cache holding some-org/some-data (subsets en and zh) and some-org/Parity-Pairs,
    for this process (datasets reads its settings once, at import) and for `align` subprocesses."""
    import datasets

    import align.data

    cache = tmp_path / "hf_datasets"
    publish(cache, "some-org/some-data", {"en": {"train": ALPACA, "validation": HELD_OUT}, "zh": {"train": ALPACA}})
    publish(cache, "some-org/Parity-Pairs", {None: {"train": PAIRS}})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(align.data, "_HUB_COPIES", {})  # nothing loaded by an earlier test's cache
    return cache


@pytest.fixture(scope="module")
def formats():
    return {name: entry.obj for name, entry in get_plugin_manager().registry("dataset format").items()}


def registry(folder: Path, entries: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder


def refusal(folder: Path, name: str) -> str:
    with pytest.raises(AlignError) as info:
        resolve(name, [folder])
    return str(info.value)


# ------------------------------------------------------------------------------------------------ loading


def test_an_alpaca_hub_entry_loads_its_subset_split_and_first_num_samples_rows(hub_cache, tmp_path, formats):
    entry = resolve("numbers", [registry(tmp_path / "data", REGISTRY)])
    examples, report = load_examples(entry, formats)
    assert (report.rows, report.kept) == (2, 2)  # num_samples: the first 2 rows of the 3, not a sample
    assert [e.messages for e in examples] == [
        [{"role": "user", "content": f"Spell {i}."}, {"role": "assistant", "content": f"{i} is spelled out."}]
        for i in range(2)
    ]
    # The rows are read from the cached copy of that revision: what the stage's fingerprint hashes.
    assert entry.path.is_file() and entry.path.is_relative_to(hub_cache) and REVISION in entry.path.parts
    assert "some-org___some-data" in entry.path.parts and "en" in entry.path.parts


def test_a_stage_num_samples_overrides_the_entry_and_more_rows_than_there_are_takes_them_all(
    hub_cache, tmp_path, formats
):
    entry = resolve("numbers", [registry(tmp_path / "data", REGISTRY)])
    assert load_examples(entry, formats, num_samples=1)[1].rows == 1
    assert load_examples(entry, formats, num_samples=50)[1].rows == len(HELD_OUT)  # never repeated


def test_a_ranked_sharegpt_hub_entry_renders_as_preference_pairs(hub_cache, tmp_path, formats):
    from transformers import AutoTokenizer

    from conftest import tiny_llama

    entry = resolve("parity_pairs", [registry(tmp_path / "data", REGISTRY)])
    assert entry.hub == "some-org/Parity-Pairs"  # the Hugging Face id wins over the ModelScope one
    examples, report = load_examples(entry, formats)
    assert report.kept == 4 and examples[1].chosen["content"] == "No."
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama())
    rows, rendered = Renderer(tokenizer, max_length=256).preference(examples, "parity_pairs")
    assert rendered.kept == 4 and len(rows["chosen_ids"]) == 4
    assert "Is 1 even?" in tokenizer.decode(rows["prompt_ids"][1])
    assert "No." in tokenizer.decode(rows["chosen_ids"][1]) and "Yes." in tokenizer.decode(rows["rejected_ids"][1])


def test_a_bad_row_of_a_hub_dataset_names_the_entry_the_hub_id_and_the_row(hub_cache, tmp_path, formats):
    entry = resolve("numbers", [registry(tmp_path / "data", {"numbers": {**REGISTRY["numbers"], "split": "train"}})])
    entry.columns["response"] = "missing"  # every row now lacks its reply
    with pytest.raises(AlignError) as info:
        load_examples(entry, formats)
    message = str(info.value)
    assert message.startswith(
        "dataset 'numbers': the hub dataset some-org/some-data (subset 'en', split 'train') row 0:"
    )
    assert "on_bad_row: skip" in message


def test_a_local_file_name_wins_over_hf_hub_url_and_reads_without_the_hub(tmp_path, formats):
    folder = registry(tmp_path / "data", {"mine": {"file_name": "rows.json", "hf_hub_url": "some-org/not-cached"}})
    (folder / "rows.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    entry = resolve("mine", [folder])
    assert entry.hub is None and entry.path == folder / "rows.json"
    assert load_examples(entry, formats)[1].kept == len(ALPACA)


def test_a_missing_file_name_beside_hf_hub_url_says_which_one_align_reads(tmp_path):
    folder = registry(tmp_path / "data", {"mine": {"file_name": "gone.json", "hf_hub_url": "some-org/some-data"}})
    message = refusal(folder, "mine")
    assert "entry 'mine': file_name" in message and "gone.json: no such file" in message
    assert "remove `file_name` to load the dataset from the Hugging Face Hub" in message


def test_a_hub_web_address_reads_as_its_repository_id(hub_cache, tmp_path):
    entry = {**REGISTRY["numbers"], "hf_hub_url": "https://huggingface.co/datasets/some-org/some-data/"}
    assert resolve("numbers", [registry(tmp_path / "data", {"numbers": entry})]).hub == "some-org/some-data"


# ------------------------------------------------------------------------------------------------ refusals


def test_a_hub_dataset_missing_from_the_cache_offline_names_entry_hub_id_and_the_offline_switch(hub_cache, tmp_path):
    folder = registry(tmp_path / "data", {"elsewhere": {"hf_hub_url": "other-org/never-downloaded"}})
    message = refusal(folder, "elsewhere")
    assert f"{folder / 'dataset_info.json'}: entry 'elsewhere'" in message
    assert "'other-org/never-downloaded'" in message and "not in the local cache" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "download it once online" in message and "local `file_name`" in message


def test_a_subset_missing_from_the_cache_offline_names_the_cached_ones(hub_cache, tmp_path):
    folder = registry(tmp_path / "data", {"fr": {"hf_hub_url": "some-org/some-data", "subset": "fr"}})
    message = refusal(folder, "fr")
    assert "subset 'fr' is not in the local cache (cached: en, zh)" in message and "HF_HUB_OFFLINE" in message


def test_an_unknown_split_names_the_dataset_splits(hub_cache, tmp_path):
    entry = {"hf_hub_url": "some-org/some-data", "subset": "en", "split": "valid"}
    message = refusal(registry(tmp_path / "data", {"numbers": entry}), "numbers")
    assert "entry 'numbers': the hub dataset 'some-org/some-data' has no split 'valid'" in message
    assert "(did you mean 'validation'?)" in message and "its splits: train, validation" in message


def test_a_dataset_with_subsets_but_an_entry_without_one_asks_for_the_subset(hub_cache, tmp_path):
    message = refusal(registry(tmp_path / "data", {"numbers": {"hf_hub_url": "some-org/some-data"}}), "numbers")
    assert "entry 'numbers' loads the hub dataset 'some-org/some-data'" in message
    assert "set the entry's `subset`" in message


@pytest.mark.parametrize(
    ("key", "value", "says", "hint"),
    [
        ("ms_hub_url", "AI-ModelScope/adgen", "loads from ModelScope (ms_hub_url 'AI-ModelScope/adgen')", "hf_hub_url"),
        ("om_hub_url", "openmind/data", "loads from Modelers (openMind)", "hf_hub_url"),
        ("script_url", "my_script", "loads from a dataset loading script", "save the data as json"),
        ("cloud_file_name", "s3://bucket/rows.json", "loads from cloud storage", "download the file"),
    ],
)
def test_sources_align_cannot_read_are_refused_with_what_to_do(tmp_path, key, value, says, hint):
    message = refusal(registry(tmp_path / "data", {"remote": {key: value}}), "remote")
    assert "entry 'remote' " + says in message
    assert hint in message and "`file_name`" in message


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"hf_hub_url": "https://example.com/org/data"}, "is not a Hugging Face Hub dataset id"),
        ({"hf_hub_url": "org/data/extra"}, "is not a Hugging Face Hub dataset id"),
        ({"hf_hub_url": ""}, "`hf_hub_url` must be a non-empty string"),
        ({"hf_hub_url": "org/data", "subset": 3}, "`subset` must be a non-empty string"),
        ({"hf_hub_url": "org/data", "num_samples": 0}, "`num_samples` must be a whole number of rows, at least 1"),
        ({"file_name": "x.json", "num_samples": -5}, "`num_samples` must be a whole number of rows, at least 1"),
        ({"formatting": "alpaca"}, "names no data: give it a `file_name`"),
    ],
)
def test_malformed_hub_fields_are_refused_before_any_load(tmp_path, entry, says):
    assert says in refusal(registry(tmp_path / "data", {"bad": entry}), "bad")


def test_a_hub_id_given_as_data_says_how_to_register_it(tmp_path):
    with pytest.raises(AlignError, match="neither a registry entry nor a file") as info:
        resolve("some-org/some-data", dataset_dirs(str(tmp_path)))
    assert '"hf_hub_url": "some-org/some-data"' in str(info.value)


@needs_external
def test_every_llama_factory_hub_entry_loads_or_says_why_not_offline(tmp_path, monkeypatch):
    """LLaMA-Factory's own registry, with nothing cached: each hub entry is refused by name, never with
    a datasets traceback (multimodal, pre-training text, ModelScope only, or not downloaded)."""
    import datasets

    import align.data

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(align.data, "_HUB_COPIES", {})
    entries = json.loads((LLAMA_FACTORY / "dataset_info.json").read_text(encoding="utf-8"))
    remote = [name for name, entry in entries.items() if "file_name" not in entry]
    assert len(remote) >= 80
    reasons = {}
    for name in remote:
        with pytest.raises(AlignError) as info:
            resolve(name, [LLAMA_FACTORY])
        message = str(info.value)
        assert f"entry '{name}'" in message
        reasons[name] = next(
            why for why in ("multimodal", "pre-training", "ModelScope", "not in the local cache") if why in message
        )
    assert reasons["alpaca_en"] == reasons["dpo_mix_en"] == "not in the local cache"
    assert reasons["llava_1k_en"] == "multimodal" and reasons["refinedweb"] == "pre-training"


# ---------------------------------------------------------------------------------------------- recipes

RECIPE = """\
model: tiny-llama
dataset_dir: {data}
stages:
  sft: {{plugin: sft, data: numbers, max_steps: 2, batch_size: 2, logging_steps: 1}}
  dpo: {{plugin: dpo, data: parity_pairs, max_steps: 1, batch_size: 2}}
"""


def test_align_config_checks_hub_entries_from_the_cache(hub_cache, tmp_path):
    data = registry(tmp_path / "data", REGISTRY)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data), encoding="utf-8")
    result = run_align("config", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_align_config_refuses_a_hub_dataset_that_is_not_cached_offline(hub_cache, tmp_path):
    entries = {**REGISTRY, "parity_pairs": {**REGISTRY["parity_pairs"], "hf_hub_url": "other-org/never-downloaded"}}
    data = registry(tmp_path / "data", entries)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data), encoding="utf-8")  # the later stage's data is the one missing
    result = run_align("config", str(recipe))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{data / 'dataset_info.json'}: entry 'parity_pairs'" in result.stderr
    assert "'other-org/never-downloaded'" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_align_config_refuses_a_modelscope_entry(tmp_path):
    data = registry(tmp_path / "data", {"numbers": {"ms_hub_url": "AI-ModelScope/numbers"}, "parity_pairs": {}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data), encoding="utf-8")
    result = run_align("config", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "entry 'numbers' loads from ModelScope" in result.stderr and "hint:" in result.stderr


@pytest.mark.slow
def test_an_sft_stage_trains_on_a_hub_dataset_and_reruns_from_the_cache(hub_cache, tmp_path):
    data = registry(tmp_path / "data", REGISTRY)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            model: tiny-llama
            dataset_dir: {data}
            stages:
              sft: {{plugin: sft, data: numbers, max_steps: 2, batch_size: 2, logging_steps: 1}}
            """
        ),
        encoding="utf-8",
    )
    run_dir = tmp_path / "run"
    first = run_align("run", str(recipe), "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    loaded = json.loads((run_dir / "logs" / "sft.data.json").read_text())["loaded"]
    assert loaded == [{"dataset": "numbers", "rows": 2, "kept": 2, "skipped": {}}]
    again = run_align("run", str(recipe), "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/1] sft: cached" in again.stderr
    # A new revision on the hub, downloaded since: the stage's data changed, so it trains again.
    changed = {"en": {"train": ALPACA, "validation": HELD_OUT[::-1]}}
    publish(hub_cache, "some-org/some-data", changed, revision="9" * 40)
    third = run_align("run", str(recipe), "--run-dir", str(run_dir))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[1/1] sft: cached" not in third.stderr
