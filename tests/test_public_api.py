"""Built-in stages and plugins are third parties: they use align's public API and nothing else.

The public API is every name in a module's ``__all__`` (docs/plugins.md says so). A built-in that needs a
private name, or another stage's module, fails here: make the name public, or rethink it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO

THIRD_PARTIES = sorted([*(REPO / "stages").glob("*.py"), *(REPO / "plugins").glob("*.py")])
BUILTIN_PACKAGES = {"align.stages": REPO / "stages", "align.plugins": REPO / "plugins"}


def violations(path: Path, source: str | None = None) -> list[str]:
    """Every import of ``path`` that reaches past align's public API, as ``file:line: what``."""
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module, names = node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            module, names = "", [alias.name for alias in node.names]
            for name in names:
                if name.startswith("align.") and _problem(path, name, []):
                    found.append(f"{path.name}:{node.lineno}: {_problem(path, name, [])}")
            continue
        else:
            continue
        if module != "align" and not module.startswith("align."):
            continue
        problem = _problem(path, module, names)
        if problem:
            found.append(f"{path.name}:{node.lineno}: {problem}")
    return found


def _problem(path: Path, module: str, names: list[str]) -> str | None:
    package, _, stem = module.rpartition(".")
    if package in BUILTIN_PACKAGES:
        own = path.parent == BUILTIN_PACKAGES[package] and stem.split("_")[0] == path.stem.split("_")[0]
        return None if own else f"imports {module}, another built-in's module"
    if any(part.startswith("_") for part in module.split(".")):
        return f"imports the private module {module}"
    public = getattr(importlib.import_module(module), "__all__", None)
    if public is None:
        return f"imports from {module}, which declares no public API (__all__)"
    outside = [name for name in names if name not in public]
    if outside:
        return f"imports {', '.join(outside)} from {module}, outside its __all__"
    return None


@pytest.mark.parametrize("path", THIRD_PARTIES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_builtins_import_only_the_public_api(path):
    assert violations(path) == []


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("from align.recipe import _cycle_through\n", "outside its __all__"),
        ("from align.stages.ppo_math import gae\n", "another built-in's module"),
        ("from align.errors import AlignError\n", "declares no public API"),
        ("import align.errors\n", "declares no public API"),
        ("from align.training import TRLStage, _loss_metrics\n", "_loss_metrics"),
    ],
)
def test_the_check_catches_private_names_and_other_stages(source, problem):
    found = violations(REPO / "stages" / "sft.py", source)
    assert len(found) == 1 and problem in found[0]


def test_a_stage_may_import_its_own_helper_modules():
    assert violations(REPO / "stages" / "ppo.py", "from align.stages.ppo_math import gae\n") == []


def test_every_public_name_exists():
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "align").rglob("*.py")
        if "__all__" in p.read_text(encoding="utf-8")
    }
    for name in sorted(modules):
        module = importlib.import_module(name)
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it does not define: {missing}"
