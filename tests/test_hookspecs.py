"""The hook specifications are the plugin author's manual: each is documented, and each is called."""

from __future__ import annotations

import inspect

import pytest

from align import hookspecs
from align.plugin_manager import REGISTRIES, hook_names


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_documents_its_arguments_and_result(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith("."), f"{name}: the first line must be a one-sentence summary"
    for argument in inspect.signature(spec).parameters:
        assert f":param {argument}:" in doc, f"{name}: document the argument {argument}"
    returns = inspect.signature(spec).return_annotation
    if returns not in (None, "None"):
        assert ":returns:" in doc, f"{name}: document what it returns"
    if getattr(spec, "align_spec", {}).get("firstresult"):
        assert "First result wins" in doc, f"{name}: say that the first result wins"


def test_every_registration_hook_fills_a_registry():
    registration = [name for name in hook_names() if name.startswith("align_register_")]
    assert sorted(registration) == sorted(REGISTRIES.values())
