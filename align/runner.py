"""Running a recipe: stages in order, each cached by fingerprint, published atomically.

The run directory::

    runs/<recipe>/
      recipe.yaml          the resolved recipe, as run
      summary.json         the run's status and each stage's status, time and headline metrics
      report.html          the run at a glance: recipe, stages, data, curves, evaluation (align.run_report)
      plots/<stage>.png    the stage's curves, drawn as it trains (align.plots)
      logs/run.log         everything the run logged, tracebacks of failures included
      logs/<stage>.metrics.jsonl
      tensorboard/<stage>/ the stage's TensorBoard events (and mlruns/, wandb/: see align.plugins.trackers)
      <stage>/             each stage's published artifact, with align-manifest.json
      .work/<stage>-<fp>/  a stage in progress; kept across crashes so the stage can resume
      .align.lock          locked (flock) by the run using the folder; holds its pid and host
      .align.machine-0     with several machines: rank 0's mark, telling which machines share this folder

This module is also the core plugin that provides the default ``align_run_stage``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import align
from align import hookimpl
from align.artifacts import (
    MANIFEST,
    MANIFEST_FORMAT,
    check_output,
    fingerprint,
    hash_file,
    publish,
    read_manifest,
    tokenizer_identity,
    write_json,
)
from align.backend import (
    LAUNCHED_ENV,
    agree,
    any_process,
    is_main_process,
    is_rank_zero,
    must_sync,
    rank,
    set_own_run_folders,
    share,
    wait_for_everyone,
)
from align.console import capture
from align.errors import AlignError
from align.plugin_manager import AlignPluginManager
from align.progress import headline
from align.recipe import Recipe, StageSpec
from align.schema import did_you_mean
from align.stage import BASE, Artifact, StageContext, StageOutcome
from align.trackers import REPORT_TO, tracking

__all__ = [
    "LOCK_FILE",
    "RunSummary",
    "align_home",
    "claim_run_dir",
    "default_run_dir",
    "run_recipe",
    "storage_error",
    "why_unvouched",
]

logger = logging.getLogger("align")

#: The file in a run folder that the run using it holds locked (``flock``), with its pid and host inside.
LOCK_FILE = ".align.lock"

Inputs = Artifact | list[Artifact]  # one role's input: one artifact, or several for a role with pick="all"


@hookimpl(trylast=True)
def align_run_stage(context: StageContext) -> Mapping[str, float]:
    """The default: let the stage plugin do its work."""
    return context.stage.run(context)


@dataclass
class RunSummary:
    """What ``summary.json`` holds."""

    run_dir: str
    recipe: str | None
    status: Literal["running", "done", "failed", "interrupted"] = "running"
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    error: str | None = None
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    #: stage → ``artifact_id`` of the output it published or found cached. Written into each stage's
    #: entry of summary.json, so that ``align export`` can tell that output from an older one that a
    #: failed rerun left in place.
    artifact_ids: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What summary.json holds: the fields, with each stage's ``artifact_id`` in its own entry."""
        data = asdict(self)
        ids = data.pop("artifact_ids")
        for name, stage in data["stages"].items():
            stage["artifact_id"] = ids.get(name)
        return data

    def write(self) -> None:
        if not is_main_process():  # with several processes, rank 0 keeps the books
            return
        self.seconds = round(time.time() - self.started, 3)
        try:
            write_json(Path(self.run_dir) / "summary.json", self.to_json())
        except OSError as error:
            # A full disk must fail the stage that filled it, with its own message, not end the run with
            # a traceback from the bookkeeping; the failure still reaches the terminal and the log.
            logger.error("could not write summary.json: %s", storage_error(error, Path(self.run_dir)) or error)


def default_run_dir(recipe: Recipe) -> Path:
    """``run_dir`` from the recipe, else ``runs/<recipe file name>`` under the current folder."""
    if recipe.run_dir:
        return Path(recipe.run_dir)
    return Path("runs") / (recipe.path.stem if recipe.path else "recipe")


def run_recipe(
    recipe: Recipe,
    pm: AlignPluginManager,
    run_dir: Path | None = None,
    force: Sequence[str] = (),
    cache_dir: Path | None = None,
    verbose: bool = False,
) -> RunSummary:
    """Run every stage of ``recipe`` that is not cached; returns the summary (also on failure).

    While it runs, what libraries print goes to ``logs/run.log`` only (:func:`align.console.capture`),
    and the terminal shows align's own lines and a progress bar per stage.

    :param force: stage names to run even when their output is up to date.
    :param cache_dir: where model sources keep built models (default: ``$ALIGN_HOME`` or ~/.cache/align).
    :param verbose: show what libraries print on the terminal too, and align's debug lines (every logged
        row of metrics).
    """
    for name in force:
        if name not in recipe.stages:
            raise AlignError(
                f"--force {name}: the recipe has no stage '{name}'{did_you_mean(name, recipe.stages)}",
                hint=f"its stages: {', '.join(recipe.stages)}",
            )
    run_dir = Path(run_dir or default_run_dir(recipe))
    with contextlib.ExitStack() as held:
        _open_run_dir(run_dir, recipe, held, verbose)
        summary = RunSummary(str(run_dir), str(recipe.path) if recipe.path else None)
        summary.stages = {name: StageOutcome("pending") for name in recipe.stages}
        runner = _Runner(recipe, pm, run_dir, set(force), cache_dir or align_home() / "models", summary)
        try:
            runner.run_all()
        except KeyboardInterrupt:
            summary.status, summary.error = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
            for outcome in summary.stages.values():
                if outcome.status == "running":
                    outcome.status, outcome.error = "failed", "interrupted"
            raise
        finally:
            summary.write()
            pm.hook.align_run_finished(summary=summary)
            _write_report(run_dir, pm)
    return summary


def _write_report(run_dir: Path, pm: AlignPluginManager) -> None:
    """The run's report.html, however the run ended; a report that cannot be written costs a warning."""
    from align.run_report import write_run_report

    if not is_main_process():
        return
    try:
        logger.debug("wrote %s", write_run_report(run_dir, pm))
    except Exception as error:  # noqa: BLE001 - the run's outcome stands; `align report` can try again
        logger.warning("could not write %s: %s: %s", run_dir / "report.html", type(error).__name__, error)


def _open_run_dir(run_dir: Path, recipe: Recipe, held: contextlib.ExitStack, verbose: bool = False) -> None:
    """Lock, create and start writing the run folder, every process of the run agreeing.

    One process takes the run folder's lock: this one when it runs alone, or rank 0 when an outside
    launcher (torchrun, srun, …) started the processes; when `align run` relaunched itself, the launching
    process holds it for the whole run, and the processes it started (LAUNCHED_ENV) must not try to take it
    a second time. With several machines, each machine whose run folder is not machine 0's (they do not
    share a file system, or were given different folders) keeps a whole run folder of its own, locked by
    its first process. Whatever goes wrong in any process stops them all, with the same message.
    """
    set_own_run_folders(False)
    machines = recipe.backend.num_machines > 1 and must_sync()
    problem, mark = None, None
    try:
        if is_main_process() and os.environ.get(LAUNCHED_ENV) != "1":
            held.enter_context(claim_run_dir(run_dir))  # before anything is written into the folder
        if machines:
            _check_run_dir(run_dir)
            mark = _mark_machine_0(run_dir)
    except AlignError as error:
        problem = error
    if machines:  # rank 0 shares its mark even when it failed: the others wait for it
        mark = share(mark)
    agree(problem)
    try:
        if machines and not _same_folder_as_machine_0(run_dir, mark):
            set_own_run_folders(True)
            if is_main_process():  # this machine's first process; its launcher locked nothing
                held.enter_context(claim_run_dir(run_dir))
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        if is_main_process():
            (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        label = f"rank {rank()}" if rank() else ""
        held.enter_context(capture(run_dir / "logs" / "run.log", is_main_process(), verbose, label))
    except AlignError as error:
        problem = error
    except OSError as error:  # before any work: say what is wrong with the folder (exit 2)
        problem = storage_error(error, run_dir) or AlignError(
            f"cannot set up run folder {run_dir}: {error}", hint="choose another folder with --run-dir"
        )
    agree(problem)


#: Written by rank 0 into its run folder, to tell the machines that share that folder from those that
#: do not: each reads the mark in its own run folder and compares it with the one rank 0 shares.
MACHINE_0_MARK = ".align.machine-0"


def _mark_machine_0(run_dir: Path) -> str | None:
    """Rank 0 writes a mark of this run into its run folder, and returns it."""
    import secrets

    if not is_rank_zero():
        return None
    mark = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}"
    try:
        (run_dir / MACHINE_0_MARK).write_text(mark, encoding="utf-8")
    except OSError as error:
        raise storage_error(error, run_dir) or AlignError(f"cannot write {run_dir / MACHINE_0_MARK}: {error}") from None
    return mark


def _same_folder_as_machine_0(run_dir: Path, mark: str | None) -> bool:
    try:
        return (run_dir / MACHINE_0_MARK).read_text(encoding="utf-8") == mark
    except OSError:
        return False


@contextlib.contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[int]:
    """Check that ``run_dir`` can be used, create it, and hold its lock until the block ends; yields the
    lock file's descriptor, for processes that are to hold the lock too (the launcher of a distributed run).

    The lock is an ``flock`` on :data:`LOCK_FILE`, so the OS releases it when the last process holding
    the descriptor exits however it ends (finishes, fails, Ctrl-C, SIGKILL): a lock left by a process that
    is gone never blocks. The file itself stays; it only names the holder (pid and host) for the message a
    second run gets.

    :raises AlignError: the folder is a file, cannot be created or written, or another run holds it.
    """
    _check_run_dir(run_dir)
    try:
        # "a+": create it when absent, but never truncate a file another run may hold and have written.
        handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held across the yield)
    except OSError as error:
        raise storage_error(error, run_dir) or AlignError(f"cannot create {run_dir / LOCK_FILE}: {error}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, handle) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["align", *sys.argv[1:]]),
        }
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder) + "\n")
            handle.flush()
        except OSError as error:
            raise storage_error(error, run_dir) or AlignError(f"cannot write {run_dir / LOCK_FILE}: {error}") from None
        try:
            yield handle.fileno()
        finally:
            with contextlib.suppress(OSError):  # the file outlives the lock; leave no holder named in it
                handle.truncate(0)
    finally:
        handle.close()  # releases the lock


def _check_run_dir(run_dir: Path) -> None:
    """Refuse, before any work, a run folder that is a file or cannot be written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AlignError(
            f"run folder {run_dir} is a file, not a folder",
            hint="move the file away, or choose another folder with --run-dir (or run_dir: in the recipe)",
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in run_dir.parents if p.exists() and not p.is_dir()), run_dir)
        raise AlignError(
            f"cannot create run folder {run_dir}: {blocking} is a file, not a folder",
            hint="choose another folder with --run-dir (or run_dir: in the recipe)",
        ) from None
    except OSError as error:
        raise storage_error(error, run_dir) or AlignError(f"cannot create run folder {run_dir}: {error}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise AlignError(
            f"run folder {run_dir} is read-only: align cannot write its outputs, logs or summary there",
            hint=f"make it writable (chmod u+w {run_dir}), or choose another folder with --run-dir",
        )


def _in_use(run_dir: Path, handle: Any) -> AlignError:
    """The error for a run folder whose lock another process holds, naming that process."""
    holder: dict[str, Any] = {}
    for _ in range(20):  # the holder writes its name just after it takes the lock: give it a moment
        handle.seek(0)
        with contextlib.suppress(ValueError):
            holder = json.loads(handle.read() or "{}")
        if holder:
            break
        time.sleep(0.05)
    pid, host = holder.get("pid", "unknown"), holder.get("host", "unknown")
    since = f", since {holder['since']}" if holder.get("since") else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return AlignError(
        f"run folder {run_dir} is in use by another run: pid {pid} on host {host}{since}{command}",
        hint=f"wait for it to end, stop it (kill {pid} on {host}), or choose another folder with --run-dir "
        "(a lock whose process is gone does not block)",
    )


def storage_error(error: OSError, where: Path) -> AlignError | None:
    """An :class:`AlignError` saying what an OS error while writing means (disk full, read-only,
    permission denied) and where, or None for other errors.

    :param where: the run folder, named when the error does not carry a file name.
    """
    place = error.filename or where
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk is full" if error.errno == errno.ENOSPC else "the disk quota is exceeded"
        return AlignError(
            f"{what}: no space left to write {place} (run folder {where})",
            hint=f"free space on the disk that holds {where} (or choose a --run-dir on another disk) and run "
            "again; earlier outputs are intact, and the run continues from the stage that failed",
        )
    if error.errno == errno.EROFS:
        return AlignError(
            f"cannot write {place}: the file system is read-only (run folder {where})",
            hint="choose a --run-dir on a writable disk",
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return AlignError(
            f"permission denied: {place} (run folder {where})",
            hint="make it readable and writable for this user, or choose another folder with --run-dir",
        )
    return None


def why_unvouched(output: Path) -> str | None:
    """Why the last run of ``output``'s run folder does not vouch for it; None when it does.

    It does when the run folder's summary.json records the stage as ``done`` or ``cached`` with this very
    output (the same ``artifact_id`` as its manifest), and the files match the manifest
    (:func:`align.artifacts.check_output`). Otherwise the folder may hold what an earlier run left
    behind, such as the previous output of a stage whose rerun failed.
    """
    manifest = read_manifest(output) or {}
    stage, run_dir = str(manifest.get("stage") or output.name), output.parent
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        recorded = summary["stages"]
    except FileNotFoundError:
        return f"{run_dir} has no summary.json, so no run there vouches for {output}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{run_dir / 'summary.json'} cannot be read ({error})"
    outcome = recorded.get(stage) if isinstance(recorded, dict) else None
    if not isinstance(outcome, dict):
        return f"the last run in {run_dir} has no stage '{stage}'"
    status = outcome.get("status")
    earlier = f"{output} holds the output of an earlier run"
    if status == "failed":
        why = (str(outcome.get("error") or "").splitlines() or ["no reason recorded"])[0]  # without its hint
        return f"the last run of stage '{stage}' failed ({why}); {earlier}"
    if status == "pending":
        return f"the last run in {run_dir} did not get to stage '{stage}'; {earlier}"
    if status not in ("done", "cached"):
        return f"stage '{stage}' is {status}, or its run was killed before it ended; {earlier}"
    if outcome.get("artifact_id") != manifest.get("artifact_id"):
        return f"{output} is not the output that the last run recorded for stage '{stage}'"
    check = check_output(output, manifest)
    if not check.ok:
        return f"{output} {check.describe()}"
    return None


def align_home() -> Path:
    """align's cache folder: ``$ALIGN_HOME``, else ``~/.cache/align``."""
    return Path(os.environ.get("ALIGN_HOME") or Path.home() / ".cache" / "align")


class _Runner:
    def __init__(
        self,
        recipe: Recipe,
        pm: AlignPluginManager,
        run_dir: Path,
        force: set[str],
        cache_dir: Path,
        summary: RunSummary,
    ) -> None:
        self.recipe, self.pm, self.run_dir, self.force = recipe, pm, run_dir, force
        self.cache_dir, self.summary = cache_dir, summary
        self.artifacts: dict[str, Artifact] = {}
        self.source = pm.get("model source", recipe.model.source)

    def run_all(self) -> None:
        self.summary.write()
        total = len(self.recipe.stages)
        for index, spec in enumerate(self.recipe.stages.values(), start=1):
            outcome = self.run_stage(spec, f"[{index}/{total}]")
            if outcome.status == "failed":
                self.summary.status, self.summary.error = "failed", f"stage '{spec.name}' failed: {outcome.error}"
                return
        self.summary.status = "done"

    def run_stage(self, spec: StageSpec, counter: str) -> StageOutcome:
        outcome = self.summary.stages[spec.name]
        context: StageContext | None = None
        started = time.perf_counter()
        try:
            inputs = {
                role: [self.artifact(p) for p in producer] if isinstance(producer, list) else self.artifact(producer)
                for role, producer in spec.inputs.items()
            }
            data_files = self.data_hashes(spec)  # once: hashing large files twice is wasted I/O
            fp = self.fingerprint(spec, inputs, data_files)
            final_dir = self.run_dir / spec.name
            manifest = read_manifest(final_dir)
            context = self.context(spec, inputs, self.run_dir / ".work" / f"{spec.name}-{fp[:12]}")
            up_to_date = manifest and manifest.get("fingerprint") == fp and spec.name not in self.force
            if up_to_date and manifest:
                manifest = self.verified(spec.name, final_dir, manifest)  # None: damaged, rebuild it
            # Machines that keep run folders of their own can differ (a run killed after one of them
            # published): a process that skipped a stage the others train would leave them waiting in its
            # collectives, so every process builds a stage that any of them must.
            if any_process(not (up_to_date and manifest)):
                up_to_date = False
            if up_to_date and manifest:
                outcome.status, outcome.metrics = "cached", dict(manifest.get("metrics", {}))
                outcome.artifact = str(final_dir)
                logger.info("%s %s: cached (%s)", counter, spec.name, final_dir)
            else:
                logger.info("%s %s: running (%s)", counter, spec.name, spec.plugin)
                outcome.status = "running"
                self.summary.write()
                manifest = self.execute(context, fp, final_dir, data_files)
                outcome.status, outcome.metrics = "done", dict(manifest["metrics"])
                outcome.artifact = str(final_dir)
                shown = headline(outcome.metrics, spec.stage.key_metrics)
                logger.info(
                    "%s %s: done in %.1f s%s",
                    counter,
                    spec.name,
                    time.perf_counter() - started,
                    f" ({shown})" if shown else "",
                )
            self.artifacts[spec.name] = Artifact(spec.name, manifest["artifact_id"], str(final_dir), manifest)
            self.summary.artifact_ids[spec.name] = manifest["artifact_id"]
        except AlignError as error:
            outcome.status, outcome.error = "failed", str(error)
            logger.error("%s %s: failed: %s", counter, spec.name, error)
        except Exception as error:  # a bug in a stage: keep the traceback in the log, tell the user where
            logger.debug("%s", traceback.format_exc())
            known = storage_error(error, self.run_dir) if isinstance(error, OSError) else None
            if known is not None:  # a full disk is not a bug: say so, and where
                outcome.status, outcome.error = "failed", str(known)
                logger.error("%s %s: failed: %s", counter, spec.name, known)
            else:
                outcome.status, outcome.error = "failed", f"{type(error).__name__}: {error}"
                logger.error(
                    "%s %s: failed with %s: %s (traceback in %s)",
                    counter,
                    spec.name,
                    type(error).__name__,
                    error,
                    self.run_dir / "logs" / "run.log",
                )
        outcome.seconds = round(time.perf_counter() - started, 3)
        if context is not None:
            self.pm.hook.align_stage_finished(context=context, outcome=outcome)
        self.summary.write()
        return outcome

    def verified(self, name: str, final_dir: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """The manifest of a cached output whose files match it; None when it must be rebuilt.

        A stat per file when nothing was touched (see :func:`align.artifacts.check_output`), so that a
        cache hit on a multi-GB checkpoint stays instant.
        """
        check = check_output(final_dir, manifest)
        if not check.ok:
            logger.warning("output of stage %s %s; rebuilding", name, check.describe())
            return None
        if check.touched and is_main_process():
            # Same content, new times (a copy, a touch): record the times so the next run need not hash.
            files = {path: dict(entry) for path, entry in manifest["files"].items()}
            for path, mtime_ns in check.touched.items():
                files[path]["mtime_ns"] = mtime_ns
            manifest = {**manifest, "files": files}
            with contextlib.suppress(OSError):  # only a speed-up: a read-only copy still verifies
                write_json(final_dir / MANIFEST, manifest)
        return manifest

    def execute(self, context: StageContext, fp: str, final_dir: Path, data_files: Mapping[str, str]) -> dict[str, Any]:
        """Run the stage in its work folder and publish it; returns the manifest."""
        self.check_tokenizers_agree(context)
        context.output_dir.mkdir(parents=True, exist_ok=True)
        with tracking(context, fp):  # every row the stage logs, its closing metrics too, reach its trackers
            self.pm.hook.align_stage_starting(context=context)
            started = time.perf_counter()
            metrics = self.pm.hook.align_run_stage(context=context)
            metrics = _check_metrics(context.name, metrics)
            wait_for_everyone()  # every process has finished writing the output before rank 0 publishes it
            if not is_main_process():
                wait_for_everyone()
                return read_manifest(final_dir) or {}
            context.log_metrics(metrics)
        spec = self.recipe.stages[context.name]
        manifest = {
            "format": MANIFEST_FORMAT,
            "stage": spec.name,
            "plugin": spec.plugin,
            "plugin_version": spec.stage.version,
            "fingerprint": fp,
            "artifact_id": fingerprint([fp, time.time_ns()]),
            "settings": spec.to_plain(),
            "inputs": {
                **{role: {"producer": a.producer, "id": a.fingerprint} for role, a in context.inputs.items()},
                **{
                    role: [{"producer": a.producer, "id": a.fingerprint} for a in group]
                    for role, group in context.input_groups.items()
                },
            },
            "data_files": dict(data_files),
            "base_model": self.recipe.model.to_plain(),
            "tokenizer": tokenizer_identity(context.output_dir),
            "align_version": align.__version__,
            "metrics": metrics,
            "seconds": round(time.perf_counter() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        manifest = publish(context.output_dir, final_dir, manifest)
        for leftover in (self.run_dir / ".work").glob(f"{spec.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # work folders of older settings of this stage
        wait_for_everyone()
        return manifest

    def artifact(self, producer: str) -> Artifact:
        if producer == BASE and BASE not in self.artifacts:
            config = self.recipe.model.config

            def materialize() -> str:
                logger.info("base model: %s", self.recipe.model.source)
                return self.source.materialize(config, self.cache_dir)

            self.artifacts[BASE] = Artifact(BASE, self.source.fingerprint(config), materialize=materialize)
        return self.artifacts[producer]

    def fingerprint(self, spec: StageSpec, inputs: Mapping[str, Inputs], data_files: Mapping[str, str]) -> str:
        return fingerprint(
            {
                "plugin": spec.plugin,
                "plugin_version": spec.stage.version,
                # Where metrics are reported changes nothing the stage makes: no retraining for it.
                "settings": {key: value for key, value in spec.to_plain().items() if key != REPORT_TO},
                "inputs": {
                    role: [a.fingerprint for a in found] if isinstance(found, list) else found.fingerprint
                    for role, found in inputs.items()
                },
                "data_files": dict(data_files),
                "backend": self.recipe.backend.identity(),
            }
        )

    def data_hashes(self, spec: StageSpec) -> dict[str, str]:
        hashes = {}
        for path in spec.stage.data_files(spec.config, self.recipe):
            path = Path(path)
            if not path.is_file():
                raise AlignError(f"stages.{spec.name}: data file {path} does not exist")
            hashes[str(path)] = hash_file(path)
        return hashes

    def check_tokenizers_agree(self, context: StageContext) -> None:
        seen: dict[str, tuple[str, Any]] = {}
        every = [*context.inputs.items(), *((role, a) for role, group in context.input_groups.items() for a in group)]
        for role, artifact in every:
            identity = artifact.tokenizer
            if identity is None:
                continue
            for other_role, (producer, other) in seen.items():
                if other != identity:
                    raise AlignError(
                        f"stage '{context.name}': its {role} ({artifact.producer}) and its {other_role} "
                        f"({producer}) use different tokenizers or chat templates",
                        hint="every model in a chain must share one tokenizer and chat template",
                    )
            seen[role] = (artifact.producer, identity)

    def context(self, spec: StageSpec, inputs: Mapping[str, Inputs], work_dir: Path) -> StageContext:
        return StageContext(
            name=spec.name,
            stage=spec.stage,
            config=spec.config,
            inputs={role: found for role, found in inputs.items() if not isinstance(found, list)},
            input_groups={role: found for role, found in inputs.items() if isinstance(found, list)},
            output_dir=work_dir,
            run_dir=self.run_dir,
            recipe=self.recipe,
            plugins=self.pm,
            logger=logger.getChild(spec.name),
            peft=spec.peft,
            passthrough=spec.passthrough,
        )


def _check_metrics(stage: str, metrics: Any) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise AlignError(f"stage '{stage}' returned {metrics!r}; a stage returns a mapping of metric name → number")
    return {str(k): float(v) for k, v in metrics.items()}
