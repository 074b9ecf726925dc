"""Outside launchers: torchrun, ``accelerate launch``, srun and mpirun, which start ``align run`` themselves.

``align run`` with several processes starts itself again under ``accelerate launch``. When a launcher
started it instead, it runs in place: each process it started is one rank of the run. The launcher is told
by the environment it leaves:

* torchrun and ``accelerate launch`` (which uses torchrun's machinery) set ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``: torch.distributed reads them as they are.
* srun sets ``SLURM_PROCID``, ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS``), ``SLURM_LOCALID`` and
  ``SLURM_STEP_ID``. A batch script's own shell has ``SLURM_*`` too, but no ``SLURM_STEP_ID``: it is not a
  task of a launch, and ``align run`` there launches as anywhere else.
* mpirun sets ``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK`` (Open MPI) or ``PMI_RANK``/``PMI_SIZE``
  (MPICH, Intel MPI).

For srun and mpirun, align maps these to ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` for torch.distributed: the main address is ``MASTER_ADDR`` if the job script exported one,
else the recipe's ``backend.main_address``, else (srun) the first host of the job's node list, else (one
machine) 127.0.0.1; the port is ``MASTER_PORT``, else ``backend.main_port``.

The launcher's world must be the recipe's: ``backend.num_processes`` × ``backend.num_machines`` processes,
``num_processes`` of them per machine. One exception: srun with one task per machine (as many tasks as
``backend.num_machines``) and several processes per machine in the recipe. Each task is then one
machine's ``align run``, which launches that machine's processes as ``align run`` does on any machine,
with ``machine_rank`` from ``SLURM_NODEID`` and the main address from the first host.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field

from align.backend import LAUNCHED_ENV, Backend, tell_deepspeed_the_device
from align.errors import AlignError

__all__ = ["Launcher", "first_host", "outside_launcher", "parse_nodelist"]


@dataclass(frozen=True)
class Launcher:
    """An outside launcher that started this process, as its environment tells."""

    name: str  #: ``torchrun``, ``accelerate launch``, ``srun``, ``mpirun``
    rank: int
    world_size: int
    local_rank: int | None  #: None: not told (mpirun without a local rank): the rank modulo the processes per machine
    told: str  #: the variables that gave the world size, for messages (``SLURM_NTASKS=4``)
    local_world_size: int | None = None
    machine: int | None = None  #: this machine's index (torchrun's GROUP_RANK, srun's SLURM_NODEID)
    machines: int | None = None
    first_host: str | None = None  #: srun: the first host of the job's node list
    sets_torch_env: bool = True  #: torchrun and accelerate set RANK, MASTER_ADDR, …; srun and mpirun do not
    accelerate: Mapping[str, str] = field(default_factory=dict)  #: what `accelerate launch` says (ACCELERATE_*)

    def one_per_machine(self, backend: Backend) -> bool:
        """Whether each task is one machine's ``align run``, to launch that machine's processes itself (srun
        with as many tasks as machines, when the recipe asks for several processes per machine)."""
        return (
            self.name == "srun"
            and backend.num_processes > 1
            and self.world_size == backend.num_machines
            and self.world_size != backend.world_size
        )

    def check(self, backend: Backend) -> None:
        """Refuse a launch whose world is not the recipe's backend."""
        if self.one_per_machine(backend):
            if self.machine is not None and backend.machine_rank not in (0, self.machine):
                raise AlignError(
                    f"backend.machine_rank is {backend.machine_rank}, but srun runs this task on node "
                    f"{self.machine} (SLURM_NODEID)",
                    hint="leave machine_rank out: align takes it from SLURM_NODEID",
                )
            return
        wanted = f"{backend.num_processes} process(es) per machine × {backend.num_machines} machine(s)"
        hint = (
            f"start as many processes as the backend asks for ({backend.world_size}), or set backend.num_processes "
            "(per machine) and backend.num_machines to match the launcher"
        )
        if self.world_size != backend.world_size:
            raise AlignError(
                f"{self.name} started {self.world_size} process(es) ({self.told}), but the recipe's backend asks "
                f"for {backend.world_size}: {wanted}",
                hint=hint + (" (kind: single runs one process)" if backend.kind == "single" else ""),
            )
        if self.machines is not None and self.machines != backend.num_machines:
            raise AlignError(
                f"{self.name} runs on {self.machines} machines, but the recipe's backend asks for {wanted}",
                hint=hint,
            )
        if self.local_world_size is not None and self.local_world_size != backend.num_processes:
            raise AlignError(
                f"{self.name} started {self.local_world_size} process(es) on this machine, but the recipe's "
                f"backend asks for {wanted}",
                hint=hint,
            )
        said = self.accelerate
        for flag, kind in (("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp")):
            if said.get(flag, "").lower() == "true" and backend.kind != kind:
                raise AlignError(
                    f"accelerate launch runs {kind} ({flag}=true), but the recipe's backend kind is {backend.kind}",
                    hint=f"set backend.kind: {kind}, or launch without it: align takes the backend from the recipe",
                )
        stage = said.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if backend.kind == "deepspeed" and stage not in (None, "", str(backend.zero_stage)):
            raise AlignError(
                f"accelerate launch asks for ZeRO stage {stage} (ACCELERATE_DEEPSPEED_ZERO_STAGE), but the recipe's "
                f"backend.zero_stage is {backend.zero_stage}",
                hint="make them agree: align trains with the recipe's backend",
            )
        precision = {"bf16": "bf16", "fp16": "fp16"}.get(said.get("ACCELERATE_MIXED_PRECISION", "no"))
        if precision is not None and precision != backend.precision:  # "no" is accelerate's default: not a choice
            raise AlignError(
                f"accelerate launch asks for mixed precision {precision} (ACCELERATE_MIXED_PRECISION), but the "
                f"recipe's backend.precision is {backend.precision}",
                hint="make them agree: align trains in the recipe's precision",
            )

    def join(self, backend: Backend, environ: dict[str, str] | None = None) -> None:
        """Run in place: give torch.distributed what it reads (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
        ``MASTER_ADDR``, ``MASTER_PORT``) when the launcher did not set it."""
        env = os.environ if environ is None else environ
        if backend.kind == "deepspeed":  # as align's own launch does: DeepSpeed on a CPU must be told
            tell_deepspeed_the_device(env)
        if self.sets_torch_env:
            return
        local_world = self.local_world_size or backend.num_processes
        local_rank = self.local_rank if self.local_rank is not None else self.rank % local_world
        env.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(local_world),
            GROUP_RANK=str(self.machine if self.machine is not None else self.rank // local_world),
        )
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = self.main_address(backend)
        env.setdefault("MASTER_PORT", str(backend.main_port))

    def main_address(self, backend: Backend) -> str:
        """Where rank 0 listens: the recipe's main_address, else the job's first host, else this machine."""
        if backend.main_address:
            return backend.main_address
        if self.first_host:
            return self.first_host
        if backend.num_machines == 1:
            return "127.0.0.1"
        raise AlignError(
            f"{self.name} runs this job on {backend.num_machines} machines, and align cannot tell the address of "
            "the first one",
            hint="set backend.main_address (the first machine's address), or export MASTER_ADDR",
        )

    def machine_overrides(self, backend: Backend) -> list[str]:
        """For a task that is one machine's ``align run`` (:meth:`one_per_machine`): the overrides that
        make the recipe this machine's (its rank, and machine 0's address)."""
        overrides = []
        if self.machine is not None:
            overrides.append(f"backend.machine_rank={self.machine}")
        if not backend.main_address:
            overrides.append(f"backend.main_address={os.environ.get('MASTER_ADDR') or self.main_address(backend)}")
        return overrides


def outside_launcher(environ: Mapping[str, str] | None = None) -> Launcher | None:
    """The outside launcher that started this process, or None (run alone, or launched by ``align run``)."""
    env = os.environ if environ is None else environ
    if env.get(LAUNCHED_ENV) == "1":
        return None
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")):
        accelerate = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
        name = "accelerate launch" if accelerate else "torchrun" if "TORCHELASTIC_RUN_ID" in env else "a launcher"
        return Launcher(
            name,
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK"),
            told=f"WORLD_SIZE={env['WORLD_SIZE']}",
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None,
            machine=_int(env, "GROUP_RANK") if "GROUP_RANK" in env else None,
            accelerate=accelerate,
        )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        machine = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else None
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        return Launcher(
            "srun",
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, tasks) if tasks in env else 1,
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            told=f"{tasks}={env.get(tasks, 1)}",
            local_world_size=_tasks_on_node(per_node, machine or 0) if per_node else None,
            machine=machine,
            machines=_int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else None,
            first_host=first_host(nodes) if nodes else None,
            sets_torch_env=False,
        )
    for rank, size, local, local_size in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH's and Intel MPI's hydra
    ):
        if rank in env and size in env:
            local_world = _int(env, local_size) if local_size in env else None
            return Launcher(
                "mpirun",
                rank=_int(env, rank),
                world_size=_int(env, size),
                local_rank=_int(env, local) if local in env else None,
                told=f"{size}={env[size]}",
                local_world_size=local_world,
                sets_torch_env=False,
            )
    return None


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise AlignError(f"the launcher set {name}={env[name]!r}, which is not a number") from None


def _tasks_on_node(tasks_per_node: str, node: int) -> int | None:
    """srun's ``SLURM_TASKS_PER_NODE`` (``2(x3),1``) for the node of this index."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if node < len(counts) else None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[03-05,9],gpu1`` → ``node03``): ``scontrol show hostnames``
    where Slurm's tools are installed, else align's own reading of the syntax."""
    import subprocess

    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            shown = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if shown:
                return shown[0]
        except (OSError, subprocess.SubprocessError):
            pass
    hosts = parse_nodelist(nodelist)
    if not hosts:
        raise AlignError(f"cannot read the Slurm node list {nodelist!r}", hint="set backend.main_address")
    return hosts[0]


def parse_nodelist(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list: ``a[01-03,7],b-ib,c[1-2]-[5-6]`` → ``a01 a02 a03 a07 b-ib c1-5 …``."""
    hosts: list[str] = []
    depth, start = 0, 0
    for index, char in enumerate(nodelist + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            if nodelist[start:index].strip():
                hosts += _expand(nodelist[start:index].strip())
            start = index + 1
    return hosts


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    found = []
    for item in match.group(1).split(","):
        low, _, high = item.partition("-")
        if high and low.isdigit() and high.isdigit():
            found += [f"{head}{str(n).zfill(len(low))}" for n in range(int(low), int(high) + 1)]
        else:
            found.append(f"{head}{item}")
    return [host for prefix in found for host in _expand(prefix + tail)]
