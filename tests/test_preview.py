"""``align data preview``: rows numbered as in the file, and a chat template given on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align import AlignError
from align.plugin_manager import get_plugin_manager
from align.preview import preview
from align.runner import align_home
from conftest import run_align

LONG = "a very long question " * 200  # far over --max-length: the row is dropped
# A template unlike tiny-llama's ChatML, so that the preview shows which one rendered the rows.
TEMPLATE = (
    "{% for m in messages %}<<{{ m.role }}>>\n{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<<assistant>>\n{% endif %}"
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _preview(dataset: Path, **settings) -> str:
    options = {"count": 10, "max_length": 128, "on_bad_row": "skip", **settings}
    return preview(
        get_plugin_manager(),
        str(dataset),
        model=None,
        dataset_dir=None,
        format_name=None,
        cache_dir=align_home() / "models",
        **options,
    )


def _shown(text: str) -> list[int]:
    return [int(line.split()[2]) for line in text.splitlines() if line.startswith("--- row ")]


def test_rows_keep_their_file_numbers_when_rows_before_them_are_left_out(tmp_path):
    data = _jsonl(
        tmp_path / "chats.jsonl",
        [
            {"instruction": "first question", "output": "first answer"},
            {"instruction": "an empty answer", "output": ""},  # bad: skipped
            {"instruction": LONG, "output": "too long"},  # dropped for its length
            {"instruction": "fourth question", "output": "fourth answer"},
            {"instruction": "fifth question", "output": "fifth answer"},
        ],
    )
    text = _preview(data)
    assert _shown(text) == [0, 3, 4]
    row = text.split("--- row 3 ")[1]
    assert "fourth question" in row and "[[fourth answer" in row
    assert "skipped 1" in text and "1 too_long" in text  # the gaps, explained
    assert _shown(_preview(data, count=1)) == [0]

    with pytest.raises(AlignError, match=r"chats\.jsonl row 1: "):  # the number an error gives is the same
        _preview(data, on_bad_row="error")


def test_preference_pairs_are_numbered_as_in_the_file_too(tmp_path):
    def pair(question: str) -> dict:  # TRL's form: a file that needs no registry entry to be read as pairs
        return {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": "this one"}],
            "rejected": [{"role": "assistant", "content": "that one"}],
        }

    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([pair(LONG), pair("which?")]), encoding="utf-8")
    text = _preview(data)
    assert _shown(text) == [1]
    assert "[chosen]" in text and "[[this one" in text


def test_a_chat_template_from_a_file_or_given_as_text_renders_the_rows(tmp_path):
    data = _jsonl(tmp_path / "chats.jsonl", [{"instruction": "hello there", "output": "general kenobi"}])
    template = tmp_path / "plain.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")

    result = run_align("data", "preview", str(data), "--chat-template", str(template), "-n", "1")
    assert result.returncode == 0, result.stderr
    assert f"chat template {template}" in result.stdout
    assert "<<user>>\nhello there" in result.stdout and "<<assistant>>\n[[general kenobi" in result.stdout
    assert "<|im_start|>" not in result.stdout  # not tiny-llama's own template

    text = _preview(data, chat_template=TEMPLATE)
    assert "chat template given" in text and "<<user>>\nhello there" in text


def test_a_chat_template_file_that_is_not_there_is_refused_before_any_work(tmp_path):
    with pytest.raises(AlignError, match=r"--chat-template: nope\.jinja: no such file") as error:
        _preview(tmp_path / "never read.jsonl", chat_template="nope.jinja")
    assert error.value.hint and "template itself" in error.value.hint
