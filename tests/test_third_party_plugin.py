"""The proof that a third party can extend align: a separately installed package adds a stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_align, tiny_llama

PACKAGE = REPO / "examples" / "align-wise-ft"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example package into a folder of its own, as `pip install` would for a user."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(PACKAGE),
        ],
        check=True,
        capture_output=True,
    )
    return {"PYTHONPATH": str(target)}


def test_the_installed_package_is_listed_by_align_plugins(installed):
    result = run_align("plugins", "--json", env=installed)
    rows = {row["plugin"]: row for row in json.loads(result.stdout)}
    assert rows["interpolate"]["where"] == "align-wise-ft" and rows["interpolate"]["version"] == "0.1.0"
    assert rows["interpolate"]["registers"] == {"stage": ["interpolate"]}


@pytest.mark.slow
def test_a_recipe_runs_the_third_party_stage_beside_a_builtin_one(installed, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    result = run_align(
        "run", str(PACKAGE / "wise.yaml"), "--run-dir", str(run_dir), "stages.sft.max_steps=5", cwd=REPO, env=installed
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == {"sft": "done", "wise": "done"}

    base = json.loads((run_dir / "wise" / "align-manifest.json").read_text())["inputs"]["anchor"]
    assert base["producer"] == "base"
    blended = AutoModelForCausalLM.from_pretrained(run_dir / "wise").state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "sft").state_dict()
    anchor = AutoModelForCausalLM.from_pretrained(tiny_llama()).state_dict()  # the base model the run built
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(tuned[name], anchor[name])
    torch.testing.assert_close(blended[name], 0.5 * tuned[name] + 0.5 * anchor[name])
