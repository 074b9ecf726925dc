"""Model sources: the offline tiny Llama, and folders or hub ids given by path."""

from __future__ import annotations

import json

import pytest

from align import AlignError
from align.plugin_manager import get_plugin_manager
from align.schema import build


@pytest.fixture(scope="module")
def sources():
    pm = get_plugin_manager()
    return pm.get("model source", "tiny-llama"), pm.get("model source", "path")


def test_tiny_llama_builds_a_chat_model_that_transformers_loads(sources, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny, _ = sources
    folder = tiny.materialize(build(tiny.Config, {}, "model"), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.head_dim == 64  # vLLM's CPU attention needs it
    messages = [{"role": "user", "content": "Write a review."}, {"role": "assistant", "content": "Great film!"}]
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    reply = [t for t, keep in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(reply) == "Great film!<|im_end|>"  # only the reply is marked for the loss
    assert tokenizer.decode(tokenizer.encode("any text, even ünïcödé")) == "any text, even ünïcödé"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token != tokenizer.eos_token


def test_tiny_llama_is_cached_by_its_settings(sources, tmp_path):
    tiny, _ = sources
    first = tiny.materialize(build(tiny.Config, {}, "model"), tmp_path)
    marker = json.loads((tmp_path / first.split("/")[-1] / "config.json").read_text())
    assert tiny.materialize(build(tiny.Config, {}, "model"), tmp_path) == first
    other = tiny.materialize(build(tiny.Config, {"num_layers": 1}, "model"), tmp_path)
    assert other != first and marker["num_hidden_layers"] == 2
    assert len(list(tmp_path.iterdir())) == 2  # no temporary folders left behind


def test_tiny_llama_is_the_same_model_when_built_twice(sources, tmp_path):
    tiny, _ = sources
    config = build(tiny.Config, {}, "model")
    a = tiny.materialize(config, tmp_path / "a")
    b = tiny.materialize(config, tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (tmp_path / "a" / a.split("/")[-1] / name).read_bytes() == (
            tmp_path / "b" / b.split("/")[-1] / name
        ).read_bytes()


def test_tiny_llama_rejects_a_width_the_heads_do_not_divide(sources):
    tiny, _ = sources
    with pytest.raises(AlignError, match="hidden_size 128 is not divisible by num_heads 3"):
        build(tiny.Config, {"num_heads": 3}, "model")


def test_a_local_folder_is_used_in_place_and_fingerprinted_by_content(sources, tmp_path):
    _, path = sources
    (tmp_path / "config.json").write_text("{}")
    config = build(path.Config, {"path": str(tmp_path)}, "model")
    assert path.materialize(config, tmp_path / "cache") == str(tmp_path.resolve())
    before = path.fingerprint(config)
    (tmp_path / "config.json").write_text('{"changed": true}')
    assert path.fingerprint(config) != before


def test_a_folder_without_config_json_is_not_a_checkpoint(sources, tmp_path):
    _, path = sources
    with pytest.raises(AlignError, match="has no config.json"):
        build(path.Config, {"path": str(tmp_path)}, "model")


def test_a_hub_id_is_passed_through_and_fingerprinted_by_id_and_revision(sources, tmp_path):
    _, path = sources
    config = build(path.Config, {"path": "org/model", "revision": "v1"}, "model")
    assert path.materialize(config, tmp_path) == "org/model"
    assert path.fingerprint(config) != path.fingerprint(build(path.Config, {"path": "org/model"}, "model"))


def test_each_source_tells_the_architecture_recipe_checks_need_without_building_the_model(sources, tmp_path):
    from transformers import AutoConfig

    tiny, path = sources
    settings = build(tiny.Config, {"hidden_size": 96, "num_heads": 3}, "model")
    told = tiny.architecture(settings)
    built = AutoConfig.from_pretrained(tiny.materialize(settings, tmp_path)).to_dict()
    assert {key: built[key] for key in told} == told  # what it tells is what it builds

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "head_dim": 48}))
    assert path.architecture(build(path.Config, {"path": str(folder)}, "model"))["head_dim"] == 48
    # A hub model that is not in the local cache is not downloaded for a check: the checks are skipped.
    assert path.architecture(build(path.Config, {"path": "no-such-org/no-such-model"}, "model")) is None
