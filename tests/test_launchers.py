"""Outside launchers (torchrun, accelerate launch, srun, mpirun) and several machines.

``align run`` started by a launcher runs in place, one rank per process, and trains what its own launch
trains; srun's and mpirun's ranks are mapped for torch.distributed; two "machines" on one host (two
``align run`` with ``num_machines: 2``) train one checkpoint, in one shared run folder or in one each.
srun and mpirun are simulated: the test sets their variables on the processes it starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from align import AlignError
from align.backend import LAUNCHED_ENV, Backend
from align.launchers import first_host, outside_launcher, parse_nodelist
from align.runner import LOCK_FILE, claim_run_dir
from conftest import FAKE_PLUGIN, run_align

PLUGINS = ("--plugins-dir", str(FAKE_PLUGIN.parent))
CHAIN = "model: fake-model\nbackend: {backend}\nstages:\n  a: {{plugin: count}}\n  b: {{plugin: count, policy: a}}\n"
SFT = (
    "model: tiny-llama\nbackend: {backend}\nstages:\n"
    "  sft: {{data: demo_sft, max_steps: 4, batch_size: 4, learning_rate: 1.0e-3, logging_steps: 1, max_length: 128}}\n"
)
#: What a launcher, or an earlier test's launch, may have left in this process's environment.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARIABLES
        and not k.startswith(("SLURM_", "OMPI_", "PMI_", "ACCELERATE_", "TORCHELASTIC_"))
        and k != LAUNCHED_ENV
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def srun_task(
    rank: int, tasks: int, node: int = 0, local: int | None = None, nodes: str = "localhost"
) -> dict[str, str]:
    """What srun sets in one of its tasks."""
    return {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(tasks),
        "SLURM_LOCALID": str(rank if local is None else local),
        "SLURM_NODEID": str(node),
        "SLURM_JOB_NODELIST": nodes,
    }


def mpirun_process(rank: int, size: int) -> dict[str, str]:
    """What Open MPI's mpirun sets in one of its processes."""
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(size),
    }


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "align.cli", *args],
        cwd=cwd,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """Each process's exit status and stderr; the others are killed when one hangs."""
    results = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=timeout)
            results.append((process.returncode, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def left_to_the_launcher(**settings) -> Backend:
    """A backend without main_address, as a recipe run under a launcher that tells it may be."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASTER_ADDR", "told by the launcher")
        return Backend(**settings)


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    first, second = weights(a), weights(b)
    return first.keys() == second.keys() and all(bool((first[k] == second[k]).all()) for k in first)


def losses(run_dir: Path, stage: str = "sft") -> list[float]:
    lines = (run_dir / "logs" / f"{stage}.metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


# ------------------------------------------------------------------------------------------ detection

TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "0",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none",
}


@pytest.mark.parametrize(
    ("env", "name", "rank", "world", "local"),
    [
        (TORCHRUN, "torchrun", 1, 4, 1),
        ({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"}, "accelerate launch", 1, 4, 1),
        (srun_task(3, 4, node=1, local=1), "srun", 3, 4, 1),
        (mpirun_process(1, 2), "mpirun", 1, 2, 1),
        ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}, "mpirun", 2, 3, 0),
    ],
    ids=["torchrun", "accelerate", "srun", "openmpi", "mpich"],
)
def test_an_outside_launcher_is_told_by_its_environment(env, name, rank, world, local):
    launcher = outside_launcher(env)
    assert launcher is not None
    assert (launcher.name, launcher.rank, launcher.world_size, launcher.local_rank) == (name, rank, world, local)


def test_a_batch_scripts_own_shell_and_aligns_own_launch_are_not_outside_launchers():
    batch_shell = {k: v for k, v in srun_task(0, 4).items() if k != "SLURM_STEP_ID"}  # sbatch's shell: no step
    assert outside_launcher(batch_shell) is None
    assert outside_launcher({**TORCHRUN, LAUNCHED_ENV: "1"}) is None  # started by `align run` itself
    assert outside_launcher({}) is None


def test_srun_and_mpirun_ranks_are_mapped_for_torch_distributed():
    backend = left_to_the_launcher(kind="ddp", num_processes=2, num_machines=2, main_port=29555)
    env: dict[str, str] = {}
    launcher = outside_launcher(srun_task(3, 4, node=1, local=1, nodes="gpu[07-08]"))
    assert launcher is not None
    launcher.check(Backend(kind="ddp", num_processes=2, num_machines=2, main_address="x"))
    launcher.join(backend, env)
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu07",  # the job's first host
        "MASTER_PORT": "29555",
    }
    env = {"MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "4000"}  # exported by the job script: kept
    outside_launcher(mpirun_process(0, 2)).join(Backend(kind="ddp", num_processes=2), env)  # type: ignore[union-attr]
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("0", "2", "10.1.1.1", "4000")
    env = {}
    outside_launcher(mpirun_process(1, 2)).join(Backend(kind="ddp", num_processes=2), env)  # type: ignore[union-attr]
    assert env["MASTER_ADDR"] == "127.0.0.1"  # one machine


def test_mpirun_over_several_machines_needs_the_main_address():
    launcher = outside_launcher(mpirun_process(0, 4))
    assert launcher is not None
    env: dict[str, str] = {}
    launcher.join(Backend(kind="ddp", num_processes=2, num_machines=2, main_address="10.0.0.9"), env)
    assert env["MASTER_ADDR"] == "10.0.0.9"
    with pytest.raises(AlignError, match="set backend.main_address"):  # mpirun tells nothing
        launcher.main_address(left_to_the_launcher(kind="ddp", num_processes=2, num_machines=2))


@pytest.mark.parametrize(
    ("env", "backend", "message"),
    [
        (
            srun_task(0, 4),
            Backend(kind="ddp", num_processes=2),
            "srun started 4 process(es) (SLURM_NTASKS=4), but the recipe's backend asks for 2: 2 process(es) per "
            "machine × 1 machine(s)",
        ),
        (
            TORCHRUN,
            Backend(kind="ddp", num_processes=4),
            "torchrun started 2 process(es) on this machine, but the recipe's backend asks for 4 process(es) per "
            "machine × 1 machine(s)",
        ),
        (mpirun_process(0, 2), Backend(), "mpirun started 2 process(es) (OMPI_COMM_WORLD_SIZE=2), but the recipe's"),
        (
            {**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true"},
            Backend(kind="ddp", num_processes=2, num_machines=2, main_address="h"),
            "accelerate launch runs deepspeed (ACCELERATE_USE_DEEPSPEED=true), but the recipe's backend kind is ddp",
        ),
        (
            {**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "bf16"},
            Backend(kind="ddp", num_processes=2, num_machines=2, main_address="h"),
            "accelerate launch asks for mixed precision bf16 (ACCELERATE_MIXED_PRECISION), but the recipe's "
            "backend.precision is fp32",
        ),
        (
            {**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            Backend(kind="deepspeed", num_processes=2, num_machines=2, main_address="h"),
            "accelerate launch asks for ZeRO stage 3 (ACCELERATE_DEEPSPEED_ZERO_STAGE), but the recipe's "
            "backend.zero_stage is 2",
        ),
    ],
    ids=["srun", "torchrun-per-machine", "mpirun-single", "accelerate-deepspeed", "accelerate-precision", "zero"],
)
def test_a_launch_that_is_not_the_recipes_backend_is_refused_naming_both(env, backend, message):
    launcher = outside_launcher(env)
    assert launcher is not None
    with pytest.raises(AlignError) as info:
        launcher.check(backend)
    assert str(info.value).startswith(message), str(info.value)


def test_srun_with_one_task_per_machine_makes_each_task_its_machines_launcher():
    backend = left_to_the_launcher(kind="ddp", num_processes=8, num_machines=2)
    launcher = outside_launcher(srun_task(1, 2, node=1, local=0, nodes="node[11-12]"))
    assert launcher is not None and launcher.one_per_machine(backend)
    launcher.check(backend)
    assert launcher.machine_overrides(backend) == ["backend.machine_rank=1", "backend.main_address=node11"]
    third = outside_launcher(srun_task(2, 3, node=2, local=0))
    with pytest.raises(AlignError, match=r"backend.machine_rank is 1, but srun runs this task on node 2"):
        third.check(Backend(kind="ddp", num_processes=8, num_machines=3, machine_rank=1, main_address="h"))  # type: ignore[union-attr]
    # One task per GPU instead: each is a rank, run in place.
    assert not outside_launcher(srun_task(5, 16, node=0)).one_per_machine(backend)  # type: ignore[union-attr]


def test_slurm_node_lists_are_read(monkeypatch):
    assert parse_nodelist("node[01-03,7],gpu-ib,c[1-2]-[5-6]") == [
        "node01", "node02", "node03", "node7", "gpu-ib", "c1-5", "c1-6", "c2-5", "c2-6",
    ]  # fmt: skip
    assert parse_nodelist("host.example.org") == ["host.example.org"]
    monkeypatch.setattr("shutil.which", lambda name: None)  # no Slurm tools: align reads the list itself
    assert first_host("gpu[007-009]") == "gpu007"
    launcher = outside_launcher({**srun_task(0, 6), "SLURM_TASKS_PER_NODE": "2(x2),1,1", "SLURM_NODEID": "2"})
    assert launcher is not None and launcher.local_world_size == 1


# ------------------------------------------------------------------------------------ fake stages


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_a_simulated_srun_or_mpirun_job_runs_in_place(tmp_path, launcher):
    """Two processes started as srun or mpirun would: both run the stages, rank 0 writes the run folder
    and holds its lock, nothing is launched again."""
    (tmp_path / "r.yaml").write_text(CHAIN.format(backend="{kind: ddp, num_processes: 2}"))
    port = str(free_port())
    tasks = [srun_task(r, 2) if launcher == "srun" else mpirun_process(r, 2) for r in range(2)]
    args = ["run", "r.yaml", "--run-dir", "run", *PLUGINS, f"backend.main_port={port}"]
    results = finish([start(args, task, tmp_path) for task in tasks], timeout=300)
    for code, stderr in results:
        assert code == 0, stderr
        assert "launching" not in stderr and "Traceback" not in stderr
    assert "done: run/summary.json" not in results[1][1]  # only rank 0 reports
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["stages"]["b"]["status"] == "done"
    assert (tmp_path / "run" / "runs.log").read_text().split() == ["a", "a", "b", "b"]  # each rank ran each stage
    assert json.loads((tmp_path / "run" / "b" / "value.json").read_text())["value"] == 2.0
    with claim_run_dir(tmp_path / "run"):  # released at the end
        pass


def test_a_run_folder_in_use_stops_every_process_of_an_outside_launch(tmp_path):
    (tmp_path / "r.yaml").write_text(CHAIN.format(backend="{kind: ddp, num_processes: 2}"))
    args = ["run", "r.yaml", "--run-dir", "run", *PLUGINS, f"backend.main_port={free_port()}"]
    with claim_run_dir(tmp_path / "run"):  # another run holds it
        results = finish([start(args, srun_task(r, 2), tmp_path) for r in range(2)], timeout=120)
    for code, stderr in results:  # both stop, with the same message: rank 1 does not wait forever for rank 0
        assert code == 2, stderr
        assert f"error: run folder run is in use by another run: pid {os.getpid()}" in stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_launch_that_is_not_the_recipes_backend_stops_before_any_work(tmp_path):
    (tmp_path / "r.yaml").write_text(CHAIN.format(backend="{kind: single}"))
    args = ["run", "r.yaml", "--run-dir", "run", *PLUGINS]
    for code, stderr in finish([start(args, srun_task(r, 2), tmp_path) for r in range(2)], timeout=120):
        assert code == 2 and "Traceback" not in stderr
        assert "error: srun started 2 process(es) (SLURM_NTASKS=2), but the recipe's backend asks for 1" in stderr
        assert "(kind: single runs one process)" in stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["shared-folder", "own-folders"])
def test_two_machines_on_one_host_share_or_keep_their_run_folders(tmp_path, shared):
    """Two `align run` as on two machines (num_machines 2, machine_rank from the command line). In a
    shared folder machine 1 writes nothing; with a folder each, both are whole, and a rerun is cached on
    both (the fingerprint does not depend on the machine)."""
    (tmp_path / "r.yaml").write_text(
        CHAIN.format(backend="{kind: ddp, num_processes: 1, num_machines: 2, main_address: 127.0.0.1}")
    )
    folders = ["run", "run"] if shared else ["run0", "run1"]

    def both(*extra: str) -> list[tuple[int, str]]:
        port = str(free_port())
        machines = [
            start(["run", "r.yaml", "--run-dir", folders[m], *PLUGINS, f"backend.machine_rank={m}",
                   f"backend.main_port={port}", *extra], {}, tmp_path)
            for m in range(2)
        ]  # fmt: skip
        results = finish(machines, timeout=300)
        for code, stderr in results:
            assert code == 0, stderr
        return results

    both()
    for folder in set(folders):
        run = tmp_path / folder
        assert json.loads((run / "summary.json").read_text())["status"] == "done"
        assert json.loads((run / "b" / "value.json").read_text())["value"] == 2.0
        log = (run / "logs" / "run.log").read_text()
        assert log.count("[2/2] b: done") == 1  # written by one process only
        assert not list((run / ".work").iterdir())
    if shared:
        assert (tmp_path / "run" / "runs.log").read_text().split() == ["a", "a", "b", "b"]  # both machines trained
    else:
        assert (tmp_path / "run1" / LOCK_FILE).exists()  # machine 1 locked its own folder
    results = both()  # again: every stage cached, on both machines alike
    assert all("[2/2] b: cached" in stderr for _, stderr in results[:1])
    for folder in set(folders):
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        assert [s["status"] for s in summary["stages"].values()] == ["cached", "cached"]


@pytest.mark.slow
def test_srun_with_one_task_per_machine_launches_each_machines_processes(tmp_path):
    """`srun --ntasks-per-node 1 align run` on 2 nodes of 2 processes each: each task takes its machine rank
    from SLURM_NODEID and the main address from the first host, and launches its machine's processes."""
    (tmp_path / "r.yaml").write_text(CHAIN.format(backend="{kind: ddp, num_processes: 2, num_machines: 2}"))
    port = str(free_port())
    args = ["run", "r.yaml", "--run-dir", "run", *PLUGINS, f"backend.main_port={port}"]
    tasks = [srun_task(node, 2, node=node, local=0, nodes="localhost") for node in range(2)]
    results = finish([start(args, task, tmp_path) for task in tasks], timeout=300)
    for code, stderr in results:
        assert code == 0, stderr
        assert "launching 4 processes (ddp)" in stderr
    assert (tmp_path / "run" / "runs.log").read_text().split() == ["a"] * 4 + ["b"] * 4
    recorded = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "machine_rank: 0" in recorded and "main_address: localhost" in recorded


# ---------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def own_launch(tmp_path_factory) -> Path:
    """The tiny SFT on 2 DDP processes, launched by `align run` itself: what the others must equal."""
    folder = tmp_path_factory.mktemp("own_launch")
    (folder / "r.yaml").write_text(SFT.format(backend="{kind: ddp, num_processes: 2}"))
    result = run_align("run", "r.yaml", "--run-dir", "run", f"backend.main_port={free_port()}", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes" in result.stderr
    return folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_torchrun_and_accelerate_launch_train_what_aligns_own_launch_trains(tmp_path, own_launch, launcher):
    (tmp_path / "r.yaml").write_text(SFT.format(backend="{kind: ddp, num_processes: 2}"))
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    if launcher == "torchrun":
        command = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:
        command = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
        command += ["--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*command, "-m", "align.cli", "run", "r.yaml", "--run-dir", "run"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching" not in result.stderr  # run in place: the launcher's processes are the ranks
    assert result.stdout.count("done: run/summary.json") == 1
    assert losses(tmp_path / "run") == losses(own_launch)
    assert same_weights(tmp_path / "run" / "sft", own_launch / "sft")


@pytest.mark.slow
def test_a_simulated_srun_job_trains_what_aligns_own_launch_trains(tmp_path, own_launch):
    (tmp_path / "r.yaml").write_text(SFT.format(backend="{kind: ddp, num_processes: 2}"))
    args = ["run", "r.yaml", "--run-dir", "run", f"backend.main_port={free_port()}"]
    for code, stderr in finish([start(args, srun_task(r, 2), tmp_path) for r in range(2)]):
        assert code == 0, stderr[-3000:]
    assert losses(tmp_path / "run") == losses(own_launch)
    assert same_weights(tmp_path / "run" / "sft", own_launch / "sft")


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["shared-folder", "own-folders"])
def test_two_machines_on_one_host_train_one_checkpoint(tmp_path, own_launch, shared):
    """The multi-machine wiring end to end: two `align run` with `num_machines: 2`, one process each, over
    gloo, train what one machine with two processes trains. With a folder each, both hold it whole."""
    backend = "{kind: ddp, num_machines: 2, num_processes: 1, main_address: 127.0.0.1}"
    (tmp_path / "r.yaml").write_text(SFT.format(backend=backend))
    folders = ["run", "run"] if shared else ["run0", "run1"]
    port = str(free_port())
    machines = [
        start(["run", "r.yaml", "--run-dir", folders[m], f"backend.machine_rank={m}", f"backend.main_port={port}"],
              {}, tmp_path)
        for m in range(2)
    ]  # fmt: skip
    for code, stderr in finish(machines):
        assert code == 0, stderr[-3000:]
    for folder in set(folders):
        assert same_weights(tmp_path / folder / "sft", own_launch / "sft")
        assert losses(tmp_path / folder) == losses(own_launch)
    if shared:
        assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == sorted(
            p.name for p in own_launch.iterdir() if not p.name.startswith(".")
        )


def test_the_slurm_example_is_a_valid_job_for_the_recipe_beside_it():
    """The sbatch script parses, and the recipe takes the overrides it gives each machine."""
    example = Path(__file__).resolve().parents[1] / "examples" / "slurm"
    script = (example / "multinode.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(example / "multinode.sbatch")]).returncode == 0
    assert "backend.machine_rank=\\$SLURM_NODEID" in script and "scontrol show hostnames" in script
    overrides = [
        "backend.num_machines=2",
        "backend.num_processes=8",
        "backend.machine_rank=1",
        "backend.main_address=node01",
        "backend.main_port=21234",
    ]
    result = run_align("config", "examples/slurm/recipe.yaml", *overrides, "--json", cwd=example.parents[1])
    assert result.returncode == 0, result.stderr
    backend = json.loads(result.stdout)["backend"]
    assert (backend["kind"], backend["zero_stage"], backend["precision"]) == ("deepspeed", 2, "bf16")  # the file's
    assert (backend["num_processes"], backend["num_machines"], backend["machine_rank"]) == (8, 2, 1)


STOP_AT_STEP_5 = """
import os

import torch
from transformers import TrainerCallback

from align import hookimpl


class Poison(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 5 and os.environ.get("ALIGN_TEST_POISON"):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(float("nan"))


@hookimpl
def align_trainer_built(context, trainer):
    trainer.add_callback(Poison())
"""


@pytest.mark.slow
def test_machines_with_their_own_run_folders_each_resume_from_their_own_checkpoints(tmp_path):
    """A stage that fails on two machines with a folder each leaves whole checkpoints in both (transformers
    alone writes weights on rank 0 only): the rerun resumes on each machine from its own folder."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "stop.py").write_text(STOP_AT_STEP_5)
    backend = "{kind: ddp, num_machines: 2, num_processes: 1, main_address: 127.0.0.1}"
    (tmp_path / "r.yaml").write_text(SFT.format(backend=backend))

    def both(**env: str) -> list[tuple[int, str]]:
        port = str(free_port())
        return finish([
            start(["run", "r.yaml", "--run-dir", f"run{m}", "--plugins-dir", "plugins", f"backend.machine_rank={m}",
                   f"backend.main_port={port}", "stages.sft.max_steps=8", "stages.sft.save_steps=2"], env, tmp_path)
            for m in range(2)
        ])  # fmt: skip

    assert [code for code, _ in both(ALIGN_TEST_POISON="1")] == [1, 1]  # the NaN guard stops both
    for m in range(2):
        kept = list((tmp_path / f"run{m}").glob(".work/sft-*/checkpoints/checkpoint-4"))
        assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file() and (kept[0] / "align_loss.json").is_file()
    for code, stderr in both():
        assert code == 0, stderr[-3000:]
    for m in range(2):
        assert f"resuming from run{m}/.work/sft-" in (tmp_path / f"run{m}" / "logs" / "run.log").read_text()
    assert same_weights(tmp_path / "run0" / "sft", tmp_path / "run1" / "sft")


def test_the_online_rl_loop_refuses_fsdp_under_a_launcher_that_does_not_set_it_up(monkeypatch):
    from align.backend import Backend
    from align.rl.loop import OnlineRLStage

    backend = Backend(kind="fsdp", num_processes=2)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.delenv("ALIGN_LAUNCHED", raising=False)
    with pytest.raises(AlignError, match="runs FSDP under align's own launch .* not under torchrun"):
        OnlineRLStage._check_fsdp_launch(backend, "stages.grpo")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp sets the loop's FSDP up
    OnlineRLStage._check_fsdp_launch(backend, "stages.grpo")
    OnlineRLStage._check_fsdp_launch(Backend(kind="ddp", num_processes=2), "stages.grpo")
