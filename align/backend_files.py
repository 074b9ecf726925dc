"""The user's own DeepSpeed and accelerate configs, merged with the recipe's ``backend:``.

``backend: {deepspeed: ds_config.json}`` and ``backend: {accelerate_config: accelerate.yaml}`` name files a
team already has. What align sets from them, and how:

* Their values fill the backend settings that the recipe leaves out: a DeepSpeed config makes the kind
  ``deepspeed`` and gives the ZeRO stage, the offloads and the precision; an accelerate config gives the
  kind (``distributed_type``), the processes, the machines, the main address and port and the precision.
* A setting the recipe writes itself (or sets with an override) must agree with them, and two files must
  agree with each other. A disagreement is an :class:`~align.errors.AlignError` naming both values and
  where each comes from, when the recipe is checked; never does one of them silently win. The one
  exception is ``machine_rank``: one accelerate config serves every machine, and each machine names its
  own rank on its command line (``backend.machine_rank=1``), which wins over the file's.
* The DeepSpeed config reaches every stage that trains with DeepSpeed. TRL's stages hand it to
  transformers, which fills its ``"auto"`` values from the trainer's arguments; the online-RL loop fills
  them the same way from its own settings (:func:`fill_auto`). Where the file gives a number that a stage
  sets too (the micro-batch, accumulation, clipping, learning rate), the stage's must equal it:
  :func:`check_stage_values`, when the recipe is checked.
* Something align cannot do as a file asks (fp8, an NVMe offload through accelerate's pdsh launcher, a
  sharded FSDP state dict, …) is refused by name, with the file and line.

Relative paths are read from the current folder, as data files are (and as accelerate reads them).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.backend import has_cuda
from align.errors import AlignError
from align.schema import build, did_you_mean

if TYPE_CHECKING:
    from align.backend import Backend

__all__ = [
    "HF_FILLS",
    "RL_FILLS",
    "UserDeepSpeed",
    "check_stage_values",
    "deepspeed_config",
    "file_identity",
    "fill_auto",
    "fsdp_arguments",
    "fsdp_launch_options",
    "resolve_backend",
    "user_deepspeed",
]

#: The keys filled from the model's hidden size (``hidden_size_fills``), as transformers and accelerate do.
HIDDEN_SIZE_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)
#: DeepSpeed keys whose ``"auto"`` the online-RL loop fills. It has its own optimizer and schedule, so a
#: config with ``optimizer`` or ``scheduler`` sections is refused for it.
RL_FILLS = frozenset(
    {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
        "fp16.enabled",
        "bf16.enabled",
        *HIDDEN_SIZE_KEYS,
    }
)
#: DeepSpeed keys whose ``"auto"`` transformers fills for a TRL stage (its ``HfTrainerDeepSpeedConfig``):
#: the online-RL loop's, and the optimizer's and schedule's.
HF_FILLS = RL_FILLS | {
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr",
    "scheduler.params.warmup_max_lr",
    "scheduler.params.warmup_num_steps",
    "scheduler.params.total_num_steps",
}

_BACKEND_KINDS = {"NO": "single", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "DEEPSPEED": "deepspeed", "FSDP": "fsdp"}
_PRECISIONS = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass
class _Claim:
    """What a file says about one backend setting."""

    setting: str
    fill: Any  #: the value it gives the setting when the recipe leaves it out; None: it only rules values out
    says: str  #: what the file says, as written there (``zero_optimization.stage: 3``)
    where: str  #: the file and line
    accepts: Callable[[Any], bool] | None = None  #: whether a value agrees with it (default: equals ``fill``)

    def agrees(self, value: Any) -> bool:
        return self.accepts(value) if self.accepts is not None else value == self.fill


@dataclass
class UserDeepSpeed:
    """The user's DeepSpeed config: the JSON file's content with what the accelerate config's
    ``deepspeed_config`` adds, and where each key was written (``ds.json, line 4``)."""

    config: dict[str, Any]
    where: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def source(self, key: str) -> str:
        """Where ``key`` (dotted) was written: its own line, else its section's, else the file."""
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            found = self.where.get(".".join(parts[:end]))
            if found:
                return found
        return " and ".join(self.files)


@dataclass
class _Accelerate:
    """What an accelerate config says, read and checked."""

    path: str
    claims: list[_Claim]
    deepspeed: dict[str, tuple[Any, str]]  #: DeepSpeed key (dotted) → (value, where)
    deepspeed_file: tuple[str, str] | None  #: (path, where) of its deepspeed_config_file
    fsdp: dict[str, Any]
    total_processes: tuple[int, str] | None  #: num_processes (of all machines), where


# ------------------------------------------------------------------------------------------ reading files
@functools.lru_cache(maxsize=32)
def _read_text(path: str, stamp: tuple[int, int]) -> str:
    return Path(path).read_text(encoding="utf-8")


def _text(path: str, key: str, what: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise AlignError(
            f"{key}: {path}: no such file" + (" (it is a folder)" if file.is_dir() else ""),
            hint=f"give the path of your {what}, from the folder you run align in, or an absolute one",
        )
    stat = file.stat()
    try:
        return _read_text(str(file), (stat.st_mtime_ns, stat.st_size))
    except UnicodeDecodeError:
        raise AlignError(f"{key}: {path}: not a text file (not UTF-8)", hint=f"give your {what}") from None
    except OSError as error:
        raise AlignError(f"{key}: {path}: cannot be read: {error.strerror or error}") from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def _json_line(text: str, key: str) -> int | None:
    """The line of a dotted key in a JSON text: each part searched after its parent's (good enough for
    the configs people write, which name each key once per section)."""
    position = 0
    for part in key.split("."):
        match = re.compile(rf'"{re.escape(part)}"\s*:').search(text, position)
        if match is None:
            return None
        position = match.start()
    return text.count("\n", 0, position) + 1


def _read_deepspeed(path: str, key: str) -> UserDeepSpeed:
    text = _text(path, key, "DeepSpeed config (a JSON file)")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as error:
        raise AlignError(
            f"{key}: {path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            hint="a DeepSpeed config is JSON: double quotes, no comments, no trailing commas",
        ) from None
    except _DuplicateKey as error:
        lines = [n + 1 for n, line in enumerate(text.splitlines()) if f'"{error.key}"' in line]
        shown = f" (lines {', '.join(map(str, lines))})" if len(lines) > 1 else ""
        raise AlignError(
            f"{key}: {path}: key '{error.key}' appears twice in one object{shown}",
            hint="DeepSpeed refuses it too: keep one of them",
        ) from None
    if not isinstance(data, dict):
        raise AlignError(f"{key}: {path}: expected a JSON object (a DeepSpeed config), got {type(data).__name__}")
    where: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for name, value in node.items():
            dotted = f"{prefix}{name}"
            line = _json_line(text, dotted)
            where[dotted] = f"{path}, line {line}" if line else path
            if isinstance(value, Mapping):
                walk(value, f"{dotted}.")

    walk(data, "")
    for section in _DEEPSPEED_SECTIONS:  # sections align adds to: a value of another type would break it late
        if section in data and not isinstance(data[section], Mapping):
            raise AlignError(
                f"{key}: {where[section]}: {section} must be an object, got {_shown(data[section])}",
                hint=f'write "{section}": {{"enabled": true}}'
                if section in ("bf16", "bfloat16", "fp16")
                else f'write "{section}": {{...}} as DeepSpeed\'s documentation shows',
            )
    return UserDeepSpeed(data, where, [path])


#: The sections of a DeepSpeed config that are objects, and that align reads or adds to.
_DEEPSPEED_SECTIONS = ("zero_optimization", "bf16", "bfloat16", "fp16", "optimizer", "scheduler")


def _read_yaml(path: str, key: str) -> tuple[dict[str, Any], dict[str, int]]:
    """An accelerate config's content, and the line of each (dotted) key."""
    import yaml

    from align.recipe import parse_yaml

    text = _text(path, key, "accelerate config (the YAML file `accelerate config` writes)")
    data = parse_yaml(text, f"{key}: {path}")
    node = yaml.compose(text, Loader=yaml.SafeLoader)  # for the keys' lines; it parsed above
    if not isinstance(data, dict):
        raise AlignError(f"{key}: {path}: expected a mapping (an accelerate config, as `accelerate config` writes it)")
    lines: dict[str, int] = {}

    def walk(current: Any, prefix: str) -> None:
        if isinstance(current, yaml.MappingNode):
            for name, value in current.value:
                dotted = f"{prefix}{name.value}"
                lines[dotted] = name.start_mark.line + 1
                walk(value, f"{dotted}.")

    walk(node, "")
    return data, lines


# ------------------------------------------------------------------------------- the accelerate config
#: accelerate's config keys that change nothing align does, when they hold these values.
_ACCELERATE_HARMLESS: dict[str, Callable[[Any], bool]] = {
    "compute_environment": lambda v: v in (None, "LOCAL_MACHINE"),
    "debug": lambda v: True,
    "main_training_function": lambda v: True,
    "same_network": lambda v: True,
    "rdzv_backend": lambda v: v in (None, "static"),
    "gpu_ids": lambda v: v in (None, "all", ""),
    "downcast_bf16": lambda v: v in (None, False, "no"),
    "enable_cpu_affinity": lambda v: not v,
    "dynamo_backend": lambda v: v in (None, "NO", "no"),
    "dynamo_config": lambda v: not v or (isinstance(v, Mapping) and str(v.get("dynamo_backend", "NO")).upper() == "NO"),
    "fp8_config": lambda v: not v,
    "parallelism_config": lambda v: not v,
    "megatron_lm_config": lambda v: not v,
    "mpirun_config": lambda v: not v,
    "ipex_config": lambda v: not v,
    "tpu_name": lambda v: not v,
    "tpu_zone": lambda v: not v,
    "tpu_use_cluster": lambda v: not v,
    "tpu_use_sudo": lambda v: not v,
    "tpu_vm": lambda v: not v,
    "tpu_env": lambda v: not v,
    "command_file": lambda v: not v,
    "commands": lambda v: not v,
}
_ACCELERATE_WHY = {
    "compute_environment": "align runs on the machines it is started on (LOCAL_MACHINE)",
    "rdzv_backend": "align's machines meet at main_address:main_port (static)",
    "gpu_ids": "align uses every GPU it sees: choose them with CUDA_VISIBLE_DEVICES",
    "downcast_bf16": "it is for TPUs, which align does not run on",
    "enable_cpu_affinity": "align does not pin processes to CPUs",
    "dynamo_backend": "align does not compile models with torch.compile",
    "dynamo_config": "align does not compile models with torch.compile",
    "fp8_config": "align trains in fp32, bf16 or fp16",
    "parallelism_config": "align parallelises over data only (ddp, deepspeed, fsdp)",
    "megatron_lm_config": "align does not run Megatron-LM",
    "mpirun_config": "start align under mpirun yourself: it runs in place there",
    "ipex_config": "align does not use Intel's extension",
}
_ACCELERATE_KEYS = (
    "distributed_type",
    "num_processes",
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "mixed_precision",
    "use_cpu",
    "fp16",
    "deepspeed_config",
    "fsdp_config",
    *_ACCELERATE_HARMLESS,
)

#: accelerate's deepspeed_config keys and the DeepSpeed keys they set (as accelerate's DeepSpeedPlugin does).
_ACCELERATE_DEEPSPEED = {
    "zero_stage": "zero_optimization.stage",
    "offload_optimizer_device": "zero_optimization.offload_optimizer.device",
    "offload_param_device": "zero_optimization.offload_param.device",
    "offload_optimizer_nvme_path": "zero_optimization.offload_optimizer.nvme_path",
    "offload_param_nvme_path": "zero_optimization.offload_param.nvme_path",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping",
    "zero3_save_16bit_model": "zero_optimization.stage3_gather_16bit_weights_on_model_save",
}
_ACCELERATE_DEEPSPEED_OTHER = (
    "deepspeed_config_file",
    "zero3_init_flag",
    "deepspeed_multinode_launcher",
    "deepspeed_hostfile",
    "deepspeed_exclusion_filter",
    "deepspeed_inclusion_filter",
    "deepspeed_moe_layer_cls_names",
)

#: accelerate's fsdp_config keys that `accelerate launch` takes as options (``--fsdp_...``) and transformers
#: takes in ``fsdp_config`` (without the prefix).
_FSDP_KEYS = (
    "fsdp_version",
    "fsdp_sharding_strategy",
    "fsdp_reshard_after_forward",
    "fsdp_offload_params",
    "fsdp_auto_wrap_policy",
    "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_min_num_params",
    "fsdp_backward_prefetch",
    "fsdp_forward_prefetch",
    "fsdp_state_dict_type",
    "fsdp_use_orig_params",
    "fsdp_cpu_ram_efficient_loading",
    "fsdp_sync_module_states",
    "fsdp_activation_checkpointing",
)


def _read_accelerate(path: str, key: str) -> _Accelerate:
    data, lines = _read_yaml(path, key)

    def at(name: str) -> str:
        return f"{path}, line {lines[name]}" if name in lines else path

    def refuse(name: str, message: str, hint: str | None = None) -> AlignError:
        return AlignError(f"{key}: {at(name)}: {message}", hint=hint)

    for name in data:
        if name not in _ACCELERATE_KEYS:
            raise refuse(
                name,
                f"unknown accelerate config key '{name}'{did_you_mean(str(name), _ACCELERATE_KEYS)}",
                "align reads the keys that `accelerate config` writes",
            )
    for name, harmless in _ACCELERATE_HARMLESS.items():
        if name in data and not harmless(data[name]):
            why = _ACCELERATE_WHY.get(name, "it is for TPUs, which align does not run on")
            raise refuse(name, f"{name}: {data[name]!r} is not something align can do: {why}", "remove it")

    claims: list[_Claim] = []
    kind = data.get("distributed_type")
    if kind is None:
        raise AlignError(
            f"{key}: {path}: no distributed_type", hint="accelerate needs one too: NO, MULTI_GPU, DEEPSPEED, FSDP …"
        )
    if kind not in _BACKEND_KINDS:
        raise refuse(
            "distributed_type",
            f"distributed_type {kind!r} is not a backend align runs",
            f"align runs {', '.join(_BACKEND_KINDS)} (single, ddp, ddp, deepspeed, fsdp)",
        )
    claims.append(_Claim("kind", _BACKEND_KINDS[kind], f"distributed_type: {kind}", at("distributed_type")))

    total = None
    for name in ("num_machines", "machine_rank"):
        if data.get(name) is not None:
            rank = name == "machine_rank"
            value = _int(data[name], f"{key}: {at(name)}: {name}", minimum=0 if rank else 1)
            # Each machine names its own rank (backend.machine_rank=1): one accelerate config serves them all.
            claims.append(_Claim(name, value, f"{name}: {value}", at(name), accepts=_anything if rank else None))
    if data.get("num_processes") not in (None, -1):  # -1: accelerate's "not set"
        total = (_int(data["num_processes"], f"{key}: {at('num_processes')}: num_processes", 1), at("num_processes"))
    if data.get("main_process_ip"):
        ip = str(data["main_process_ip"])
        claims.append(_Claim("main_address", ip, f"main_process_ip: {ip}", at("main_process_ip")))
    if data.get("main_process_port") is not None:
        port = _int(data["main_process_port"], f"{key}: {at('main_process_port')}: main_process_port", 1)
        claims.append(_Claim("main_port", port, f"main_process_port: {port}", at("main_process_port")))
    precision = data.get("mixed_precision")
    if precision is None and data.get("fp16"):  # accelerate's older format
        precision = "fp16"
    if precision is not None:
        if precision not in _PRECISIONS:
            raise refuse(
                "mixed_precision",
                f"mixed_precision {precision!r} is not a precision align trains in",
                "use no, bf16 or fp16",
            )
        claims.append(
            _Claim("precision", _PRECISIONS[precision], f"mixed_precision: {precision}", at("mixed_precision"))
        )
    if data.get("use_cpu") and has_cuda():
        raise refuse("use_cpu", "use_cpu: true, but align trains on this machine's GPUs", "remove use_cpu")

    def section(name: str, needs: str) -> Mapping[str, Any]:
        """The config's ``name`` mapping, which only distributed_type ``needs`` may set."""
        found = data.get(name) or {}
        if not isinstance(found, Mapping):
            raise refuse(name, f"{name} must be a mapping", "as `accelerate config` writes it")
        if found and kind != needs:
            raise refuse(
                name,
                f"{name} is set, but distributed_type is {kind}",
                f"set distributed_type: {needs}, or remove {name}",
            )
        return found

    deepspeed: dict[str, tuple[Any, str]] = {}
    deepspeed_file = None
    deepspeed_section = section("deepspeed_config", "DEEPSPEED")
    for name, value in deepspeed_section.items():
        where = at(f"deepspeed_config.{name}")
        if name in _ACCELERATE_DEEPSPEED:
            if value is not None:
                deepspeed[_ACCELERATE_DEEPSPEED[name]] = (value, f"{where} (deepspeed_config.{name})")
        elif name == "deepspeed_config_file":
            if value not in (None, "", "none"):
                deepspeed_file = (str(value), where)
        elif name == "zero3_init_flag":
            if value is False and deepspeed_section.get("zero_stage") == 3:
                raise AlignError(
                    f"{key}: {where}: zero3_init_flag: false, but align builds ZeRO-3 models partitioned as they "
                    "load (otherwise each process would hold the whole model first)",
                    hint="set it to true, or remove it",
                )
        elif name == "deepspeed_multinode_launcher":
            if value not in (None, "standard"):
                raise AlignError(
                    f"{key}: {where}: deepspeed_multinode_launcher: {value}: align starts the machines of a run "
                    "with accelerate's standard launcher, or runs under srun, mpirun or torchrun as started",
                    hint="remove it, and start `align run` on each machine (or under srun): see the README, "
                    "'Several machines'",
                )
        elif name in _ACCELERATE_DEEPSPEED_OTHER:
            if value not in (None, "", [], "none"):
                raise AlignError(
                    f"{key}: {where}: deepspeed_config.{name} is for DeepSpeed's own pdsh launcher, which align "
                    "does not use",
                    hint="remove it: start `align run` on each machine, or under srun",
                )
        else:
            known = [*_ACCELERATE_DEEPSPEED, *_ACCELERATE_DEEPSPEED_OTHER]
            raise AlignError(f"{key}: {where}: unknown deepspeed_config key '{name}'{did_you_mean(str(name), known)}")

    fsdp = section("fsdp_config", "FSDP")
    for name, value in fsdp.items():
        if name not in _FSDP_KEYS:
            raise refuse(
                f"fsdp_config.{name}", f"unknown fsdp_config key '{name}'{did_you_mean(str(name), _FSDP_KEYS)}"
            )
        if name == "fsdp_state_dict_type" and str(value).upper() != "FULL_STATE_DICT":
            raise refuse(
                f"fsdp_config.{name}",
                f"fsdp_state_dict_type: {value}: align publishes whole checkpoints that transformers and vLLM load",
                "use FULL_STATE_DICT, or remove it",
            )
    return _Accelerate(path, claims, deepspeed, deepspeed_file, dict(fsdp), total)


def _other_than(value: Any) -> Callable[[Any], bool]:
    return lambda found: found != value


def _anything(value: Any) -> bool:
    return True


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AlignError(f"{where} must be a whole number of at least {minimum}; got {value!r}")
    return value


# ------------------------------------------------------------------------------- the DeepSpeed config
def _get(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, Mapping):
        return [path for k, v in node.items() for path in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "auto" else []


def user_deepspeed(backend: Backend) -> UserDeepSpeed | None:
    """The user's DeepSpeed config for this backend (its JSON file and the accelerate config's
    ``deepspeed_config``), or None when neither gives one."""
    accelerate = (
        _read_accelerate(backend.accelerate_config, "backend.accelerate_config") if backend.accelerate_config else None
    )
    return _merged_deepspeed(backend.deepspeed, accelerate)


def _merged_deepspeed(path: str | None, accelerate: _Accelerate | None) -> UserDeepSpeed | None:
    user = _read_deepspeed(path, "backend.deepspeed") if path else None
    if accelerate is None or not accelerate.deepspeed:
        return user
    user = user or UserDeepSpeed({}, {}, [])
    user = UserDeepSpeed(copy.deepcopy(user.config), dict(user.where), [*user.files, accelerate.path])
    for key, (value, where) in accelerate.deepspeed.items():
        found = _get(user.config, key)
        if found is not None and found != "auto" and found != value:
            raise AlignError(
                f"backend: your DeepSpeed config {user.source(key)} sets {key}: {_shown(found)}, but "
                f"{where} sets {_shown(value)}",
                hint="make the two files agree (or write the value in one of them only)",
            )
        _set(user.config, key, value)
        user.where[key] = where
    return user


def _deepspeed_claims(user: UserDeepSpeed) -> list[_Claim]:
    """What a DeepSpeed config says about the backend's settings."""
    config, claims = user.config, []
    claims.append(_Claim("kind", "deepspeed", "it is a DeepSpeed config (kind deepspeed)", " and ".join(user.files)))
    stage = _get(config, "zero_optimization.stage")
    if stage is not None:
        if stage not in (1, 2, 3) or isinstance(stage, bool):
            hint = "ZeRO stage 0 is data parallelism without sharding: use backend kind: ddp" if stage == 0 else ""
            raise AlignError(
                f"backend: {user.source('zero_optimization.stage')}: zero_optimization.stage {stage!r} is not a "
                "ZeRO stage align runs (1, 2 or 3)",
                hint=hint or "use 1, 2 or 3",
            )
        claims.append(
            _Claim("zero_stage", stage, f"zero_optimization.stage: {stage}", user.source("zero_optimization.stage"))
        )
    for section, setting in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_params")):
        key = f"zero_optimization.{section}.device"
        device = _get(config, key)
        if device is None and isinstance(_get(config, f"zero_optimization.{section}"), Mapping):
            device = "none"  # DeepSpeed's default device
        if device is None:
            continue
        if device not in _OFFLOAD_DEVICES:
            raise AlignError(
                f"backend: {user.source(key)}: {key} {device!r} is not an offload device (none, cpu or nvme)"
            )
        claims.append(_Claim(setting, device != "none", f"{key}: {device}", user.source(key)))
    bf16_key = "bfloat16" if "bfloat16" in config else "bf16"
    flags = {"bf16": _get(config, f"{bf16_key}.enabled"), "fp16": _get(config, "fp16.enabled")}
    for precision, enabled in flags.items():
        key = f"{bf16_key if precision == 'bf16' else 'fp16'}.enabled"
        if enabled is True:
            claims.append(_Claim("precision", precision, f"{key}: true", user.source(key)))
        elif enabled is False:
            claims.append(_Claim("precision", None, f"{key}: false", user.source(key), accepts=_other_than(precision)))
        elif enabled not in (None, "auto"):
            raise AlignError(f'backend: {user.source(key)}: {key} must be true, false or "auto"; got {enabled!r}')
    gather = _get(config, "zero_optimization.stage3_gather_16bit_weights_on_model_save")
    if gather is False:
        key = "zero_optimization.stage3_gather_16bit_weights_on_model_save"
        claims.append(
            _Claim(
                "zero_stage",
                None,
                f"{key}: false",
                user.source(key),
                accepts=lambda v: v != 3,
            )
        )
    return claims


# ------------------------------------------------------------------------------------ the backend
def resolve_backend(data: Any, path: str = "backend") -> Backend:
    """The recipe's ``backend:`` section, merged with the config files it names (see the module's doc)."""
    from align.backend import Backend

    if data is None:
        data = {}
    if not isinstance(data, Mapping) or not (data.get("deepspeed") or data.get("accelerate_config")):
        return build(Backend, data, path)
    # The two file settings first, so that their own mistakes are told as such.
    build(Backend, {k: data[k] for k in ("deepspeed", "accelerate_config") if k in data}, path)
    explicit = dict(data)
    accelerate = (
        _read_accelerate(explicit["accelerate_config"], f"{path}.accelerate_config")
        if explicit.get("accelerate_config")
        else None
    )
    claims: list[_Claim] = list(accelerate.claims) if accelerate else []
    if accelerate and accelerate.deepspeed_file:
        file, where = accelerate.deepspeed_file
        given = explicit.get("deepspeed")
        if given and Path(given).expanduser().resolve() != Path(file).expanduser().resolve():
            raise AlignError(
                f"{path}: the recipe's {path}.deepspeed is {given}, but {where} names another DeepSpeed config "
                f"(deepspeed_config_file: {file})",
                hint="name one DeepSpeed config, in one of the two places",
            )
        explicit.setdefault("deepspeed", file)
    user = _merged_deepspeed(explicit.get("deepspeed"), accelerate)
    if user is not None:
        claims += _deepspeed_claims(user)

    merged = dict(explicit)
    origin = {k: f"the recipe sets {path}.{k}: {_plain(v)}" for k, v in explicit.items()}
    for claim in claims:
        if claim.setting in merged or claim.fill is None:
            continue
        merged[claim.setting] = claim.fill
        origin[claim.setting] = f"{claim.where} says {claim.says}"
    if accelerate is not None and accelerate.total_processes is not None:
        total, where = accelerate.total_processes
        machines = merged.get("num_machines", 1)
        if "num_processes" not in merged and isinstance(machines, int) and machines > 0 and total % machines == 0:
            merged["num_processes"] = total // machines
            origin["num_processes"] = f"{where} says num_processes: {total} (of {machines} machine(s))"
    defaults = {f.name: f.default for f in dataclasses.fields(Backend)}
    for claim in claims:  # before the backend is built: its own checks would hide where a value came from
        value = merged.get(claim.setting, defaults[claim.setting])
        if claim.agrees(value):
            continue
        told = origin.get(claim.setting, f"align's default is {claim.setting}: {_plain(value)}")
        if claim.says.endswith("stage3_gather_16bit_weights_on_model_save: false"):
            raise AlignError(
                f"{path}: {claim.where} says {claim.says}, but ZeRO-3 here ({told}) must gather the weights "
                "when a stage saves: align publishes whole checkpoints that transformers and vLLM load",
                hint="set it to true, or remove it",
            )
        raise _conflict(path, claim.setting, f"{claim.where} says {claim.says}", told, explicit)
    try:
        backend = build(Backend, merged, path)
    except AlignError as error:
        from_files = [origin[k] for k in merged if k not in explicit and k in origin]
        if not from_files:
            raise
        raise AlignError(f"{error.message} (from your config files: {'; '.join(from_files)})", error.hint) from None
    if accelerate is not None and accelerate.total_processes is not None:
        total, where = accelerate.total_processes
        if total != backend.world_size:
            told = f"backend.num_processes {backend.num_processes} per machine × num_machines {backend.num_machines}"
            raise AlignError(
                f"{path}: {where} says num_processes: {total} (accelerate counts the processes of all machines), "
                f"but {told} = {backend.world_size}",
                hint="make them agree, or leave num_processes out of the recipe to take the file's",
            )
    return backend


def _conflict(path: str, setting: str, file_says: str, told: str, explicit: Mapping[str, Any]) -> AlignError:
    hint = (
        f"make them agree, or leave {setting} out of the recipe to take the file's"
        if setting in explicit
        else "make the two files agree"
    )
    return AlignError(f"{path}.{setting}: {file_says}, but {told}", hint=hint)


def _plain(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, str)) or value is None else str(value)


# ------------------------------------------------------------------------------------ for the stages
def deepspeed_config(backend: Backend) -> dict[str, Any]:
    """The DeepSpeed config every stage of this backend trains with: the user's (when given) with align's
    settings for the ZeRO stage, offloads and precision, and ``"auto"`` for what each stage fills in."""
    user = user_deepspeed(backend)
    config = copy.deepcopy(user.config) if user else {}
    cuda = has_cuda()
    if "bfloat16" in config:  # DeepSpeed's other name for it; transformers fills "bf16" only
        config["bf16"] = {**config.pop("bfloat16"), **config.get("bf16", {})}
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = backend.zero_stage
    if backend.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": cuda})
    if backend.offload_params:
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": cuda})
    if backend.zero_stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)  # save a whole checkpoint, not shards
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        config.setdefault(key, "auto")
    for precision in ("bf16", "fp16"):
        config.setdefault(precision, {}).setdefault("enabled", "auto")
    return config


def check_stage_values(
    backend: Backend,
    key: str,
    values: Mapping[str, tuple[Any, str]],
    fills: frozenset[str],
    own_optimizer: bool = False,
) -> None:
    """Refuse, when the recipe is checked, a DeepSpeed config whose numbers disagree with a stage's.

    :param key: the stage's key path (``stages.sft``), for messages.
    :param values: DeepSpeed key (dotted) → (the stage's value, where that comes from).
    :param fills: the keys whose ``"auto"`` the stage's trainer fills (:data:`HF_FILLS`, :data:`RL_FILLS`);
        any other ``"auto"`` would reach DeepSpeed as it is.
    :param own_optimizer: the stage builds its own optimizer and schedule, so that the config's
        ``optimizer`` and ``scheduler`` sections cannot apply.
    """
    if backend.kind != "deepspeed":
        return
    user = user_deepspeed(backend)
    if user is None:
        return
    if own_optimizer:
        for section in ("optimizer", "scheduler"):
            if section in user.config:
                raise AlignError(
                    f"{key}: your DeepSpeed config's {section} section ({user.source(section)}) cannot apply: this "
                    "stage makes its own optimizer and learning-rate schedule",
                    hint=f"remove the {section} section from the config; the stage's own settings (learning_rate, "
                    "lr_scheduler_type) choose them",
                )
    for path in _auto_paths(user.config):
        if path.replace("bfloat16.", "bf16.") not in fills:
            raise AlignError(
                f'{key}: your DeepSpeed config sets {path}: "auto" ({user.source(path)}), which nothing fills in '
                "for this stage",
                hint=f'give it a number; "auto" is filled for: {", ".join(sorted(fills))}',
            )
    for path, (value, where) in values.items():
        found = _get(user.config, path)
        if found is None or found == "auto" or _same(found, value):
            continue
        setting = where.split(" ")[0] if where.startswith("stages.") and "×" not in where else None
        raise AlignError(
            f"{key}: your DeepSpeed config sets {path}: {_shown(found)} ({user.source(path)}), but {where} is "
            f"{_shown(value)}",
            hint='write "auto" in the config, so that each stage\'s own value is used'
            + (f", or set {setting}: {_shown(found)}" if setting else ""),
        )


def _same(found: Any, value: Any) -> bool:
    if isinstance(found, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(found) == len(value) and all(_same(a, b) for a, b in zip(found, value, strict=True))
    if isinstance(found, bool) or isinstance(value, bool):
        return found is value
    if isinstance(found, (int, float)) and isinstance(value, (int, float)):
        return abs(found - value) <= 1e-12 * max(abs(found), abs(value), 1)
    return bool(found == value)


def fill_auto(config: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with each ``"auto"`` at a key of ``values`` replaced by that value (what transformers does
    for a TRL stage, for a stage that drives DeepSpeed itself)."""
    filled = copy.deepcopy(config)
    for key, value in values.items():
        if _get(filled, key) == "auto":
            _set(filled, key, value)
    return filled


def hidden_size_fills(hidden_size: int) -> dict[str, int]:
    """The bucket sizes transformers and accelerate derive from the model's hidden size."""
    return {
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }


def fsdp_arguments(backend: Backend) -> dict[str, Any]:
    """``TrainingArguments`` for FSDP: align's (full shard, auto wrap, original parameters) and the
    accelerate config's ``fsdp_config``."""
    fsdp = _user_fsdp(backend)
    options = {name.removeprefix("fsdp_"): value for name, value in fsdp.items()}
    strategy = str(options.pop("sharding_strategy", "FULL_SHARD")).lower()
    strategy = {"1": "full_shard", "2": "shard_grad_op", "3": "no_shard", "4": "hybrid_shard"}.get(strategy, strategy)
    words = [strategy]
    if options.pop("offload_params", False):
        words.append("offload")
    if str(options.pop("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")).upper() != "NO_WRAP":
        words.append("auto_wrap")
    options.pop("state_dict_type", None)  # FULL_STATE_DICT: checked when the recipe was
    return {"fsdp": " ".join(words), "fsdp_config": {"use_orig_params": True, **options}}


def fsdp_launch_options(backend: Backend) -> list[str]:
    """The accelerate config's ``fsdp_config`` as ``accelerate launch`` options, for the online-RL loop,
    whose accelerator reads them from the launcher."""
    return [item for name, value in _user_fsdp(backend).items() for item in (f"--{name}", _launch_value(value))]


def _launch_value(value: Any) -> str:
    """A config value as ``accelerate launch`` reads it on its command line: lists comma-separated (the
    layer classes to wrap), booleans lowercase."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _user_fsdp(backend: Backend) -> dict[str, Any]:
    if not backend.accelerate_config:
        return {}
    return _read_accelerate(backend.accelerate_config, "backend.accelerate_config").fsdp


def file_identity(backend: Backend) -> dict[str, Any]:
    """What the config files change beyond the backend's settings, for fingerprints: the user's DeepSpeed
    config and fsdp_config as they apply. A changed value reruns the stages; a renamed or moved file, or an
    accelerate config that differs only in what it says about this machine (machine_rank), does not."""
    found: dict[str, Any] = {}
    user = user_deepspeed(backend)
    if user is not None:
        found["deepspeed_config"] = hashlib.sha256(json.dumps(user.config, sort_keys=True).encode()).hexdigest()
    fsdp = _user_fsdp(backend)
    if fsdp:
        found["fsdp_config"] = fsdp
    return found
