"""The shared backend: how every stage of a recipe runs, on one process or many.

``backend:`` in a recipe picks single-process, DDP, DeepSpeed ZeRO or FSDP, the precision and the number
of processes and machines. With more than one process, ``align run`` starts itself again under
``accelerate launch``; the same recipe runs either way. What the hardware cannot do is refused when the
recipe is checked, never replaced by something else (accelerate, left alone, turns FSDP on a CPU into
DDP or into unsynchronised copies of one training).
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.errors import AlignError
from align.schema import setting

__all__ = [
    "BACKEND_OPTIONS",
    "Backend",
    "is_main_process",
    "join_process_group",
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

    def __post_init__(self) -> None:
        if self.num_processes < 1 or self.num_machines < 1:
            raise AlignError("backend: num_processes and num_machines must be at least 1")
        if not 0 <= self.machine_rank < self.num_machines:
            raise AlignError(f"backend: machine_rank {self.machine_rank} must lie in 0..{self.num_machines - 1}")
        if self.num_machines > 1 and not self.main_address:
            raise AlignError("backend: several machines need `main_address`, the address of machine 0")
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


def check_hardware(backend: Backend) -> None:
    """Refuse what this machine cannot run, before any work. Imports torch only when it must ask."""
    needs_gpu = backend.kind == "fsdp" or backend.precision == "fp16"
    if not needs_gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    if backend.kind == "fsdp":
        raise AlignError(
            "backend: fsdp needs CUDA GPUs, and this machine has none",
            hint="on a CPU use kind: ddp or kind: deepspeed (ZeRO 1-3 run over gloo); "
            "accelerate would otherwise silently run DDP or unsynchronised copies instead",
        )
    raise AlignError("backend: precision fp16 needs a GPU; use fp32 or bf16 on a CPU")


def must_launch(backend: Backend) -> bool:
    """Whether ``align run`` has to start itself again under accelerate."""
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
        command += ["--use_fsdp"]
    else:
        # On a CPU too: accelerate's --cpu runs a single process; --multi_gpu runs DDP over gloo there.
        command += ["--multi_gpu"]
    env = {**os.environ, LAUNCHED_ENV: "1", LAUNCHER_ENV: str(os.getpid())}
    if backend.kind == "deepspeed":
        env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


#: The trainer options :func:`trainer_arguments` sets from ``backend:``, with what a recipe sets instead. A
#: stage's pass-through settings may not set them: they would silently replace the backend for one stage.
BACKEND_OPTIONS = {
    "bf16": "set the precision for every stage with `backend: {precision: bf16}`",
    "fp16": "set the precision for every stage with `backend: {precision: fp16}` (GPU only)",
    "use_cpu": "align uses the GPUs when there are any, else the CPU",
    "ddp_backend": "align picks the process group for `backend: {kind: ...}` (gloo on a CPU)",
    "deepspeed": "use `backend: {kind: deepspeed, zero_stage: N}` (with offload_optimizer, offload_params)",
    "fsdp": "use `backend: {kind: fsdp}`",
    "fsdp_config": "use `backend: {kind: fsdp}`",
    "local_rank": "`align run` starts the processes of `backend: {num_processes: N}` and numbers them itself",
}


def trainer_arguments(backend: Backend) -> dict[str, Any]:
    """``TrainingArguments`` settings for this backend, shared by every TRL-based stage."""
    import torch

    cuda = torch.cuda.is_available()
    arguments: dict[str, Any] = {
        "bf16": backend.precision == "bf16",
        "fp16": backend.precision == "fp16",
        "use_cpu": not cuda,
        "dataloader_pin_memory": cuda,
    }
    if backend.distributed and not cuda:
        arguments["ddp_backend"] = "gloo"
    if backend.kind == "deepspeed":
        zero: dict[str, Any] = {"stage": backend.zero_stage}
        if backend.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if backend.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
        if backend.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # save a whole checkpoint, not shards
        arguments["deepspeed"] = {
            "zero_optimization": zero,
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
        }
    if backend.kind == "fsdp":
        arguments["fsdp"] = "full_shard auto_wrap"
        arguments["fsdp_config"] = {"use_orig_params": True}
    return arguments


def join_process_group(backend: Backend) -> None:
    """Make sure DeepSpeed sees every process before a model is built: ZeRO-3 partitions parameters as
    ``from_pretrained`` creates them, and would otherwise partition for a world of one."""
    if backend.kind != "deepspeed" or not must_sync():
        return
    import deepspeed

    # Also when torch's process group exists already: DeepSpeed keeps its own view of the world.
    deepspeed.init_distributed(dist_backend="nccl" if _has_cuda() else "gloo")


def is_main_process() -> bool:
    """Whether this is rank 0 (always true in a single process): the one that writes run files."""
    return int(os.environ.get("RANK", "0")) == 0


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


@functools.cache
def _launch_store() -> Any:
    """The key-value store the launched processes share (torchrun's, which its agent serves on
    MASTER_PORT, or rank 0's). A process group of our own would do, but not twice: a second one on the
    same store reads the first one's stale addresses."""
    from datetime import timedelta

    import torch.distributed as dist

    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent_serves and is_main_process(),
        timeout=timedelta(minutes=30),  # as long as a process group's: rank 0 may be publishing gigabytes
    )


def must_sync() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
