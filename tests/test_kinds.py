"""Data kinds: each stage takes one, formats produce them, and rows of one kind can become another."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from align import AlignError, hookimpl
from align.conversation import Example
from align.data import DataSource, dataset_dirs, load_examples, resolve
from align.kinds import DataKind
from align.plugin_manager import get_plugin_manager
from align.prepare import prepare
from align.render import Renderer
from conftest import LLAMA_FACTORY, needs_external, tiny_llama


@pytest.fixture(scope="module")
def plugins():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def renderer(offline_caches):
    from transformers import AutoTokenizer

    return Renderer(AutoTokenizer.from_pretrained(tiny_llama()), max_length=1024)


def test_the_contracts_kinds_are_registered(plugins):
    assert sorted(plugins.registry("data kind")) == ["conversations", "feedback", "preferences", "prompts"]


@needs_external
def test_llama_factorys_kto_demo_loads_and_renders_as_feedback(plugins, renderer):
    long = Renderer(renderer.tokenizer, max_length=16384)  # the tiny tokenizer spends many tokens per word
    prepared = prepare("kto_en_demo", long, plugins, kind="feedback", dataset_dir=str(LLAMA_FACTORY))
    train = prepared.train
    assert len(train["label"]) == 300 and Counter(train["label"]) == {True: 150, False: 150}
    rows = json.loads((LLAMA_FACTORY / "kto_en_demo.json").read_text())
    tokenizer = renderer.tokenizer
    assert rows[0]["messages"][-1]["content"] in tokenizer.decode(train["completion_ids"][0])
    assert rows[0]["messages"][0]["content"] in tokenizer.decode(train["prompt_ids"][0])
    assert train["label"][0] is rows[0]["label"]


@needs_external
def test_the_kto_demo_is_not_read_as_sft_rows_with_its_label_dropped(plugins, renderer):
    with pytest.raises(AlignError, match="'kto_en_demo' holds feedback, but this stage trains on conversations"):
        prepare("kto_en_demo", renderer, plugins, kind="conversations", dataset_dir=str(LLAMA_FACTORY))


def test_preference_pairs_feed_a_feedback_stage_one_desirable_and_one_undesirable_row_each(plugins, renderer):
    pairs = prepare("demo_pref", renderer, plugins, kind="preferences")
    feedback = prepare("demo_pref", renderer, plugins, kind="feedback")
    count = len(pairs.train["prompt_ids"])
    assert len(feedback.train["label"]) == 2 * count
    assert feedback.train["label"][:4] == [True, False, True, False]
    assert feedback.train["prompt_ids"][0] == pairs.train["prompt_ids"][0]
    assert feedback.train["completion_ids"][0] == pairs.train["chosen_ids"][0]
    assert feedback.train["completion_ids"][1] == pairs.train["rejected_ids"][0]


def test_pairs_are_held_out_whole_before_they_become_feedback(plugins, renderer):
    feedback = prepare([DataSource("demo_pref", eval_size=10)], renderer, plugins, kind="feedback")
    held, train = feedback.held_out["demo_pref"], feedback.train
    assert len(held["label"]) == 20 and len(train["label"]) == 2 * (256 - 10)
    for rows in (held, train):  # each pair's two rows stay side by side, on one side of the split
        assert rows["label"][0::2] == [True] * (len(rows["label"]) // 2)
        assert rows["prompt_ids"][0::2] == rows["prompt_ids"][1::2]


def test_prompts_keep_the_rows_other_columns(plugins, renderer, tmp_path):
    path = tmp_path / "maths.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prepared = prepare(str(path), renderer, plugins, kind="prompts")
    assert prepared.train["columns"] == [{"answer": "0"}, {"answer": "2"}, {"answer": "4"}]


def test_conversations_become_prompts_without_their_last_reply(plugins, renderer):
    prepared = prepare("demo_sft", renderer, plugins, kind="prompts")
    text = renderer.tokenizer.decode(prepared.train["prompt_ids"][0])
    assert text.rstrip().endswith("assistant")  # the cue for a reply, and no reply


def test_a_kto_tag_that_is_not_a_boolean_names_file_and_row(plugins, tmp_path):
    (tmp_path / "data.json").write_text(
        json.dumps(
            [
                {"instruction": "a", "output": "b", "good": True},
                {"instruction": "c", "output": "d", "good": "maybe"},
            ]
        )
    )
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {
                "mine": {
                    "file_name": "data.json",
                    "columns": {"prompt": "instruction", "response": "output", "kto_tag": "good"},
                }
            }
        )
    )
    formats = {name: e.obj for name, e in plugins.registry("dataset format").items()}
    with pytest.raises(AlignError, match=r"data.json row 1: the column 'good' \(kto_tag\) must be true or false"):
        load_examples(resolve("mine", dataset_dirs(str(tmp_path))), formats)


def test_a_plugin_adds_a_kind_and_a_stage_can_take_it(renderer):
    class Replies(DataKind):
        """Only the assistant's replies, as plain text to continue (a kind a plugin could add)."""

        name = "replies"
        help = "assistant replies alone"

        def holds(self, example: Example) -> bool:
            return False

        def convert(self, example: Example) -> list[Example] | None:
            replies = [m for m in example.messages if m["role"] == "assistant"]
            return [Example([{"role": "user", "content": "continue"}, r]) for r in replies] or None

        def render(self, renderer, examples, name):
            return renderer.sft(examples, name)

    class Plugin:
        @hookimpl
        def align_register_data_kinds(self):
            return [Replies()]

    pm = get_plugin_manager()
    pm.add_plugin(Plugin(), "replies-plugin")
    prepared = prepare("demo_sft", renderer, pm, kind="replies")
    assert len(prepared.train["input_ids"]) == 256
    with pytest.raises(AlignError, match="unknown data kind 'replys' \\(did you mean 'replies'\\?\\)"):
        prepare("demo_sft", renderer, pm, kind="replys")
