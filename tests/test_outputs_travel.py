"""Outputs that travel: a run folder works from any working folder, and moved or copied elsewhere.

A LoRA stage stacked on another stage's adapter records that stage's output as its base. These tests
train a short LoRA sft → dpo chain, move the run folder away, and use it from another working folder:
a later stage, ``align eval``, ``align export`` (with and without ``--merge``) and ``load_model``.

Nor does a run leave anything outside its run folder: the vllm engine's merged copy of a LoRA policy is
removed from the temp folder however its session ends (vLLM runs in a subprocess of its own, as in
tests/test_vllm.py, with a temp folder of its own).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align import AlignError
from align.models import adapter_base, load_model
from conftest import run_align

CHAIN = """\
model: tiny-llama
defaults:
  peft: {method: lora, r: 4}
  max_steps: 3
  batch_size: 4
  learning_rate: 5.0e-3
stages:
  sft:
    data: demo_sft
  dpo:
    data: demo_pref
"""
LATER = """\
  dpo2:
    plugin: dpo
    data: demo_pref
"""


def _align(*args: str, cwd: Path) -> str:
    result = run_align(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _base_recorded(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.mark.slow
def test_a_moved_lora_chain_loads_evaluates_exports_and_trains_on_from_another_folder(tmp_path):
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    (first / "chain.yaml").write_text(CHAIN)
    _align("run", "chain.yaml", "--run-dir", "run", cwd=first)  # a run folder relative to the working folder
    # Recorded by an absolute path, not `run/sft`, which only holds from the working folder of the run.
    assert _base_recorded(first / "run" / "dpo") == str(first / "run" / "sft")

    moved = tmp_path / "archive" / "chain"
    moved.parent.mkdir()
    shutil.copytree(first / "run", moved)  # copied, then the original deleted: a move across disks
    shutil.rmtree(first / "run")

    assert adapter_base(moved / "dpo") == str(moved / "sft")  # found beside it, where the run is now
    model = load_model(moved / "dpo")
    assert model.name_or_path == str(moved / "dpo")  # what an adapter trained on top of it will record

    _align("export", str(moved / "dpo"), "merged", "--merge", cwd=elsewhere)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(elsewhere / "merged").state_dict()
    for name, tensor in model.state_dict().items():
        assert (merged[name] == tensor).all(), name  # the export is the model load_model gives

    _align("export", str(moved / "dpo"), "adapter", cwd=elsewhere)  # a copy leaves its run folder behind
    assert _base_recorded(elsewhere / "adapter") == str(moved / "sft")  # so it names the base absolutely
    assert adapter_base(elsewhere / "adapter") == str(moved / "sft")

    _align(
        "eval",
        "--model",
        f"dpo={moved / 'dpo'}",
        "--reference",
        str(moved / "sft"),
        "--samples",
        "4",
        "--max-new-tokens",
        "8",
        "--output",
        "report",
        cwd=elsewhere,
    )
    assert (elsewhere / "report" / "results.json").is_file()

    # A later stage, run from yet another folder: sft and dpo are cached, dpo2 trains on the moved dpo.
    (elsewhere / "chain.yaml").write_text(CHAIN + LATER)
    output = _align("run", "chain.yaml", "--run-dir", str(moved), cwd=elsewhere)
    summary = json.loads((moved / "summary.json").read_text())
    statuses = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert statuses == {"sft": "cached", "dpo": "cached", "dpo2": "done"}, output
    assert adapter_base(moved / "dpo2") == str(moved / "dpo")
    load_model(moved / "dpo2")


def _fake_output(folder: Path, base: str, inputs: dict, artifact_id: str = "a1") -> Path:
    """A published stage output with only what adapter_base reads: its adapter config and manifest."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    (folder / "align-manifest.json").write_text(json.dumps({"artifact_id": artifact_id, "inputs": inputs}))
    return folder


def test_a_base_is_found_beside_the_adapter_only_when_it_is_the_output_trained_on(tmp_path):
    run = tmp_path / "run"
    _fake_output(run / "sft", "/cache/models/tiny", {"policy": {"producer": "base", "id": "f0"}}, "s1")
    dpo = _fake_output(run / "dpo", "/old/place/run/sft", {"policy": {"producer": "sft", "id": "s1"}})
    assert adapter_base(dpo) == str(run / "sft")
    assert adapter_base(run / "sft") == "/cache/models/tiny"  # outside the run: as recorded
    # As align recorded it before: relative to the working folder of the run (`--run-dir run`).
    (dpo / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "run/sft"}))
    assert adapter_base(dpo) == str(run / "sft")

    # sft was rebuilt since dpo trained on it: the new sft is not dpo's base, whatever its name.
    (dpo / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/old/place/run/sft"}))
    (run / "sft" / "align-manifest.json").write_text(json.dumps({"artifact_id": "s2", "inputs": {}}))
    assert adapter_base(dpo) == "/old/place/run/sft"
    with pytest.raises(AlignError, match=r"the model this adapter adapts, /old/place/run/sft, does not exist"):
        load_model(dpo)


def test_a_relative_base_is_relative_to_the_adapter_not_the_working_folder(tmp_path, monkeypatch):
    adapter = tmp_path / "out" / "dpo"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../sft"}))
    monkeypatch.chdir(tmp_path)
    assert adapter_base(adapter) == str(tmp_path / "out" / "sft")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    assert adapter_base(adapter) == "Qwen/Qwen2.5-0.5B"  # a hub id is no path


# ------------------------------------------------------------------ nothing left in the temp folder

SCRATCH = """
import glob, json, os, sys, tempfile
import vllm
from transformers import AutoModelForCausalLM, AutoTokenizer
from align.plugin_manager import get_plugin_manager
from align.runner import align_home
from align.schema import build

def scratch():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(tempfile.gettempdir(), "align-vllm-*")))

class Refused:  # an engine that fails to start (out of memory, say), before any session exists
    def __init__(self, **settings):
        assert scratch(), "the merged checkpoint is written before the engine starts"
        raise RuntimeError("no memory left")

if __name__ == "__main__":
    pm = get_plugin_manager()
    source = pm.get("model source", "tiny-llama")
    path = source.materialize(build(source.Config, {}, "model"), align_home() / "models")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lora = pm.get("peft method", "lora")
    policy = lora.apply(AutoModelForCausalLM.from_pretrained(path), lora.Config(r=4), "causal")
    engine = pm.get("rollout engine", "vllm")
    found = {}
    real, vllm.LLM = vllm.LLM, Refused
    try:
        engine.start(policy, path, tokenizer, engine.Config())
    except RuntimeError:
        found["failed_start"] = scratch()
    vllm.LLM = real
    session = engine.start(policy, path, tokenizer, engine.Config(probe_tokens=4))
    found["open"] = scratch()
    session.close()
    found["closed"] = scratch()
    session = engine.start(policy, path, tokenizer, engine.Config(probe_tokens=4))
    found["second"] = scratch()
    print("RESULT " + json.dumps(found), flush=True)
    raise RuntimeError("the stage failed")  # before closing its session: the backstop must remove it
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_the_vllm_engine_leaves_no_merged_checkpoint_in_the_temp_folder(tmp_path):
    scratch_dir = tmp_path / "tmp"  # this test's own temp folder: other runs' folders do not count
    scratch_dir.mkdir()
    script = tmp_path / "scratch.py"
    script.write_text(SCRATCH)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(scratch_dir)},
    )
    assert "RESULT " in result.stdout, result.stderr[-3000:]
    found = json.loads(result.stdout.rpartition("RESULT ")[2])
    assert found["failed_start"] == []  # removed when the engine could not start
    assert len(found["open"]) == 1 and found["open"][0].startswith("align-vllm-")  # the LoRA policy, merged
    assert found["closed"] == []  # removed when the session closed
    assert len(found["second"]) == 1
    assert result.returncode == 1 and "the stage failed" in result.stderr
    assert not list(scratch_dir.glob("align-vllm-*"))  # a session nobody closed: removed at exit
