"""The run folder: locked while a run uses it, refused when it cannot be written, and published outputs
verified on every cache hit and before export. Fast: the torch-free fake stages of tests/plugins."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from align import AlignError
from align.artifacts import MANIFEST
from align.runner import LOCK_FILE, claim_run_dir
from conftest import FAKE_PLUGIN, run_align

CHAIN = "model: fake-model\nstages:\n  a: {plugin: count}\n  b: {plugin: count, policy: a}\n"
PLUGINS = ("--plugins-dir", str(FAKE_PLUGIN.parent))

#: A plugin that fills the disk: stage b's write of value.json fails as on a full disk.
DISK_FULL_PLUGIN = """
import errno
import pathlib

from align import hookimpl

_write_text = pathlib.Path.write_text


@hookimpl
def align_stage_starting(context):
    if context.name != "b":
        return

    def full(self, *args, **kwargs):
        if self.name == "value.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return _write_text(self, *args, **kwargs)

    pathlib.Path.write_text = full
"""


def align_run(recipe: Path, run_dir: Path, *extra: str, env: dict[str, str] | None = None):
    return run_align("run", str(recipe), "--run-dir", str(run_dir), *PLUGINS, *extra, env=env)


def start_run(recipe: Path, run_dir: Path, *extra: str, wait_s: float = 60) -> subprocess.Popen:
    """Start `align run` with stage b sleeping; returns once b is asleep (it writes `sleeping` first)."""
    command = [sys.executable, "-m", "align.cli", "run", str(recipe), "--run-dir", str(run_dir), *PLUGINS, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + wait_s
    while not (run_dir / "sleeping").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached its sleeping stage"
        time.sleep(0.02)
    return process


def value(run_dir: Path, stage: str) -> float:
    return json.loads((run_dir / stage / "value.json").read_text())["value"]


def snapshot(run_dir: Path, *stages: str) -> dict[str, bytes]:
    """The bytes of every file of these published outputs, to show they were left intact."""
    return {f"{s}/{p.name}": p.read_bytes() for s in stages for p in sorted((run_dir / s).iterdir())}


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def done_run(write_recipe, tmp_path) -> tuple[Path, Path]:
    """A recipe with stages a and b, run once: (recipe, run folder)."""
    recipe = write_recipe(CHAIN)
    run_dir = tmp_path / "run"
    result = align_run(recipe, run_dir)
    assert result.returncode == 0, result.stderr
    return recipe, run_dir


# --- the lock -------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(done_run):
    recipe, run_dir = done_run
    before = snapshot(run_dir, "a", "b")
    first = start_run(recipe, run_dir, "stages.b.sleep=30", "stages.b.value=5")
    try:
        summary_while_running = (run_dir / "summary.json").read_bytes()
        second = align_run(recipe, run_dir)
        assert second.returncode == 2
        assert second.stderr.startswith(
            f"error: run folder {run_dir} is in use by another run: pid {first.pid} on host {socket.gethostname()}, "
            "since "
        )
        assert f"(align run {recipe} --run-dir {run_dir}" in second.stderr
        assert f"hint: wait for it to end, stop it (kill {first.pid} on {socket.gethostname()})" in second.stderr
        assert "Traceback" not in second.stderr and "[1/2]" not in second.stderr  # refused before any work
        assert (run_dir / "summary.json").read_bytes() == summary_while_running  # the second wrote nothing
        assert snapshot(run_dir, "a", "b") == before
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 130  # interrupted: the lock is released with it
    again = align_run(recipe, run_dir)
    assert again.returncode == 0, again.stderr
    assert snapshot(run_dir, "a", "b") == before


def test_the_lock_is_released_when_a_run_ends_or_fails(write_recipe, fake_pm, tmp_path):
    from align.recipe import load_recipe
    from align.runner import run_recipe

    run_dir = tmp_path / "run"
    for overrides in ([], ["stages.b.fail=align"], ["stages.b.fail=bug"], []):
        summary = run_recipe(load_recipe(write_recipe(CHAIN), overrides, fake_pm), fake_pm, run_dir=run_dir)
        assert summary.status == ("failed" if overrides else "done")
        with claim_run_dir(run_dir):  # free again: this would raise if the run had kept it
            assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert (run_dir / LOCK_FILE).read_text() == ""  # nobody named once it is released


def test_a_lock_left_by_a_killed_run_does_not_block(done_run):
    recipe, run_dir = done_run
    before = snapshot(run_dir, "a", "b")
    holder = start_run(recipe, run_dir, "stages.b.sleep=30", "stages.b.value=5")
    holder.kill()  # SIGKILL: no chance to clean up; the OS drops its flock
    holder.communicate(timeout=60)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid  # its name is still there
    assert snapshot(run_dir, "a", "b") == before

    again = align_run(recipe, run_dir)
    assert again.returncode == 0, again.stderr
    assert "[1/2] a: cached" in again.stderr and "[2/2] b: cached" in again.stderr
    assert snapshot(run_dir, "a", "b") == before


def test_only_the_launching_process_takes_the_lock(write_recipe, tmp_path, monkeypatch):
    """`align run` with several processes relaunches itself; the launcher holds the lock for all of them."""
    from align import backend, cli

    recipe = write_recipe(CHAIN.replace("stages:", "backend: {kind: ddp, num_processes: 2}\nstages:"))
    run_dir = tmp_path / "run"
    seen = {}

    def launch(backend_settings, argv, lock=None):  # stands in for accelerate: run rank 0 of the launched processes
        seen["other run"] = align_run(recipe, run_dir)  # meanwhile another run is refused
        monkeypatch.setenv(backend.LAUNCHED_ENV, "1")
        monkeypatch.setenv("RANK", "0")
        return cli.main(argv)  # takes no lock of its own: the launcher's would block it

    handlers = list(logging.getLogger("align").handlers)
    monkeypatch.setattr(backend, "launch", launch)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's SIGTERM handling alone
    try:
        assert cli.main(["run", str(recipe), "--run-dir", str(run_dir), *PLUGINS]) == 0
    finally:
        for handler in set(logging.getLogger("align").handlers) - set(handlers):
            logging.getLogger("align").removeHandler(handler)
    assert seen["other run"].returncode == 2
    assert f"is in use by another run: pid {os.getpid()} on host" in seen["other run"].stderr
    assert summary_of(run_dir)["status"] == "done" and value(run_dir, "b") == 2.0
    with claim_run_dir(run_dir):  # released when the launched processes are done
        pass


def is_rank(process) -> bool:
    """A process running the stages (torchrun gives it LOCAL_RANK); short-lived helpers may be gone already."""
    import psutil

    try:
        return "LOCAL_RANK" in process.environ()
    except psutil.Error:
        return False


@pytest.mark.slow
def test_launched_processes_stop_when_their_launcher_is_killed_and_the_folder_stays_locked_until_then(
    write_recipe, tmp_path
):
    """`kill -9` of a distributed `align run` cannot be passed on to what it launched: the launched
    processes notice and stop, and the folder is locked until they are gone, so a rerun never runs beside
    orphans."""
    import psutil

    recipe = write_recipe(CHAIN.replace("stages:", "backend: {kind: ddp, num_processes: 2}\nstages:"))
    run_dir = tmp_path / "run"
    launcher = start_run(recipe, run_dir, "stages.b.sleep=300", wait_s=300)  # two processes start slowly
    try:
        launched = psutil.Process(launcher.pid).children(recursive=True)  # accelerate's, and the ranks
        ranks = [p for p in launched if is_rank(p)]
    finally:
        launcher.kill()
        launcher.communicate(timeout=60)
    assert len(ranks) == 2
    while True:  # whenever the lock can be taken, nothing launched may be left
        try:
            with claim_run_dir(run_dir):
                left = [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
                assert not left, f"the folder was free while {left} still ran"
            break
        except AlignError:
            time.sleep(0.2)
    gone, alive = psutil.wait_procs(launched, timeout=60)
    assert not alive
    again = align_run(recipe, run_dir)
    assert again.returncode == 0, (run_dir / "logs" / "run.log").read_text()[-3000:] + again.stderr[:3000]
    assert value(run_dir, "b") == 2.0


# --- folders that cannot be used, and a full disk --------------------------------------------------------


def test_a_run_folder_that_is_a_file_is_refused_before_any_work(write_recipe, tmp_path):
    recipe = write_recipe(CHAIN)
    (tmp_path / "run").write_text("my notes")
    result = align_run(recipe, tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: run folder {tmp_path / 'run'} is a file, not a folder\n"
        "  hint: move the file away, or choose another folder with --run-dir (or run_dir: in the recipe)\n"
    )
    assert (tmp_path / "run").read_text() == "my notes"

    inside = align_run(recipe, tmp_path / "run" / "sub")
    assert inside.returncode == 2
    assert inside.stderr.startswith(
        f"error: cannot create run folder {tmp_path / 'run' / 'sub'}: {tmp_path / 'run'} is a file, not a folder\n"
    )


def test_a_read_only_run_folder_is_refused_before_any_work(done_run):
    recipe, run_dir = done_run
    before, summary = snapshot(run_dir, "a", "b"), (run_dir / "summary.json").read_bytes()
    run_dir.chmod(0o555)
    try:
        if os.access(run_dir, os.W_OK):
            pytest.skip("this user (root) can write to a read-only folder; see the test run as nobody")
        result = align_run(recipe, run_dir, "stages.b.value=5")
    finally:
        run_dir.chmod(0o755)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: run folder {run_dir} is read-only: align cannot write its outputs, logs or summary there\n"
        f"  hint: make it writable (chmod u+w {run_dir}), or choose another folder with --run-dir\n"
    )
    assert snapshot(run_dir, "a", "b") == before and (run_dir / "summary.json").read_bytes() == summary


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become nobody")
def test_a_folder_this_user_cannot_write_is_refused_when_running_as_root(write_recipe):
    """As root a chmod does not stop writes, so run `align` as nobody on a folder root owns."""
    shared = Path(tempfile.mkdtemp(prefix="align-readonly-"))  # not under pytest's tmp_path: root-only
    try:
        shared.chmod(0o755)
        recipe, run_dir = shared / "recipe.yaml", shared / "run"
        recipe.write_text(CHAIN)
        assert align_run(recipe, run_dir).returncode == 0
        before = snapshot(run_dir, "a", "b")
        # Python may live where nobody cannot read it (/root): import everything first, then become nobody.
        code = (
            "import os, sys\nimport align.cli, align.runner, align.recipe, align.plugin_manager\n"
            f"align.plugin_manager.get_plugin_manager(plugins_dir={str(FAKE_PLUGIN.parent)!r})\n"
            "os.setgid(65534)\nos.setuid(65534)\nsys.exit(align.cli.main(sys.argv[1:]))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, "run", str(recipe), "--run-dir", str(run_dir), *PLUGINS],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        assert result.stderr.startswith(f"error: run folder {run_dir} is read-only: align cannot write its outputs")
        assert snapshot(run_dir, "a", "b") == before
    finally:
        shutil.rmtree(shared)


def test_a_full_disk_fails_the_stage_saying_so_and_where(done_run, tmp_path):
    recipe, run_dir = done_run
    before = snapshot(run_dir, "a", "b")
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "disk_full.py").write_text(DISK_FULL_PLUGIN)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "plugin"), os.environ.get("PYTHONPATH", "")])}
    result = align_run(recipe, run_dir, "stages.b.value=5", "-p", "disk_full", env=env)

    assert result.returncode == 1
    work = next((run_dir / ".work").glob("b-*"))
    message = (
        f"the disk is full: no space left to write {work / 'value.json'} (run folder {run_dir})\n"
        f"  hint: free space on the disk that holds {run_dir} (or choose a --run-dir on another disk) and run "
        "again; earlier outputs are intact, and the run continues from the stage that failed"
    )
    assert f"[2/2] b: failed: {message}\n" in result.stderr
    assert f"error: stage 'b' failed: {message}\n" in result.stderr
    assert "Traceback" not in result.stderr
    summary = summary_of(run_dir)
    assert summary["status"] == "failed" and summary["error"] == f"stage 'b' failed: {message}"
    assert summary["stages"]["b"]["status"] == "failed" and summary["stages"]["b"]["error"] == message
    assert snapshot(run_dir, "a", "b") == before  # b's earlier output too
    assert "OSError: [Errno 28] No space left on device" in (run_dir / "logs" / "run.log").read_text()


def test_a_full_disk_that_stops_the_summary_too_still_ends_with_the_stages_message(
    write_recipe, fake_pm, tmp_path, monkeypatch
):
    from align.recipe import load_recipe
    from align.runner import run_recipe

    recipe = load_recipe(write_recipe(CHAIN), [], fake_pm)
    run_dir = tmp_path / "run"
    assert run_recipe(recipe, fake_pm, run_dir=run_dir).status == "done"
    before = snapshot(run_dir, "a", "b")
    write_text = Path.write_text

    def full(self, *args, **kwargs):  # from now on nothing new can be written anywhere
        if self.name == "value.json" or self.name.startswith(".summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    summary = run_recipe(load_recipe(write_recipe(CHAIN), ["stages.a.value=4"], fake_pm), fake_pm, run_dir=run_dir)
    assert summary.status == "failed" and summary.stages["a"].error.startswith("the disk is full: no space left")
    assert snapshot(run_dir, "a", "b") == before
    assert "could not write summary.json: the disk is full" in (run_dir / "logs" / "run.log").read_text()


# --- verified outputs ------------------------------------------------------------------------------------


def damage_deleted(output: Path) -> str:
    (output / "value.json").unlink()
    return "value.json is missing"


def damage_truncated(output: Path) -> str:
    (output / "value.json").write_text("{")
    return "value.json has 1 bytes, not the 14 it was published with"


def damage_changed(output: Path) -> str:
    path = output / "value.json"
    path.write_text(path.read_text().replace("1.0", "9.0"))  # same size, new content
    return "value.json was changed after it was published"


def damage_extra_weights(output: Path) -> str:
    (output / "model.safetensors").write_bytes(b"\0" * 64)
    return "model.safetensors is not part of the published output"


def damage_old_manifest(output: Path) -> str:
    manifest = json.loads((output / MANIFEST).read_text())
    del manifest["files"]
    manifest["format"] = 1
    (output / MANIFEST).write_text(json.dumps(manifest))
    return "CANNOT"


@pytest.mark.parametrize(
    "damage", [damage_deleted, damage_truncated, damage_changed, damage_extra_weights, damage_old_manifest]
)
def test_a_damaged_output_is_logged_and_rebuilt_never_used(done_run, damage):
    recipe, run_dir = done_run
    problem = damage(run_dir / "a")
    result = align_run(recipe, run_dir)

    assert result.returncode == 0, result.stderr
    if problem == "CANNOT":
        expected = (
            "output of stage a cannot be verified: it was published by an older align, whose manifest (format 1) "
            "lists no files to check; rebuilding"
        )
    else:
        expected = f"output of stage a is damaged: {problem}; rebuilding"
    assert f"{expected}\n[1/2] a: running (count)\n" in result.stderr
    assert expected in (run_dir / "logs" / "run.log").read_text()
    assert "[2/2] b: running" in result.stderr  # b was built on the damaged a: rebuilt too
    assert (run_dir / "runs.log").read_text().split() == ["a", "b", "a", "b"]
    assert value(run_dir, "a") == 1.0 and value(run_dir, "b") == 2.0
    assert not (run_dir / "a" / "model.safetensors").exists()
    assert summary_of(run_dir)["status"] == "done"
    again = align_run(recipe, run_dir)  # and the rebuilt output verifies
    assert "[1/2] a: cached" in again.stderr and "rebuilding" not in again.stderr


def test_hidden_files_the_os_adds_are_not_damage(done_run):
    recipe, run_dir = done_run
    (run_dir / "a" / ".DS_Store").write_bytes(b"finder")
    result = align_run(recipe, run_dir)
    assert result.returncode == 0 and "[1/2] a: cached" in result.stderr and "rebuilding" not in result.stderr


def test_an_untouched_output_is_a_cache_hit_without_hashing(write_recipe, fake_pm, tmp_path, monkeypatch):
    import align.artifacts
    from align.recipe import load_recipe
    from align.runner import run_recipe

    recipe = load_recipe(write_recipe(CHAIN), [], fake_pm)
    run_dir = tmp_path / "run"
    run_recipe(recipe, fake_pm, run_dir=run_dir)
    hashed = []
    hash_file = align.artifacts.hash_file
    monkeypatch.setattr(align.artifacts, "hash_file", lambda path: hashed.append(path.name) or hash_file(path))

    summary = run_recipe(recipe, fake_pm, run_dir=run_dir)
    assert [s.status for s in summary.stages.values()] == ["cached", "cached"]
    assert hashed == []  # a stat per file, nothing read

    touched = run_dir / "a" / "value.json"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1_000_000_000))
    summary = run_recipe(recipe, fake_pm, run_dir=run_dir)
    assert [s.status for s in summary.stages.values()] == ["cached", "cached"]
    assert hashed == ["value.json"]  # only the touched file is read, and it still matches

    run_recipe(recipe, fake_pm, run_dir=run_dir)
    assert hashed == ["value.json"]  # its new time was recorded: no hashing the next time


def test_the_manifest_lists_each_file_with_size_time_and_hash(done_run):
    _, run_dir = done_run
    manifest = json.loads((run_dir / "a" / MANIFEST).read_text())
    assert manifest["format"] == 2
    assert sorted(manifest["files"]) == ["tokenizer.json", "value.json"]
    entry, stat = manifest["files"]["value.json"], (run_dir / "a" / "value.json").stat()
    assert entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns and len(entry["sha256"]) == 64


# --- export ----------------------------------------------------------------------------------------------


def export(run_dir: Path, stage: str, target: Path, *extra: str):
    return run_align("export", str(run_dir / stage), str(target), *extra)


def test_export_of_an_output_the_last_run_vouches_for(done_run, tmp_path):
    _, run_dir = done_run
    result = export(run_dir, "b", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote checkpoint to {tmp_path / 'out'}\n" and result.stderr == ""
    assert json.loads((tmp_path / "out" / "value.json").read_text())["value"] == 2.0


def test_export_refuses_the_old_output_of_a_stage_whose_rerun_failed(done_run, tmp_path):
    recipe, run_dir = done_run
    assert align_run(recipe, run_dir, "stages.b.value=5", "stages.b.fail=align").returncode == 1
    before = snapshot(run_dir, "a", "b")

    refused = export(run_dir, "b", tmp_path / "out")
    assert refused.returncode == 2
    assert refused.stderr == (
        f"error: not exporting {run_dir / 'b'}: the last run of stage 'b' failed (the fake stage was told to fail); "
        f"{run_dir / 'b'} holds the output of an earlier run\n"
        f"  hint: run its recipe again (align run RECIPE --run-dir {run_dir}) to rebuild it, or pass --force to "
        "export it anyway\n"
    )
    assert not (tmp_path / "out").exists()

    forced = export(run_dir, "b", tmp_path / "out", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr == (
        f"warning: exporting {run_dir / 'b'} although the last run of stage 'b' failed (the fake stage was told "
        f"to fail); {run_dir / 'b'} holds the output of an earlier run (--force)\n"
    )
    assert json.loads((tmp_path / "out" / "value.json").read_text())["value"] == 2.0  # the earlier output
    assert snapshot(run_dir, "a", "b") == before
    assert export(run_dir, "a", tmp_path / "out-a").returncode == 0  # a was cached in that run: vouched


def test_export_refuses_a_damaged_output(done_run, tmp_path):
    _, run_dir = done_run
    (run_dir / "b" / "value.json").write_text("{")
    refused = export(run_dir, "b", tmp_path / "out")
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        f"error: not exporting {run_dir / 'b'}: {run_dir / 'b'} is damaged: "
        "value.json has 1 bytes, not the 14 it was published with\n"
    )
    assert "--force" in refused.stderr and not (tmp_path / "out").exists()
    assert export(run_dir, "b", tmp_path / "out", "--force").returncode == 0


def test_export_refuses_an_output_of_a_stage_still_running_or_killed(done_run, tmp_path):
    recipe, run_dir = done_run
    holder = start_run(recipe, run_dir, "stages.b.sleep=30", "stages.b.value=5")
    holder.kill()
    holder.communicate(timeout=60)
    refused = export(run_dir, "b", tmp_path / "out")
    assert refused.returncode == 2
    assert f"stage 'b' is running, or its run was killed before it ended; {run_dir / 'b'} holds" in refused.stderr


def test_export_refuses_an_output_the_summary_does_not_record(done_run, tmp_path, write_recipe):
    recipe, run_dir = done_run
    # Another output put in b's place: same stage, but not the artifact the last run recorded.
    other = tmp_path / "other"
    assert align_run(recipe, other, "stages.b.value=7").returncode == 0
    shutil.rmtree(run_dir / "b")
    shutil.copytree(other / "b", run_dir / "b")
    refused = export(run_dir, "b", tmp_path / "out")
    assert refused.returncode == 2
    assert f"{run_dir / 'b'} is not the output that the last run recorded for stage 'b'" in refused.stderr

    # A later run of another recipe in the same folder, without stage b.
    assert align_run(write_recipe(CHAIN.split("  b:")[0], name="only-a.yaml"), run_dir).returncode == 0
    refused = export(run_dir, "b", tmp_path / "out")
    assert refused.returncode == 2 and f"the last run in {run_dir} has no stage 'b'" in refused.stderr

    (run_dir / "summary.json").unlink()
    refused = export(run_dir, "a", tmp_path / "out")
    assert refused.returncode == 2
    assert f"{run_dir} has no summary.json, so no run there vouches for {run_dir / 'a'}" in refused.stderr


def test_claim_run_dir_refuses_while_held_in_the_same_process(tmp_path):
    held = pytest.raises(AlignError, match=f"is in use by another run: pid {os.getpid()} on host")
    with claim_run_dir(tmp_path / "run"), held, claim_run_dir(tmp_path / "run"):
        pass  # flock locks per open file, so a second claim in the same process is refused too
