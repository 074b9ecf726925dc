"""The user's own DeepSpeed and accelerate configs (``backend.deepspeed``, ``backend.accelerate_config``):
merged with what the recipe sets, conflicts refused with both values and their sources, "auto" filled for
every stage that trains with DeepSpeed, the online-RL loop included."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from align import AlignError
from align.backend_files import deepspeed_config, fill_auto, fsdp_arguments, resolve_backend
from align.plugin_manager import get_plugin_manager
from align.recipe import load_recipe
from conftest import run_align

SFT = "  sft: {data: demo_sft, max_steps: 2, batch_size: 8}\n"
GRPO = (
    "  grpo: {data: demo_math_prompts, reward_functions: [exact_answer], steps: 1, batch_size: 2, "
    "num_generations: 2, mini_batch_size: 4}\n"
)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Write files into a folder that is also the current one (relative paths are read from there)."""
    monkeypatch.chdir(tmp_path)

    def write(name: str, content: object) -> str:
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        (tmp_path / name).write_text(textwrap.dedent(text), encoding="utf-8")
        return name

    return write


def recipe(files, backend: str, stages: str = SFT) -> Path:
    return Path(files("recipe.yaml", f"model: tiny-llama\nbackend: {backend}\nstages:\n{stages}"))


def load(files, backend: str, stages: str = SFT, overrides=()):
    return load_recipe(recipe(files, backend, stages), list(overrides), get_plugin_manager())


def refused(files, backend: str, stages: str = SFT, overrides=()) -> str:
    with pytest.raises(AlignError) as info:
        load(files, backend, stages, overrides)
    return str(info.value)


ZERO3 = {
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True},
    "bf16": {"enabled": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 4321,
}

ACCELERATE = """\
compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  gradient_accumulation_steps: 1
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero_stage: 2
distributed_type: DEEPSPEED
downcast_bf16: 'no'
enable_cpu_affinity: false
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""


# ------------------------------------------------------------------------------------------ merging


def test_the_deepspeed_config_fills_the_backend_settings_the_recipe_leaves_out(files):
    files("ds.json", ZERO3)
    backend = load(files, "{deepspeed: ds.json, num_processes: 2}").backend
    assert (backend.kind, backend.zero_stage, backend.offload_optimizer, backend.precision) == (
        "deepspeed",
        3,
        True,
        "bf16",
    )
    # What the stages train with: the file's own keys kept, align's settings and the stages' "auto" added.
    config = deepspeed_config(backend)
    assert config["steps_per_print"] == 4321 and config["zero_optimization"]["overlap_comm"] is True
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["gradient_accumulation_steps"] == "auto" and config["bf16"] == {"enabled": True}


def test_a_recipe_value_that_agrees_with_the_file_is_no_conflict(files):
    files("ds.json", ZERO3)
    backend = load(files, "{deepspeed: ds.json, kind: deepspeed, zero_stage: 3, precision: bf16}").backend
    assert backend.zero_stage == 3


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (
            "{deepspeed: ds.json, zero_stage: 2}",
            "backend.zero_stage: ds.json, line 3 says zero_optimization.stage: 3, but the recipe sets "
            "backend.zero_stage: 2",
        ),
        (
            "{deepspeed: ds.json, precision: fp32}",
            "backend.precision: ds.json, line 10 says bf16.enabled: true, but the recipe sets backend.precision: fp32",
        ),
        (
            "{deepspeed: ds.json, kind: ddp}",
            "backend.kind: ds.json says it is a DeepSpeed config (kind deepspeed), but the recipe sets "
            "backend.kind: ddp",
        ),
        (
            "{deepspeed: ds.json, offload_optimizer: false}",
            "backend.offload_optimizer: ds.json, line 5 says zero_optimization.offload_optimizer.device: cpu, but the "
            "recipe sets backend.offload_optimizer: false",
        ),
    ],
)
def test_a_file_value_that_the_recipe_sets_otherwise_is_refused_naming_both(files, backend, message):
    files("ds.json", ZERO3)
    error = refused(files, backend)
    assert error.startswith(message), error
    assert "leave" in error and "out of the recipe to take the file's" in error


def test_an_override_on_the_command_line_conflicts_like_a_recipe_value(files):
    files("ds.json", ZERO3)
    assert "the recipe sets backend.zero_stage: 1" in refused(
        files, "{deepspeed: ds.json}", overrides=["backend.zero_stage=1"]
    )


def test_two_files_that_disagree_are_refused_naming_both(files):
    files("ds.json", {"bf16": {"enabled": False}})
    files("accelerate.yaml", ACCELERATE)
    error = refused(files, "{deepspeed: ds.json, accelerate_config: accelerate.yaml}")
    assert error.startswith(
        "backend.precision: ds.json, line 3 says bf16.enabled: false, but accelerate.yaml, line 14 says "
        "mixed_precision: bf16"
    ), error
    assert "make the two files agree" in error

    files("ds.json", {"zero_optimization": {"stage": 3}})
    error = refused(files, "{deepspeed: ds.json, accelerate_config: accelerate.yaml}")
    assert "ds.json, line 3 sets zero_optimization.stage: 3" in error
    assert "accelerate.yaml, line 8 (deepspeed_config.zero_stage) sets 2" in error


def test_the_accelerate_config_fills_the_backend(files):
    files("accelerate.yaml", ACCELERATE)
    backend = load(files, "{accelerate_config: accelerate.yaml}").backend
    assert (backend.kind, backend.num_processes, backend.zero_stage, backend.precision) == ("deepspeed", 2, 2, "bf16")
    config = deepspeed_config(backend)
    assert config["gradient_accumulation_steps"] == 1  # its deepspeed_config, as accelerate would apply it
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "none"}


def test_accelerates_num_processes_counts_every_machine(files):
    files(
        "accelerate.yaml",
        ACCELERATE.replace("num_processes: 2", "num_processes: 4").replace("num_machines: 1", "num_machines: 2"),
    )
    backend = load(files, "{accelerate_config: accelerate.yaml, main_address: 10.0.0.1}").backend
    assert (backend.num_processes, backend.num_machines, backend.world_size) == (2, 2, 4)
    error = refused(files, "{accelerate_config: accelerate.yaml, main_address: 10.0.0.1, num_processes: 4}")
    assert "accelerate.yaml, line 16 says num_processes: 4 (accelerate counts the processes of all machines)" in error
    assert "backend.num_processes 4 per machine × num_machines 2 = 8" in error


def test_each_machine_names_its_own_rank_over_the_shared_accelerate_config(files):
    files(
        "accelerate.yaml",
        ACCELERATE.replace("num_machines: 1", "num_machines: 2").replace("num_processes: 2", "num_processes: 2"),
    )
    backend = load(
        files, "{accelerate_config: accelerate.yaml, main_address: 10.0.0.1}", overrides=["backend.machine_rank=1"]
    ).backend
    assert backend.machine_rank == 1 and backend.num_machines == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "distributed_type: MULTI_GPU\nnum_procesess: 2\n",
            "accelerate.yaml, line 2: unknown accelerate config key 'num_procesess' (did you mean 'num_processes'?)",
        ),
        (
            "distributed_type: MULTI_GPU\nmixed_precision: fp8\n",
            "accelerate.yaml, line 2: mixed_precision 'fp8' is not a precision align trains in",
        ),
        ("distributed_type: XLA\n", "accelerate.yaml, line 1: distributed_type 'XLA' is not a backend align runs"),
        (
            "distributed_type: MULTI_GPU\ngpu_ids: 0,1\n",
            "gpu_ids: '0,1' is not something align can do: align uses every GPU it sees",
        ),
        (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  zero3_init_flag: false\n",
            "accelerate.yaml, line 4: zero3_init_flag: false, but align builds ZeRO-3 models partitioned",
        ),
        (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_multinode_launcher: pdsh\n",
            "deepspeed_multinode_launcher: pdsh: align starts the machines of a run with accelerate's standard "
            "launcher",
        ),
        (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n",
            "fsdp_state_dict_type: SHARDED_STATE_DICT: align publishes whole checkpoints",
        ),
        ("distributed_type: MULTI_GPU\n  x: [\n", "accelerate.yaml: invalid YAML at line 2, column 4"),
        (
            "distributed_type: NO\ndistributed_type: NO\n",
            "key 'distributed_type' appears twice at the top level (lines 1 and 2)",
        ),
    ],
)
def test_what_align_cannot_do_from_an_accelerate_config_is_refused_with_its_line(files, content, message):
    files("accelerate.yaml", content)
    error = refused(files, "{accelerate_config: accelerate.yaml}")
    assert message in error, error


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"zero_optimization": {"stage": 2},\n "bf16": }',
            "ds.json: invalid JSON at line 2, column 10: Expecting value",
        ),
        ('{"a": 1,\n "a": 2}', "ds.json: key 'a' appears twice in one object (lines 1, 2)"),
        ("[1, 2]", "ds.json: expected a JSON object (a DeepSpeed config), got list"),
        ('{"zero_optimization": {"stage": 0}}', "zero_optimization.stage 0 is not a ZeRO stage align runs (1, 2 or 3)"),
        ('{"zero_optimization": {"offload_param": {"device": "disk"}}}', "'disk' is not an offload device"),
        (
            '{"zero_optimization": {"stage": 3,\n "stage3_gather_16bit_weights_on_model_save": false}}',
            "ds.json, line 2 says zero_optimization.stage3_gather_16bit_weights_on_model_save: false, but ZeRO-3 here",
        ),
    ],
)
def test_a_broken_deepspeed_config_is_refused_naming_the_file_and_line(files, content, message):
    files("ds.json", content)
    error = refused(files, "{deepspeed: ds.json}")
    assert message in error, error


def test_a_missing_config_file_is_refused_by_name(files):
    assert refused(files, "{deepspeed: nowhere.json}").startswith("backend.deepspeed: nowhere.json: no such file")
    assert refused(files, "{accelerate_config: nowhere.yaml}").startswith(
        "backend.accelerate_config: nowhere.yaml: no such file"
    )


def test_bad_config_files_exit_2_without_a_traceback(files):
    files("ds.json", '{"zero_optimization": {"stage": 2},}')
    result = run_align("config", str(recipe(files, "{deepspeed: ds.json}")), cwd=Path.cwd())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: backend.deepspeed: ds.json: invalid JSON at line 1, column 36")


# --------------------------------------------------------------------------------- the stages' values


def test_a_micro_batch_in_the_file_must_be_the_stages_batch_size(files):
    files("ds.json", {"train_micro_batch_size_per_gpu": 4})
    error = refused(files, "{deepspeed: ds.json}")  # the stage's batch_size: 8 in SFT
    assert error.startswith(
        "stages.sft: your DeepSpeed config sets train_micro_batch_size_per_gpu: 4 (ds.json, line 2), but "
        "stages.sft.batch_size is 8"
    ), error
    assert 'write "auto" in the config' in error and "or set stages.sft.batch_size: 4" in error
    load(files, "{deepspeed: ds.json}", overrides=["stages.sft.batch_size=4"])  # agreeing: accepted


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gradient_accumulation_steps": 2}, "but stages.sft.gradient_accumulation_steps is 1"),
        (
            {"train_batch_size": 32},
            "but stages.sft.batch_size × stages.sft.gradient_accumulation_steps × 2 process(es) is 16",
        ),
        ({"gradient_clipping": 0.5}, "but transformers' default max_grad_norm is 1.0"),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}},
            "sets optimizer.params.lr: 0.1 (ds.json, line 5), but stages.sft.learning_rate is",
        ),
    ],
)
def test_trainer_values_in_the_file_must_be_the_stages(files, config, message):
    files("ds.json", config)
    error = refused(files, "{deepspeed: ds.json, num_processes: 2}")
    assert message in error, error


def test_a_pass_through_trainer_option_counts_as_the_stages_value(files):
    files("ds.json", {"gradient_clipping": 0.5})
    load(files, "{deepspeed: ds.json}", overrides=["stages.sft.max_grad_norm=0.5"])


def test_the_online_rl_loop_takes_the_same_config_and_refuses_what_cannot_apply_to_it(files):
    files("ds.json", {"train_micro_batch_size_per_gpu": 2})
    error = refused(files, "{deepspeed: ds.json}", GRPO)
    assert "stages.grpo: your DeepSpeed config sets train_micro_batch_size_per_gpu: 2" in error
    assert "but stages.grpo.mini_batch_size (micro_batch_size is not set) is 4" in error
    load(files, "{deepspeed: ds.json}", GRPO, overrides=["stages.grpo.micro_batch_size=2"])

    files("ds.json", {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}})
    error = refused(files, "{deepspeed: ds.json}", GRPO)
    assert "your DeepSpeed config's optimizer section (ds.json, line 2) cannot apply: this stage makes its own" in error

    files("ds.json", {"gradient_accumulation_steps": 4})
    assert "but DeepSpeed's accumulation in the online-RL loop (which accumulates itself) is 1" in refused(
        files, "{deepspeed: ds.json}", GRPO
    )


def test_an_auto_that_nothing_fills_is_refused(files):
    files("ds.json", {"zero_optimization": {"stage": 2, "sub_group_size": "auto"}})
    error = refused(files, "{deepspeed: ds.json}")
    assert 'sets zero_optimization.sub_group_size: "auto" (ds.json, line 4), which nothing fills in' in error


def test_the_rl_loop_fills_autos_as_transformers_does_for_a_trl_stage(files):
    from align.backend_files import hidden_size_fills
    from align.rl.loop import _deepspeed_values

    files(
        "ds.json",
        {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "train_micro_batch_size_per_gpu": "auto"},
    )
    loaded = load(
        files,
        "{deepspeed: ds.json, num_processes: 2}",
        GRPO.replace("mini_batch_size: 4", "mini_batch_size: 4, micro_batch_size: 2"),
    )
    values = {k: v for k, (v, _) in _deepspeed_values(loaded.stages["grpo"].config, "", loaded.backend).items()}
    config = fill_auto(fill_auto(deepspeed_config(loaded.backend), values), hidden_size_fills(128))
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 4 and config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert config["zero_optimization"]["reduce_bucket_size"] == 128 * 128
    assert "auto" not in json.dumps(config)


def test_a_stage_cannot_set_deepspeed_for_itself(files):
    """There is one way to give DeepSpeed a config: the backend's, which every stage (PPO included) gets."""
    for stages in (SFT, GRPO, "  ppo: {data: demo_math_prompts, reward_functions: [exact_answer]}\n"):
        name = stages.split(":")[0].strip()
        error = refused(files, "{kind: deepspeed}", stages, overrides=[f"stages.{name}.deepspeed=ds.json"])
        assert error.startswith(f"'stages.{name}.deepspeed' cannot be set in a recipe: `backend:` sets it"), error
        assert "backend: {deepspeed: ds_config.json}" in error


# ------------------------------------------------------------------------------------- fingerprints


def test_the_fingerprint_follows_the_files_content_not_their_names_nor_the_machine(files):
    files("ds.json", ZERO3)
    files("copy.json", ZERO3)
    first = resolve_backend({"deepspeed": "ds.json"}).identity()
    assert resolve_backend({"deepspeed": "copy.json"}).identity() == first
    assert (
        resolve_backend({"deepspeed": "ds.json", "machine_rank": 1, "num_machines": 2, "main_address": "h"}).identity()
        != first
    )  # machines count
    two = resolve_backend({"deepspeed": "ds.json", "num_machines": 2, "main_address": "a", "main_port": 1}).identity()
    assert (
        resolve_backend({"deepspeed": "ds.json", "num_machines": 2, "machine_rank": 1, "main_address": "b"}).identity()
        == two
    )
    files("ds.json", {**ZERO3, "steps_per_print": 1})
    assert resolve_backend({"deepspeed": "ds.json"}).identity() != first


def test_fsdp_config_becomes_the_trainers_fsdp_arguments(files, monkeypatch):
    import align.backend_files as backend_files

    monkeypatch.setattr(backend_files, "has_cuda", lambda: True)
    files(
        "accelerate.yaml",
        "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n"
        "  fsdp_offload_params: true\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_state_dict_type: FULL_STATE_DICT\n"
        "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n",
    )
    backend = resolve_backend({"accelerate_config": "accelerate.yaml"})
    assert backend.kind == "fsdp" and backend.num_processes == 2
    assert fsdp_arguments(backend) == {
        "fsdp": "shard_grad_op offload auto_wrap",
        "fsdp_config": {"use_orig_params": True, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
    }
    options = backend_files.fsdp_launch_options(backend)  # as `accelerate launch` reads them: true, not True
    assert options[options.index("--fsdp_offload_params") + 1] == "true"


# ------------------------------------------------------------------------------------ one real run


RECORD_DEEPSPEED = '''
"""Records the config every process hands DeepSpeed, with the stage that hands it."""
import json
import os

import deepspeed

from align import hookimpl

STAGE = {}
_initialize = deepspeed.initialize


def initialize(*args, **kwargs):
    with open(os.environ["ALIGN_TEST_DEEPSPEED_LOG"], "a") as log:
        config = kwargs.get("config_params") or kwargs.get("config")
        log.write(json.dumps({"stage": STAGE.get("name"), "rank": os.environ.get("RANK"), "config": config}) + "\\n")
    return _initialize(*args, **kwargs)


deepspeed.initialize = initialize


@hookimpl
def align_stage_starting(context):
    STAGE["name"] = context.name
'''


@pytest.mark.slow
def test_every_stage_trains_with_the_users_deepspeed_config_autos_filled(tmp_path):
    """SFT (a TRL stage, filled by transformers) and GRPO (the online-RL loop, filled by align) on two
    processes both hand DeepSpeed the user's file, with each stage's own values where it says "auto"."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "record_deepspeed.py").write_text(RECORD_DEEPSPEED)
    (tmp_path / "ds.json").write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": 123456},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    (tmp_path / "r.yaml").write_text(
        "model: tiny-llama\nbackend: {deepspeed: ds.json, num_processes: 2}\nstages:\n"
        "  sft: {data: demo_sft, max_steps: 2, batch_size: 4, gradient_accumulation_steps: 2, max_length: 128}\n"
        "  grpo: {data: demo_math_prompts, policy: sft, reward_functions: [exact_answer], steps: 1, batch_size: 2,\n"
        "         num_generations: 2, mini_batch_size: 4, micro_batch_size: 2, max_new_tokens: 8, save_steps: 0}\n"
    )
    log = tmp_path / "deepspeed.jsonl"
    result = run_align(
        "run", "r.yaml", "--run-dir", "run", "--plugins-dir", "plugins",
        cwd=tmp_path, env={"ALIGN_TEST_DEEPSPEED_LOG": str(log)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    by_stage = {stage: [r["config"] for r in seen if r["stage"] == stage] for stage in ("sft", "grpo")}
    assert len(by_stage["sft"]) == 2 and len(by_stage["grpo"]) == 2  # each of the two processes
    for config in by_stage["sft"] + by_stage["grpo"]:
        assert config["zero_optimization"]["allgather_bucket_size"] == 123456  # the user's own setting
        assert config["zero_optimization"]["stage"] == 2
        assert config["zero_optimization"]["reduce_bucket_size"] == 128 * 128  # tiny-llama's hidden size²
        assert "auto" not in json.dumps(config)
    sft, grpo = by_stage["sft"][0], by_stage["grpo"][0]
    assert (sft["train_micro_batch_size_per_gpu"], sft["gradient_accumulation_steps"], sft["train_batch_size"]) == (
        4,
        2,
        16,
    )
    assert (grpo["train_micro_batch_size_per_gpu"], grpo["gradient_accumulation_steps"], grpo["train_batch_size"]) == (
        2,
        1,
        4,
    )
    assert sft["gradient_clipping"] == 1.0 and grpo["gradient_clipping"] == 1.0
