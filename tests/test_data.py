"""Data: registries, format plugins, rendering and masks, and every way a dataset can be wrong."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from align import AlignError
from align.conversation import Example
from align.data import DataSource, apply_weight, dataset_dirs, load_examples, resolve, split_held_out
from align.plugin_manager import get_plugin_manager
from align.prepare import prepare
from align.render import IGNORE, Renderer, padding_waste
from conftest import EXTERNAL, LLAMA_FACTORY, needs_external


@pytest.fixture(scope="module")
def plugins():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def formats(plugins):
    return {name: entry.obj for name, entry in plugins.registry("dataset format").items()}


@pytest.fixture(scope="module")
def tokenizer(plugins, offline_caches):
    from transformers import AutoTokenizer

    from align.schema import build

    source = plugins.get("model source", "tiny-llama")
    return AutoTokenizer.from_pretrained(
        source.materialize(build(source.Config, {}, "model"), offline_caches / "models")
    )


def load(path: Path, formats, **kwargs):
    return load_examples(resolve(str(path), []), formats, **kwargs)


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE])


# ---------------------------------------------------------------------------------------------- registry


def test_the_builtin_registry_has_the_demo_datasets():
    for name in ("demo_sft", "demo_sft_sharegpt", "demo_pref", "demo_pref_sharegpt"):
        assert resolve(name, dataset_dirs(None)).path.is_file()


def test_an_unknown_dataset_name_suggests_the_nearest():
    with pytest.raises(
        AlignError, match=r"'demo_sfft' is neither a registry entry nor a file \(did you mean 'demo_sft'\?\)"
    ):
        resolve("demo_sfft", dataset_dirs(None))


def test_a_user_registry_is_searched_first(tmp_path):
    write_json(tmp_path / "mine.json", [{"instruction": "a", "output": "b"}])
    write_json(tmp_path / "dataset_info.json", {"demo_sft": {"file_name": "mine.json"}})
    assert resolve("demo_sft", dataset_dirs(str(tmp_path))).path == tmp_path / "mine.json"


def test_an_entry_from_a_hub_align_cannot_reach_is_refused_with_what_to_do(tmp_path):
    # hf_hub_url entries load (tests/test_hub_data.py); ModelScope's do not.
    write_json(tmp_path / "dataset_info.json", {"remote": {"ms_hub_url": "org/data"}})
    with pytest.raises(AlignError, match="entry 'remote' loads from ModelScope") as info:
        resolve("remote", [tmp_path])
    assert "give the entry the dataset's `hf_hub_url`" in str(info.value)
    assert "give the entry a `file_name`" in str(info.value)


def test_an_unknown_key_in_an_entry_suggests_the_nearest(tmp_path):
    write_json(tmp_path / "dataset_info.json", {"x": {"file_name": "x.json", "colums": {}}})
    with pytest.raises(AlignError, match=r"entry 'x' has the unknown key 'colums' \(did you mean 'columns'\?\)"):
        resolve("x", [tmp_path])


def test_an_invalid_registry_file_names_line_and_column(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"x": {"file_name": }}')
    with pytest.raises(AlignError, match=r"dataset_info.json: invalid JSON at line 1, column 21: Expecting value"):
        resolve("x", [tmp_path])


@needs_external
@pytest.mark.parametrize(
    "name",
    [
        "identity",
        "alpaca_en_demo",
        "alpaca_zh_demo",
        "glaive_toolcall_en_demo",
        "glaive_toolcall_zh_demo",
        "dpo_en_demo",
        "dpo_zh_demo",
    ],
)
def test_every_llama_factory_sft_and_preference_entry_loads_and_renders(name, formats, tokenizer):
    entry = resolve(name, dataset_dirs(str(LLAMA_FACTORY)))
    examples, loaded = load_examples(entry, formats)
    assert loaded.kept == loaded.rows > 0
    renderer = Renderer(tokenizer, max_length=32768)  # the tiny tokenizer spends many tokens on Chinese
    rows, report = (renderer.preference if entry.ranking else renderer.sft)(examples, name)
    assert report.kept == report.rows == loaded.rows and report.trained_tokens > 0
    if not entry.ranking:
        # Every assistant reply is trained on, and no user turn is.
        example, ids, labels = examples[0], rows["input_ids"][0], rows["labels"][0]
        trained = trained_text(tokenizer, ids, labels)
        for message in example.messages:
            if message["role"] == "assistant" and message["content"]:
                assert message["content"] in trained
            elif message["role"] == "user":
                assert message["content"] not in trained


@needs_external
@pytest.mark.parametrize(
    ("name", "why"),
    [("mllm_demo", "multimodal"), ("wiki_demo", "pre-training"), ("c4_demo", "pre-training")],
)
def test_llama_factory_entries_align_cannot_train_on_say_why(name, why):
    with pytest.raises(AlignError, match=why):
        resolve(name, dataset_dirs(str(LLAMA_FACTORY)))


@needs_external
def test_sharegpt_tool_calls_and_tools_become_openai_messages(formats):
    examples, _ = load_examples(resolve("glaive_toolcall_en_demo", [LLAMA_FACTORY]), formats)
    example = examples[0]
    call = next(m for m in example.messages if m.get("tool_calls"))
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "search_recipes"
    assert [m["role"] for m in example.messages].count("tool") == 1
    with_tools = next(e for e in examples if e.tools)
    assert with_tools.tools[0]["type"] == "function" and "name" in with_tools.tools[0]["function"]


@needs_external
def test_dpo_demo_system_turns_inside_the_conversation_are_kept(formats):
    examples, _ = load_examples(resolve("dpo_en_demo", [LLAMA_FACTORY]), formats)
    with_system = [e for e in examples if e.messages[0]["role"] == "system"]
    assert len(with_system) == 80
    assert all(e.is_preference and e.messages[-1]["role"] == "user" for e in examples)


# ---------------------------------------------------------------------------------------------- formats


def test_alpaca_joins_instruction_and_input_and_keeps_history_and_system(tmp_path, formats):
    row = {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be brief.", "history": [["hi", "hello"]]}
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"x": {"file_name": "x.json", "columns": {"system": "system", "history": "history"}}})
    )
    write_json(tmp_path / "x.json", [row])
    (example,), _ = load_examples(resolve("x", [tmp_path]), formats)
    assert example.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Sum\n1 2"},
        {"role": "assistant", "content": "3"},
    ]


def test_alpaca_and_sharegpt_preference_demos_give_the_same_pairs(formats):
    alpaca, _ = load_examples(resolve("demo_pref", dataset_dirs(None)), formats)
    sharegpt, _ = load_examples(resolve("demo_pref_sharegpt", dataset_dirs(None)), formats)
    assert [(e.messages, e.chosen, e.rejected) for e in alpaca] == [
        (e.messages, e.chosen, e.rejected) for e in sharegpt
    ]


@pytest.mark.parametrize("stem", ["demo_pref", "demo_pref_sharegpt"])
def test_a_preference_file_named_by_path_is_read_as_pairs_without_a_registry_entry(tmp_path, formats, stem):
    registered = resolve(stem, dataset_dirs(None))
    copy = write_json(tmp_path / "pairs.json", json.loads(registered.path.read_text(encoding="utf-8")))
    pairs, _ = load(copy, formats)  # its `chosen` and `rejected` columns say what `ranking: true` would
    assert [(e.messages, e.chosen, e.rejected) for e in pairs] == [
        (e.messages, e.chosen, e.rejected) for e in load_examples(registered, formats)[0]
    ]


def test_sharegpt_with_role_and_content_keys_is_read(tmp_path, formats):
    rows = [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (example,), _ = load(write_json(tmp_path / "c.json", rows), formats)
    assert example.messages[1] == {"role": "assistant", "content": "yo"}


def test_messages_preference_with_implicit_prompt(tmp_path, formats):
    prompt = [{"role": "user", "content": "Rate it"}]
    rows = [
        {
            "chosen": prompt + [{"role": "assistant", "content": "good"}],
            "rejected": prompt + [{"role": "assistant", "content": "bad"}],
        }
    ]
    (example,), _ = load(write_json(tmp_path / "p.json", rows), formats)
    assert example.messages == prompt and example.chosen["content"] == "good" and example.rejected["content"] == "bad"


def test_messages_preference_with_explicit_prompt_and_string_replies(tmp_path, formats):
    rows = [{"prompt": "Rate it", "chosen": "good", "rejected": "bad"}]
    (example,), _ = load(write_json(tmp_path / "p.jsonl", rows), formats, format_name="messages")
    assert example.messages == [{"role": "user", "content": "Rate it"}] and example.rejected["content"] == "bad"


def test_csv_and_parquet_files_load(tmp_path, formats):
    import datasets

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv")
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        examples, report = load(tmp_path / name, formats)
        assert report.kept == 5 and examples[4].messages[-1]["content"] == "a4"


@needs_external
def test_hh_transcripts_become_prompt_and_two_replies_and_odd_rows_are_counted(formats):
    path = EXTERNAL / "hh-rlhf" / "harmless-base_test.jsonl"
    examples, report = load(path, formats, on_bad_row="skip")
    assert report.rows == 2312
    # The 5 rows whose chosen and rejected part before the last reply (see NOTES.txt), and real defects:
    # 4 empty assistant replies, 4 transcripts with two Assistant turns in a row.
    assert report.skipped == {"preference_mismatch": 5, "empty_turn": 4, "turn_order": 4}
    assert report.kept == 2312 - 13
    first = examples[0]
    assert first.messages[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first.chosen["role"] == first.rejected["role"] == "assistant"
    with pytest.raises(AlignError, match=r"harmless-base_test.jsonl row 86: turn 3 \(assistant\) is empty"):
        load(path, formats)


@needs_external
def test_fastchat_and_axolotl_conversations_load(formats, tmp_path):
    examples, report = load(EXTERNAL / "fastchat" / "data__dummy_conversation.json", formats)
    assert report.kept == report.rows == 500
    one = json.loads((EXTERNAL / "axolotl" / "conversation.json").read_text())
    (example,), _ = load(write_json(tmp_path / "one.json", [one]), formats)
    assert [m["role"] for m in example.messages][:2] == ["user", "assistant"]


@needs_external
def test_axolotls_empty_turn_is_reported_by_row_and_turn(formats, tmp_path):
    broken = json.loads((EXTERNAL / "axolotl" / "conversation.missingturns.json").read_text())
    with pytest.raises(AlignError, match=r"row 0: turn 1 \(assistant\) is empty"):
        load(write_json(tmp_path / "missing.json", [broken]), formats)


@needs_external
def test_a_row_with_an_extra_key_loads(formats):
    examples, report = load(EXTERNAL / "alpaca-data-cleaned" / "gpteacher_toolformer-similarity-0.6.json", formats)
    assert report.kept == report.rows == 2396


# ---------------------------------------------------------------------------------------------- bad input


@needs_external
def test_the_real_invalid_json_file_is_named_with_its_position(formats):
    path = EXTERNAL / "malformed" / "mohtasham9_stanford_alpaca_alpaca_data_at_0c99edd.json"
    with pytest.raises(AlignError) as info:
        load(path, formats)
    assert str(info.value) == f"{path}: invalid JSON at line 5, column 19: Expecting value"


def test_invalid_json_lines_names_the_line(tmp_path, formats):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(AlignError, match=r"bad.jsonl line 2: invalid JSON"):
        load(path, formats)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], "row 1: the column 'output' is missing"),
        ([{"instruction": "a", "output": 3}], "row 0: the column 'output' must be a string, got int"),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}],
            "row 0: turn 1 has the role 'robot'; this dataset's roles are 'human', 'gpt'",
        ),
        (
            [{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}],
            "row 0: the conversation must start with a user turn",
        ),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}],
            "row 0: a user turn follows a user turn",
        ),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]}],
            "row 0: turn 1 (assistant) is empty",
        ),
        ([{"conversations": []}], "row 0: the conversation has no turns"),
        ([{"conversations": [{"from": "human", "value": "a"}]}], "row 0: the conversation has no assistant turn"),
        (
            [{"conversations": [{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}]}],
            "row 0: turn 0 (human): its 'value' is of type list, not a string",
        ),
        ([{"conversations": "hello"}], "row 0: the column 'conversations' must be a list, got str"),
    ],
    ids=[
        "missing-column",
        "wrong-type",
        "unknown-role",
        "starts-with-assistant",
        "turn-order",
        "empty-turn",
        "empty-conversation",
        "no-assistant",
        "content-not-string",
        "messages-not-list",
    ],
)
def test_a_bad_row_stops_the_load_naming_file_row_and_problem(tmp_path, formats, rows, message):
    path = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(AlignError) as info:
        load(path, formats)
    assert f"{path} {message}" in str(info.value)
    assert "on_bad_row: skip" in str(info.value)


def test_skip_leaves_bad_rows_out_and_counts_them_by_reason(tmp_path, formats):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "a"},
        {"instruction": "a", "output": ""},
        {"instruction": "c", "output": "d"},
        {"output": "x"},
    ]
    examples, report = load(write_json(tmp_path / "mixed.json", rows), formats, on_bad_row="skip")
    assert len(examples) == 2
    assert report.skipped == {"missing_column": 2, "empty_turn": 1}
    assert report.describe() == "mixed: read 5 rows, converted 2 (skipped 3: 2 missing_column, 1 empty_turn)"


def test_an_empty_dataset_is_an_error(tmp_path, formats):
    with pytest.raises(AlignError, match="is empty"):
        load(write_json(tmp_path / "empty.json", []), formats)


def test_a_dataset_with_only_bad_rows_is_an_error_even_when_skipping(tmp_path, formats):
    with pytest.raises(AlignError, match="none of its 1 rows could be read"):
        load(write_json(tmp_path / "bad.json", [{"instruction": "a"}]), formats, on_bad_row="skip")


def test_an_unknown_format_lists_the_known_ones(tmp_path, formats):
    path = write_json(tmp_path / "d.json", [{"instruction": "a", "output": "b"}])
    with pytest.raises(AlignError) as info:
        load(path, formats, format_name="alpacca")
    assert "unknown format 'alpacca' (did you mean 'alpaca'?)" in str(info.value)
    assert "known formats: alpaca, hh, messages, mt_bench, sharegpt" in str(info.value)


def test_a_file_no_format_recognises_asks_for_one(tmp_path, formats):
    path = write_json(tmp_path / "d.json", [{"question": "a", "answer": "b"}])
    with pytest.raises(AlignError, match=r"columns question, answer\) matches no known format"):
        load(path, formats)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path, formats):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(
        '{"instruction": "a", "output": "b"}\n{"instruction": "caf\u00e9", "output": "b"}\n'.encode("latin-1")
    )
    with pytest.raises(AlignError, match=r"latin.jsonl line 2: not UTF-8 text"):
        load(path, formats)


def test_rows_of_mixed_types_are_reported_by_row(tmp_path, formats):
    path = write_json(
        tmp_path / "mixed.json", [{"instruction": "a", "output": "b"}, {"instruction": ["x"], "output": "b"}]
    )
    with pytest.raises(AlignError, match=r"mixed.json row 1: the column 'instruction' must be a string, got list"):
        load(path, formats)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(AlignError, match=r"gone.json: no such file"):
        resolve(str(tmp_path / "gone.json"), [])


# ---------------------------------------------------------------------------------------------- rendering


def conversation(*turns: str) -> Example:
    roles = ["user", "assistant"] * len(turns)
    return Example([{"role": role, "content": text} for role, text in zip(roles, turns, strict=False)])


def test_every_assistant_turn_and_only_those_carries_loss(tokenizer):
    renderer = Renderer(tokenizer, max_length=512)
    rows, report = renderer.sft([conversation("Hi there", "Hello friend", "Review it", "Great film")], "t")
    assert (
        trained_text(tokenizer, rows["input_ids"][0], rows["labels"][0]) == "Hello friend<|im_end|>Great film<|im_end|>"
    )
    assert report.trained_tokens == sum(1 for label in rows["labels"][0] if label != IGNORE)


def test_masks_agree_with_the_templates_generation_markers(tokenizer):
    """The tiny model's template marks replies with {% generation %}: transformers' mask must agree."""
    example = conversation("Hi there", "Hello friend", "Review it", "Great film")
    rows, _ = Renderer(tokenizer, max_length=512).sft([example], "t")
    reference = tokenizer.apply_chat_template(
        example.messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert rows["input_ids"][0] == reference["input_ids"]
    ours = [label != IGNORE for label in rows["labels"][0]]
    assert ours == [bool(m) for m in reference["assistant_masks"]]


def test_long_conversations_lose_their_oldest_exchanges_first(tokenizer):
    long = conversation(*(["word " * 30] * 6), "last question", "last answer")
    renderer = Renderer(tokenizer, max_length=120)
    rows, report = renderer.sft([long], "t")
    assert report.history_truncated == 1 and report.kept == 1
    trained = trained_text(tokenizer, rows["input_ids"][0], rows["labels"][0])
    assert trained.endswith("last answer<|im_end|>") and len(rows["input_ids"][0]) <= 120


def test_a_final_exchange_longer_than_max_length_is_dropped_and_counted(tokenizer):
    rows, report = Renderer(tokenizer, max_length=20).sft(
        [conversation("q", "word " * 50), conversation("q", "a")], "t"
    )
    assert report.kept == 1 and report.dropped == {"too_long": 1}
    assert "dropped 1 too_long" in report.describe()


def test_preference_pairs_share_the_prompt_and_keep_replies_apart(tokenizer):
    pair = Example(
        [{"role": "user", "content": "Review it"}],
        chosen={"role": "assistant", "content": "Great"},
        rejected={"role": "assistant", "content": "Awful"},
    )
    rows, report = Renderer(tokenizer, max_length=64).preference([pair], "p")
    assert tokenizer.decode(rows["prompt_ids"][0]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(rows["chosen_ids"][0]) == "Great<|im_end|>"
    assert tokenizer.decode(rows["rejected_ids"][0]) == "Awful<|im_end|>"


def test_a_tokenizer_without_chat_template_needs_one(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(AlignError, match="has no chat template"):
        Renderer(bare, 64)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows, _ = Renderer(bare, 64, chat_template=template).sft([conversation("hi", "yo")], "t")
    assert tokenizer.decode(rows["input_ids"][0]) == "user: hi\nassistant: yo\n"


def test_padding_waste_counts_padding_in_order():
    assert padding_waste([4, 4, 4, 4], 2) == 0.0
    assert padding_waste([2, 4, 4, 4], 2) == pytest.approx(2 / 16)


# ---------------------------------------------------------------------------------------------- mixtures


def test_weights_repeat_or_sample_rows():
    assert apply_weight([1, 2, 3, 4], 2.0, 0) == [1, 2, 3, 4, 1, 2, 3, 4]
    half = apply_weight([1, 2, 3, 4], 0.5, 0)
    assert len(half) == 2 and set(half) <= {1, 2, 3, 4}


def test_held_out_rows_are_a_seeded_fraction_or_count():
    rows = [conversation(str(i), "a") for i in range(100)]
    train, held = split_held_out(rows, 0.1, seed=3)
    assert len(train) == 90 and len(held) == 10
    assert split_held_out(rows, 0.1, seed=3)[1] == held
    assert len(split_held_out(rows, 7, seed=3)[1]) == 7
    with pytest.raises(AlignError, match="leaves no training rows"):
        split_held_out(rows, 100, seed=3)


def test_a_mixture_is_weighted_and_keeps_each_datasets_held_out_rows_apart(plugins, tokenizer):
    mixture = [DataSource("demo_sft", weight=2.0, eval_size=16), DataSource("demo_sft_sharegpt", weight=0.5)]
    prepared = prepare(mixture, Renderer(tokenizer, 512), plugins, kind="conversations", seed=1)
    assert len(prepared.train["input_ids"]) == 2 * (256 - 16) + 64
    assert list(prepared.held_out) == ["demo_sft"] and len(prepared.held_out["demo_sft"]["input_ids"]) == 16
    summary = prepared.summary()
    assert [r["dataset"] for r in summary["rendered"]] == ["demo_sft", "demo_sft (held out)", "demo_sft_sharegpt"]


def test_the_report_says_how_many_held_out_rows_survived_rendering(plugins, tokenizer):
    def held_out(max_length: int):
        data = [DataSource("demo_sft", eval_size=32)]
        prepared = prepare(data, Renderer(tokenizer, max_length), plugins, kind="conversations")
        (report,) = [r for r in prepared.summary()["rendered"] if r["dataset"] == "demo_sft (held out)"]
        return prepared, report

    prepared, report = held_out(50)  # held out before rendering: some do not fit
    assert report["rows"] == 32 and 0 < report["kept"] < 32 and report["dropped"] == {"too_long": 32 - report["kept"]}
    assert len(prepared.held_out["demo_sft"]["input_ids"]) == report["kept"]
    prepared, report = held_out(40)  # none fits: nothing to evaluate on, rather than an empty evaluation set
    assert report["kept"] == 0 and "demo_sft" not in prepared.held_out


def test_preference_data_in_an_sft_stage_is_an_error_that_says_so(plugins, tokenizer):
    with pytest.raises(AlignError, match="'demo_pref' holds preferences, but this stage trains on conversations"):
        prepare("demo_pref", Renderer(tokenizer, 512), plugins, kind="conversations")


PLAIN_TEMPLATE = (  # renders each turn's content and nothing else: tool calls vanish
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}


def weather(i: int) -> list[dict]:
    return [
        {"role": "user", "content": f"Weather in Oslo? ({i})"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "12 C"},
        {"role": "assistant", "content": "It is 12 C."},
    ]


def reply(text: str, calls: list | None = None) -> dict:
    return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


@pytest.mark.parametrize(
    ("render", "rows"),
    [
        ("sft", [Example(weather(i)) for i in range(3)]),
        # a preference pair whose history holds the call, and pairs whose chosen reply makes it
        ("preference", [Example(weather(0)[:-1], chosen=reply("12 C."), rejected=reply("Cold."))]),
        (
            "preference",
            [Example(weather(i)[:1], chosen=reply("", [CALL]), rejected=reply("No idea.")) for i in range(2)],
        ),
        ("feedback", [Example(weather(i)[:2], label=True) for i in range(2)]),
        ("prompts", [Example(weather(i)[:3]) for i in range(2)]),
    ],
    ids=["sft", "preference-history", "preference-reply", "feedback", "prompts"],
)
def test_tool_calls_a_chat_template_cannot_render_are_an_error_naming_the_dataset_and_count(tokenizer, render, rows):
    _, report = getattr(Renderer(tokenizer, 512), render)(rows, "weather")  # tiny-llama's ChatML renders them
    assert report.kept == len(rows)
    plain = Renderer(copy.deepcopy(tokenizer), 512, PLAIN_TEMPLATE)  # the renderer sets the template it is given
    calls = sum(len(m.get("tool_calls") or []) for e in rows for m in [*e.messages, e.chosen or {}, e.rejected or {}])
    expected = rf"'weather': the chat template leaves out {calls} tool calls in {len(rows)} rows"
    with pytest.raises(AlignError, match=expected) as error:
        getattr(plain, render)(rows, "weather")
    assert "chat_template" in error.value.hint
