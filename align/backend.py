"""The shared backend: how every stage of a recipe runs, on one process or many.

``backend:`` in a recipe picks single-process, DDP, DeepSpeed ZeRO or FSDP, the precision and the number
of processes and machines; it may also name the user's own DeepSpeed and accelerate configs
(:mod:`align.backend_files`). With more than one process, ``align run`` starts itself again under
``accelerate launch``, unless torchrun, accelerate, srun or mpirun started it (:mod:`align.launchers`);
the same recipe runs either way. What the hardware cannot do is refused when the recipe is checked, never
replaced by something else (accelerate, left alone, turns FSDP on a CPU into DDP or into unsynchronised
copies of one training).

Which process writes the run folder: rank 0. Machines that do not share a run folder each keep a whole one
of their own, written by the machine's first process (:func:`set_own_run_folders`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import shutil
import sys
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.errors import AlignError
from align.schema import setting

__all__ = [
    "BACKEND_OPTIONS",
    "Backend",
    "agree",
    "any_process",
    "has_cuda",
    "is_main_process",
    "is_rank_zero",
    "join_process_group",
    "rank",
    "share",
    "trainer_arguments",
    "wait_for_everyone",
]

#: Set in the processes that ``align run`` launches, so that they run instead of launching again.
LAUNCHED_ENV = "ALIGN_LAUNCHED"
#: The pid of the ``align run`` that launched them, which they stop without (:func:`follow_launcher`).
LAUNCHER_ENV = "ALIGN_LAUNCHER_PID"


@dataclass
class Backend:
    """How stages run. Every stage of a recipe shares it."""

    kind: Literal["single", "ddp", "deepspeed", "fsdp"] = setting(
        "single",
        help="`single`: one process. `ddp`: data parallel, a full copy per process. `deepspeed`: "
        "ZeRO sharding (see zero_stage). `fsdp`: fully sharded data parallel (GPU only).",
    )
    num_processes: int = setting(
        1,
        help="Processes per machine: usually one per GPU; on a CPU, 2 or more run DDP or DeepSpeed over gloo.",
        minimum=1,
    )
    num_machines: int = setting(
        1, help="Machines taking part; start `align run` on each with its machine_rank.", minimum=1
    )
    machine_rank: int = setting(0, help="This machine's rank, 0 to num_machines - 1.", minimum=0)
    main_address: str | None = setting(None, help="Address of machine 0 (needed when num_machines > 1).")
    main_port: int = setting(29500, help="Port machine 0 listens on for the others.", minimum=1, maximum=65535)
    zero_stage: Literal[1, 2, 3] = setting(
        2, help="DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: bool = setting(False, help="DeepSpeed: keep optimizer states in CPU memory.")
    offload_params: bool = setting(False, help="DeepSpeed ZeRO-3: keep parameters in CPU memory.")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", help="Training precision. bf16 halves memory on hardware that supports it; fp16 needs a GPU."
    )
    deepspeed: str | None = setting(
        None,
        help="Your DeepSpeed config (a JSON file): it implies kind: deepspeed, fills the backend settings the "
        'recipe leaves out, and must agree with those it sets; its "auto" values are filled from each stage.',
    )
    accelerate_config: str | None = setting(
        None,
        help="Your accelerate config (the YAML file of `accelerate config`): distributed_type, num_processes "
        "(of all machines), num_machines, mixed_precision, deepspeed_config, fsdp_config, … fill the backend "
        "settings the recipe leaves out, and must agree with those it sets.",
    )

    def __post_init__(self) -> None:
        if self.num_processes < 1 or self.num_machines < 1:
            raise AlignError("backend: num_processes and num_machines must be at least 1")
        if not 0 <= self.machine_rank < self.num_machines:
            raise AlignError(f"backend: machine_rank {self.machine_rank} must lie in 0..{self.num_machines - 1}")
        if self.num_machines > 1 and not self.main_address and not _launcher_tells_address():
            raise AlignError(
                "backend: several machines need `main_address`, the address of machine 0",
                hint="set it, or start `align run` under srun or torchrun, which tell it",
            )
        if self.offload_params and (self.kind != "deepspeed" or self.zero_stage != 3):
            raise AlignError("backend: offload_params needs kind: deepspeed with zero_stage: 3")
        if self.offload_optimizer and self.kind != "deepspeed":
            raise AlignError("backend: offload_optimizer needs kind: deepspeed")
        if self.kind == "single" and self.world_size > 1:
            raise AlignError(
                f"backend: kind: single runs one process, but {self.world_size} were asked for",
                hint="choose kind: ddp, deepspeed or fsdp for several processes",
            )

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def identity(self) -> dict[str, Any]:
        """What of the backend changes what a stage produces, for its fingerprint: every setting but where
        the processes meet (machine_rank, main_address, main_port), which differ from machine to machine of
        one run; of the user's config files, their content counts, not their names."""
        from align.backend_files import file_identity

        plain = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("machine_rank", "main_address", "main_port", "deepspeed", "accelerate_config")
        }
        return {**plain, **file_identity(self)}


def _launcher_tells_address() -> bool:
    """Whether the launcher that started this process tells machine 0's address (see align.launchers)."""
    slurm_nodes = any(k in os.environ for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    return "MASTER_ADDR" in os.environ or ("SLURM_STEP_ID" in os.environ and slurm_nodes)


def check_hardware(backend: Backend) -> None:
    """Refuse what this machine cannot run, before any work. Imports torch only when it must ask."""
    needs_gpu = backend.kind == "fsdp" or backend.precision == "fp16"
    if not needs_gpu:
        return
    if has_cuda():
        return
    if backend.kind == "fsdp":
        raise AlignError(
            "backend: fsdp needs CUDA GPUs, and this machine has none",
            hint="on a CPU use kind: ddp or kind: deepspeed (ZeRO 1-3 run over gloo); "
            "accelerate would otherwise silently run DDP or unsynchronised copies instead",
        )
    raise AlignError("backend: precision fp16 needs a GPU; use fp32 or bf16 on a CPU")


def must_launch(backend: Backend) -> bool:
    """Whether ``align run`` has to start itself again under accelerate (not when it was launched already:
    by itself, or by an outside launcher that :func:`align.launchers.outside_launcher` found)."""
    return backend.distributed and os.environ.get(LAUNCHED_ENV) != "1"


def launch(backend: Backend, argv: Sequence[str], lock: int | None = None) -> int:
    """Run ``align <argv>`` under ``accelerate launch`` with this backend; returns its exit status.

    :param lock: the run folder's lock (a descriptor) for accelerate's launcher to hold as well: if this
        process is killed with SIGKILL, which it cannot pass on, the folder stays locked until the launched
        processes, which :func:`follow_launcher` stops, are gone.
    """
    import subprocess

    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [
        accelerate,
        "launch",
        "--num_processes",
        str(backend.world_size),
        "--num_machines",
        str(backend.num_machines),
        "--machine_rank",
        str(backend.machine_rank),
        "--main_process_port",
        str(backend.main_port),
        "--mixed_precision",
        {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[backend.precision],
        "--dynamo_backend",
        "no",
    ]
    if backend.main_address:
        command += ["--main_process_ip", backend.main_address]
    if backend.kind == "deepspeed":
        command += ["--use_deepspeed", "--zero_stage", str(backend.zero_stage)]
    elif backend.kind == "fsdp":
        from align.backend_files import fsdp_launch_options

        command += ["--use_fsdp", *fsdp_launch_options(backend)]
    else:
        # On a CPU too: accelerate's --cpu runs a single process; --multi_gpu runs DDP over gloo there.
        command += ["--multi_gpu"]
    env = {**os.environ, LAUNCHED_ENV: "1", LAUNCHER_ENV: str(os.getpid())}
    if backend.kind == "deepspeed":
        tell_deepspeed_the_device(env)
    return subprocess.call([*command, "-m", "align.cli", *argv], env=env, pass_fds=() if lock is None else (lock,))


def follow_launcher(poll_s: float = 1.0, grace_s: float = 30.0) -> None:
    """In a process that ``align run`` launched: stop when that ``align run`` is gone.

    Killed with SIGKILL, a launcher cannot stop what it started, and the orphans would go on training and
    writing into the run folder beside the rerun. So a thread watches it: when it is gone, this process
    gets SIGTERM (an interruption: summary and cleanup as for Ctrl-C) and, should that hang in a collective
    whose other ranks are gone, exits after ``grace_s``.
    """
    import signal
    import threading
    import time

    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return

    def watch() -> None:
        while _alive(int(launcher)):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(130)

    threading.Thread(target=watch, name="align-follow-launcher", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process that its parent has not reaped yet is a zombie: gone for our purpose
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU (imports torch: call it only where a run needs the answer)."""
    import torch

    return torch.cuda.is_available()


def tell_deepspeed_the_device(env: MutableMapping[str, str]) -> None:
    """Set ``DS_ACCELERATOR`` for DeepSpeed's processes, unless the user did: DeepSpeed on a machine without
    a GPU guesses, and warns, unless told that it runs on the CPU."""
    env.setdefault("DS_ACCELERATOR", "cuda" if has_cuda() else "cpu")


#: The trainer options :func:`trainer_arguments` sets from ``backend:``, with what a recipe sets instead. A
#: stage's pass-through settings may not set them: they would silently replace the backend for one stage.
BACKEND_OPTIONS = {
    "bf16": "set the precision for every stage with `backend: {precision: bf16}`",
    "fp16": "set the precision for every stage with `backend: {precision: fp16}` (GPU only)",
    "use_cpu": "align uses the GPUs when there are any, else the CPU",
    "ddp_backend": "align picks the process group for `backend: {kind: ...}` (gloo on a CPU)",
    "deepspeed": "use `backend: {kind: deepspeed, zero_stage: N}` (with offload_optimizer, offload_params), or "
    "name your own config file, for every stage, with `backend: {deepspeed: ds_config.json}`",
    "fsdp": "use `backend: {kind: fsdp}`",
    "fsdp_config": "use `backend: {kind: fsdp}`, or `backend: {accelerate_config: FILE}` with your fsdp_config",
    "local_rank": "`align run` starts the processes of `backend: {num_processes: N}` and numbers them itself",
    "save_on_each_node": "align saves on each machine when the machines do not share a run folder",
}


def trainer_arguments(backend: Backend) -> dict[str, Any]:
    """``TrainingArguments`` settings for this backend, shared by every TRL-based stage."""
    cuda = has_cuda()
    arguments: dict[str, Any] = {
        "bf16": backend.precision == "bf16",
        "fp16": backend.precision == "fp16",
        "use_cpu": not cuda,
        "dataloader_pin_memory": cuda,
    }
    if backend.distributed and not cuda:
        arguments["ddp_backend"] = "gloo"
    if backend.kind == "deepspeed":
        from align.backend_files import deepspeed_config

        # transformers fills its "auto" values from these arguments, as for any DeepSpeed config.
        arguments["deepspeed"] = deepspeed_config(backend)
    if backend.kind == "fsdp":
        from align.backend_files import fsdp_arguments

        arguments.update(fsdp_arguments(backend))
    if own_run_folders():
        arguments["save_on_each_node"] = True  # each machine's checkpoints, for it to resume from
    return arguments


def join_process_group(backend: Backend) -> None:
    """Make sure DeepSpeed sees every process before a model is built: ZeRO-3 partitions parameters as
    ``from_pretrained`` creates them, and would otherwise partition for a world of one."""
    if backend.kind != "deepspeed" or not must_sync():
        return
    import deepspeed

    # Also when torch's process group exists already: DeepSpeed keeps its own view of the world.
    deepspeed.init_distributed(dist_backend="nccl" if has_cuda() else "gloo")


def is_main_process() -> bool:
    """Whether this process writes the run folder's files: rank 0 (always true in a single process); when
    the machines of a run each have a run folder of their own, also each machine's first process."""
    if _own_run_folders:
        return int(os.environ.get("LOCAL_RANK", "0")) == 0
    return is_rank_zero()


_own_run_folders = False


def set_own_run_folders(own: bool) -> None:
    """Say whether this run's machines each write a run folder of their own (they do not share one)."""
    global _own_run_folders
    _own_run_folders = own


def own_run_folders() -> bool:
    """Whether this run's machines each write a run folder of their own: then each keeps whole checkpoints
    and outputs, so that any of them can resume and feed later stages."""
    return _own_run_folders


def rank() -> int:
    """This process's global rank (RANK; 0 when it runs alone)."""
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    """Whether this is the run's first process of all (global rank 0): the one that speaks for the whole
    run to the outside (trackers), where :func:`is_main_process` may be true on every machine."""
    return rank() == 0


def save_on_this_machine(model: Any) -> None:
    """Let ``model.save_pretrained`` write in this process when it keeps its machine's own run folder.

    Once torch.distributed is up, transformers (checked with 5.19) writes a model only in the process of
    rank 0, whatever ``save_on_each_node`` says: the first process of another machine would publish, and
    checkpoint, a folder without weights.
    """
    if own_run_folders() and is_main_process() and rank() != 0 and hasattr(model, "should_save_on_this_rank"):
        model.should_save_on_this_rank = lambda is_main_process: is_main_process


def wait_for_everyone() -> None:
    """A barrier across the launched processes: over the stage's process group when it has one, else
    (a torch-free stage joins none) over the launcher's key-value store."""
    if not must_sync():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        return
    store = _launch_store()
    key = f"align/barrier/{next(_store_barriers)}"
    if store.add(key, 1) == int(os.environ["WORLD_SIZE"]):  # the last to arrive lets everyone through
        store.set(f"{key}/open", "1")
    store.wait([f"{key}/open"])


_store_barriers = itertools.count()


def agree(problem: AlignError | None) -> None:
    """Across the launched processes: raise, in every process, the first problem that any of them had
    (by rank); return when none had one. One process that refuses to go on (the run folder is in use, say)
    must stop the others too, which would otherwise wait for it in their first collective."""
    if not must_sync():
        if problem is not None:
            raise problem
        return
    said = None if problem is None else [problem.message, problem.hint]
    for found in map(json.loads, _gather("agree", json.dumps(said))):
        if found is not None:
            raise AlignError(found[0], hint=found[1])


def share(value: str | None) -> str:
    """Across the launched processes: rank 0's ``value``, in every process (all of them call this)."""
    if not must_sync():
        return value or ""
    store = _launch_store()
    key = f"align/share/{next(_store_shares)}"
    if rank() == 0:
        store.set(key, value or "")
    store.wait([key])
    return bytes(store.get(key)).decode()


_store_shares = itertools.count()


def any_process(flag: bool) -> bool:
    """Across the launched processes: whether ``flag`` is true in any of them (all of them call this)."""
    if not must_sync():
        return flag
    return b"1" in _gather("any", "1" if flag else "0")


def _gather(tag: str, value: str) -> list[bytes]:
    """Across the launched processes: each one's ``value``, by rank (all of them call this, in the same
    order, with the same ``tag``)."""
    store = _launch_store()
    key = f"align/{tag}/{next(_store_gathers[tag])}"
    store.set(f"{key}/{rank()}", value)
    keys = [f"{key}/{number}" for number in range(int(os.environ["WORLD_SIZE"]))]
    store.wait(keys)
    return [bytes(store.get(name)) for name in keys]


#: A counter per tag, so that each call's keys are new.
_store_gathers: dict[str, itertools.count[int]] = {"agree": itertools.count(), "any": itertools.count()}


@functools.cache
def _launch_store() -> Any:
    """The key-value store the launched processes share (torchrun's, which its agent serves on
    MASTER_PORT, or rank 0's). A process group of our own would do, but not twice: a second one on the
    same store reads the first one's stale addresses.

    Under srun or mpirun no agent serves one: rank 0 serves it on MASTER_PORT, multi-tenant, so that the
    process group that a stage makes later on the same port shares its server instead of failing to bind.
    """
    from datetime import timedelta

    import torch.distributed as dist

    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent_serves and rank() == 0,
        timeout=timedelta(minutes=30),  # as long as a process group's: rank 0 may be publishing gigabytes
        multi_tenant=not agent_serves,
    )


def must_sync() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
