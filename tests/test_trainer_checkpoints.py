"""A trainer checkpoint is resumed from only when it is complete; an incomplete newest one is skipped."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import align.training
from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from align.runner import run_recipe
from align.training import checkpoint_problem, last_checkpoint

RECIPE = """
model: tiny-llama
stages:
  sft: {data: demo_sft, max_steps: 6, batch_size: 8, save_steps: 3, learning_rate: 1.0e-3}
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's checkpoint-3 and checkpoint-6 of a short SFT run, copied before the stage drops them."""
    folder = tmp_path_factory.mktemp("sft")
    copy = folder / "checkpoints"
    original = align.training.save

    def save(trainer, tokenizer, context):
        shutil.copytree(context.output_dir / align.training.CHECKPOINTS, copy)
        original(trainer, tokenizer, context)

    (folder / "r.yaml").write_text(RECIPE)
    pm = get_plugin_manager()
    align.training.save = save
    try:
        summary = run_recipe(load_recipe(folder / "r.yaml", [], pm), pm, run_dir=folder / "run")
    finally:
        align.training.save = original
    assert summary.status == "done", summary.error
    return copy


@pytest.fixture
def folder(checkpoints: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints, tmp_path / "checkpoints"))


def test_complete_checkpoints_are_found_newest_first(folder):
    assert checkpoint_problem(folder / "checkpoint-3", 3) is None
    assert last_checkpoint(folder) == folder / "checkpoint-6"


def cut(file: Path, keep: int = -100) -> None:
    file.write_bytes(file.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda c: (c / "trainer_state.json").unlink(), "its trainer_state.json cannot be read"),
        (lambda c: cut(c / "trainer_state.json", 10), "its trainer_state.json cannot be read"),
        (lambda c: cut(c / "model.safetensors"), "model.safetensors has"),
        (lambda c: cut(c / "model.safetensors", 4), "model.safetensors has no readable header"),
        (lambda c: (c / "model.safetensors").unlink(), "it holds no weights"),
        (lambda c: cut(c / "optimizer.pt"), "optimizer.pt is not a whole file"),
        (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
        (lambda c: (c / "align_loss.json").unlink(), "its align_loss.json cannot be read"),
    ],
    ids=[
        "no-state",
        "cut-state",
        "cut-weights",
        "cut-header",
        "no-weights",
        "cut-optimizer",
        "no-scheduler",
        "no-loss-total",
    ],
)
def test_an_incomplete_newest_checkpoint_is_skipped_for_the_one_before(folder, damage, problem, caplog):
    damage(folder / "checkpoint-6")
    with caplog.at_level("INFO", logger="align"):
        assert last_checkpoint(folder) == folder / "checkpoint-3"
    assert problem in checkpoint_problem(folder / "checkpoint-6", 6)
    assert f"skipping {folder / 'checkpoint-6'}: {problem}" in caplog.text


def test_a_state_file_of_another_step_is_not_trusted(folder):
    state = json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())
    (folder / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 5}))
    assert checkpoint_problem(folder / "checkpoint-6", 6) == "its trainer_state.json is for step 5, not 6"
    assert last_checkpoint(folder) == folder / "checkpoint-3"


def test_no_complete_checkpoint_means_a_fresh_start(folder):
    for checkpoint in folder.glob("checkpoint-*"):
        (checkpoint / "trainer_state.json").unlink()
    assert last_checkpoint(folder) is None


def test_the_final_steps_checkpoint_is_complete_but_not_resumed_from(folder, caplog):
    """Resumed at max_steps mid-epoch, transformers trains one step more: the one before is resumed."""
    caplog.set_level(logging.INFO, logger="align")
    assert last_checkpoint(folder) == folder / "checkpoint-6"  # complete (export, the NaN guard)
    assert last_checkpoint(folder, resumable=True) == folder / "checkpoint-3"
    assert "checkpoint-6: it is the final step's" in caplog.text
