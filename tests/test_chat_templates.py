"""Chat templates by name: the built-in ones render each family's format, and train exactly the replies."""

from __future__ import annotations

import copy
import importlib.resources
import logging

import pytest

from align import AlignError
from align.chat_template import CHAT_TEMPLATE, ChatTemplate, resolve_chat_template
from align.conversation import Example
from align.plugin_manager import describe_plugins, get_plugin_manager
from align.render import IGNORE, Renderer
from conftest import REPO, run_align

BUILT_IN = {"chatml", "chatml_tools", "qwen2", "llama3", "mistral", "gemma"}

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
#: Text of the turns that must never be trained on, each found once in every rendering.
NOT_TRAINED = ("Answer in one sentence.", "Weather in Oslo?", "12 C and cloudy", "Thanks, bye!")


def conversation(calls: bool) -> Example:
    """System, user, a reply (calling a tool, when ``calls``), the tool's result, two more replies."""
    lookup = {"role": "assistant", "content": "Let me look.", **({"tool_calls": [CALL]} if calls else {})}
    return Example(
        [
            {"role": "system", "content": NOT_TRAINED[0]},
            {"role": "user", "content": NOT_TRAINED[1]},
            lookup,
            {"role": "tool", "content": NOT_TRAINED[2]},
            {"role": "assistant", "content": "It is 12 C and cloudy."},
            {"role": "user", "content": NOT_TRAINED[3]},
            {"role": "assistant", "content": "Goodbye."},
        ],
        tools=TOOLS if calls else None,
    )


#: What each template trains on in ``conversation``: every reply with its end marker, the first with its
#: tool call where the template writes calls (tiny-llama's end-of-sequence token is <|im_end|>).
QWEN_CALL = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
TRAINED = {
    "chatml": ["Let me look.<|im_end|>", "It is 12 C and cloudy.<|im_end|>", "Goodbye.<|im_end|>"],
    "chatml_tools": [QWEN_CALL, "It is 12 C and cloudy.<|im_end|>", "Goodbye.<|im_end|>"],
    "qwen2": [QWEN_CALL, "It is 12 C and cloudy.<|im_end|>", "Goodbye.<|im_end|>"],
    "llama3": ["Let me look.<|eot_id|>", "It is 12 C and cloudy.<|eot_id|>", "Goodbye.<|eot_id|>"],
    "mistral": ["Let me look.<|im_end|>", "It is 12 C and cloudy.<|im_end|>", "Goodbye.<|im_end|>"],
    "gemma": ["Let me look.<end_of_turn>", "It is 12 C and cloudy.<end_of_turn>", "Goodbye.<end_of_turn>"],
}

#: Each family's own rendering of system, user, reply, user and the cue for the next reply, with a
#: tokenizer whose beginning and end of sequence are <s> and </s>.
GOLDEN = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    "Hello.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n",
    "qwen2": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    "Hello.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi! [/INST]Hello.</s>[INST] Weather? [/INST]",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nWeather?<end_of_turn>\n<start_of_turn>model\n",
}
GOLDEN["chatml_tools"] = GOLDEN["chatml"]


@pytest.fixture(scope="module")
def plugins():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def tiny_tokenizer(plugins, offline_caches):
    from transformers import AutoTokenizer

    from align.schema import build

    source = plugins.get("model source", "tiny-llama")
    return AutoTokenizer.from_pretrained(
        source.materialize(build(source.Config, {}, "model"), offline_caches / "models")
    )


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)  # a renderer installs its template in the tokenizer


def template(plugins, name: str) -> ChatTemplate:
    return plugins.get(CHAT_TEMPLATE, name)


def trained_pieces(tokenizer, ids, labels) -> list[str]:
    """The text of each run of trained tokens."""
    pieces: list[list[int]] = []
    for previous, (token, label) in zip([IGNORE, *labels], zip(ids, labels, strict=True), strict=False):
        if label != IGNORE:
            if previous == IGNORE:
                pieces.append([])
            pieces[-1].append(token)
    return [tokenizer.decode(piece) for piece in pieces]


# ---------------------------------------------------------------------------------------------- registry


def test_the_built_in_templates_are_registered_with_jinja_files_that_install_with_align(plugins):
    assert set(plugins.registry(CHAT_TEMPLATE)) == BUILT_IN
    (row,) = [row for row in describe_plugins(plugins) if row["plugin"] == "chat_templates"]
    assert set(row["registers"]) == {CHAT_TEMPLATE}
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "chat_templates/*.jinja" in package_data["package-data"]["align.plugins"]
    installed = importlib.resources.files("align.plugins") / "chat_templates"
    for name in BUILT_IN:
        found = template(plugins, name)
        assert found.description and "{% generation %}" in found.text.replace("{%- generation %}", "{% generation %}")
        assert (installed / f"{name}.jinja").read_text(encoding="utf-8") == found.text


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_each_template_renders_its_familys_format(name, plugins, tokenizer):
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Weather?"},
    ]
    text = tokenizer.apply_chat_template(
        messages, chat_template=template(plugins, name).text, tokenize=False, add_generation_prompt=True
    )
    assert text == GOLDEN[name]


def test_qwen2_gives_qwens_system_prompt_when_the_conversation_has_none(plugins, tokenizer):
    messages = [{"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, chat_template=template(plugins, "qwen2").text, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")


# ---------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_only_the_replies_and_their_tool_calls_are_trained(name, plugins, tokenizer):
    chosen = template(plugins, name)
    example = conversation(calls=chosen.tools)
    rows, report = Renderer(tokenizer, 1024, chosen).sft([example], "weather")
    ids, labels = rows["input_ids"][0], rows["labels"][0]
    assert report.kept == 1 and report.lost_tool_calls == 0
    assert trained_pieces(tokenizer, ids, labels) == TRAINED[name]
    untrained = tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label == IGNORE])
    for text in NOT_TRAINED:  # every other turn is there, and only in the untrained text
        assert untrained.count(text) == 1, text
    if chosen.tools:
        assert '"name": "get_weather"' in tokenizer.decode(ids).split("Weather in Oslo?")[0]  # the tools, described


@pytest.mark.parametrize("name", sorted(n for n in BUILT_IN if n not in ("chatml_tools", "qwen2")))
def test_a_template_that_writes_no_tool_calls_is_refused_for_data_with_them(name, plugins, tokenizer):
    assert not template(plugins, name).tools
    with pytest.raises(AlignError, match=r"'weather': the chat template leaves out 1 tool calls in 1 rows"):
        Renderer(tokenizer, 1024, template(plugins, name)).sft([conversation(calls=True)], "weather")


def test_masks_stay_exact_where_tokens_would_cross_a_replys_edge(plugins, tiny_tokenizer):
    """A tokenizer without llama3's markers, whose merges join the end of one (`|>`) to the start of the next."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    llama3 = template(plugins, "llama3")
    example = conversation(calls=False)
    rendered = copy.deepcopy(tiny_tokenizer).apply_chat_template(
        example.messages, chat_template=llama3.text, tokenize=False
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], initial_alphabet=alphabet)
    bpe.train_from_iterator([rendered] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    whole = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert "|><|" in [rendered[a:b] for a, b in whole["offset_mapping"]]  # tokenized whole, edges would blur

    rows, _ = Renderer(tokenizer, 1024, llama3).sft([example], "t")
    ids, labels = rows["input_ids"][0], rows["labels"][0]
    assert trained_pieces(tokenizer, ids, labels) == TRAINED["llama3"]
    assert tokenizer.decode(ids) == rendered


def test_the_end_of_a_reply_becomes_the_end_of_sequence_where_the_tokenizer_has_it(plugins, tokenizer, caplog):
    markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    with caplog.at_level(logging.INFO, logger="align"):
        rows, _ = Renderer(tokenizer, 1024, template(plugins, "llama3")).sft([conversation(calls=False)], "t")
    assert tokenizer.eos_token == "<|eot_id|>"  # saved with the checkpoint: generation stops where replies end
    assert "becomes the end-of-sequence token" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert trained_pieces(tokenizer, rows["input_ids"][0], rows["labels"][0]) == TRAINED["llama3"]


def test_a_tokenizer_without_the_end_of_a_reply_works_and_warns(plugins, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="align"):
        Renderer(tokenizer, 1024, template(plugins, "gemma"))
    assert tokenizer.eos_token == "<|im_end|>"
    assert "chat template 'gemma' ends replies with <end_of_turn>, which this tokenizer has no token for" in caplog.text


# ---------------------------------------------------------------------------------------------- the setting


def test_a_setting_is_a_registered_name_then_a_file_then_the_template(plugins, tmp_path, monkeypatch):
    assert resolve_chat_template("qwen2", plugins) is template(plugins, "qwen2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen2").write_text("{{ 'a file named like a template' }}", encoding="utf-8")
    assert resolve_chat_template("qwen2", plugins) is template(plugins, "qwen2")  # the name comes first
    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert resolve_chat_template("mine.jinja", plugins).text == "{{ messages[0]['content'] }}"
    assert resolve_chat_template("{{ 'text' }}", plugins).text == "{{ 'text' }}"
    assert resolve_chat_template(None, plugins) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("qwen", r"stages\.sft\.chat_template: unknown chat template 'qwen' \(did you mean 'qwen2'\?\)"),
        ("llama-3", r"unknown chat template 'llama-3' \(did you mean 'llama3'\?\)"),
        ("templates/qwen", r"stages\.sft\.chat_template: templates/qwen: no such file"),
        ("qwen.jinja", r"qwen\.jinja: no such file"),
    ],
)
def test_an_unknown_name_or_a_missing_file_says_which(value, message, plugins):
    with pytest.raises(AlignError, match=message) as error:
        resolve_chat_template(value, plugins, "stages.sft.chat_template")
    assert "chatml, chatml_tools, gemma, llama3, mistral, qwen2" in error.value.hint


RECIPE = """
model: tiny-llama
stages:
  sft:
    data: demo_sft
    chat_template: {template}
"""


def test_align_config_takes_a_template_by_name_and_refuses_an_unknown_one(write_recipe):
    result = run_align("config", str(write_recipe(RECIPE.format(template="qwen2"))))
    assert result.returncode == 0, result.stderr
    assert "    chat_template: qwen2\n" in result.stdout

    result = run_align("config", str(write_recipe(RECIPE.format(template="gemma3"))))
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: stages.sft.chat_template: unknown chat template 'gemma3' (did you mean 'gemma'?)\n"
    ), result.stderr


def test_a_template_that_is_not_valid_jinja_is_refused_when_the_recipe_is_checked(plugins, tmp_path):
    assert resolve_chat_template("{% generation %}{{ messages[0]['content'] }}{% endgeneration %}", plugins)
    with pytest.raises(AlignError, match=r"stages\.sft\.chat_template: the chat template is not valid Jinja: line 1"):
        resolve_chat_template("{{ messages[0]['content'] }", plugins, "stages.sft.chat_template")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}", encoding="utf-8")
    with pytest.raises(AlignError, match=r"the chat template \(.*broken\.jinja\) is not valid Jinja: line 2"):
        resolve_chat_template(str(broken), plugins)


def test_a_template_that_refuses_a_conversation_is_an_error_not_a_traceback(tokenizer):
    refusing = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(AlignError, match="the chat template cannot render a conversation: Conversation roles must"):
        Renderer(tokenizer, 1024, refusing).sft([conversation(calls=False)], "t")


@pytest.mark.slow
def test_an_sft_checkpoint_keeps_the_named_template(tmp_path):
    from transformers import AutoTokenizer

    from align.recipe import load_recipe
    from align.runner import run_recipe

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(RECIPE.format(template="llama3") + "    max_steps: 2\n    batch_size: 4\n", encoding="utf-8")
    plugins = get_plugin_manager()
    summary = run_recipe(load_recipe(recipe, [], plugins), plugins, run_dir=tmp_path / "run")
    assert summary.status == "done", summary.error
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "sft")
    assert saved.chat_template == template(plugins, "llama3").text


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_the_generation_tags_mark_what_align_trains(name, plugins, tokenizer):
    """transformers' assistant mask (what TRL's assistant_only_loss uses) agrees with align's labels."""
    chosen = template(plugins, name)
    example = conversation(calls=chosen.tools)
    rows, _ = Renderer(tokenizer, 1024, chosen).sft([example], "t")
    reference = tokenizer.apply_chat_template(
        example.messages, tools=example.tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert rows["input_ids"][0] == reference["input_ids"]
    assert [label != IGNORE for label in rows["labels"][0]] == [bool(m) for m in reference["assistant_masks"]]


def test_a_switched_end_of_sequence_token_also_stops_generation(plugins, tokenizer):
    from transformers import GenerationConfig

    from align.training import stop_generation_at_eos

    class Model:
        generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)

    before = tokenizer.eos_token_id
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    template(plugins, "llama3").install(tokenizer)
    assert tokenizer.eos_token == "<|eot_id|>"
    stop_generation_at_eos(Model, tokenizer)
    assert Model.generation_config.eos_token_id == [before, tokenizer.eos_token_id]
    stop_generation_at_eos(Model, tokenizer)  # saved twice (a rerun): no duplicate
    assert Model.generation_config.eos_token_id == [before, tokenizer.eos_token_id]


def test_an_edited_template_file_reruns_the_stage(tmp_path, plugins):
    from align.recipe import load_recipe

    template_file = tmp_path / "mine.jinja"
    template_file.write_text(template(plugins, "chatml").text, encoding="utf-8")
    recipe_file = tmp_path / "sft.yaml"
    recipe_file.write_text(RECIPE.format(template=template_file), encoding="utf-8")
    recipe = load_recipe(recipe_file, [], plugins)
    spec = recipe.stages["sft"]
    assert template_file in spec.stage.data_files(spec.config, recipe)  # hashed into the fingerprint
