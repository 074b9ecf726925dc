"""Running a recipe: stages in order, each cached by fingerprint, published atomically.

The run directory::

    runs/<recipe>/
      recipe.yaml          the resolved recipe, as run
      summary.json         the run's status and each stage's status, time and headline metrics
      logs/run.log         everything the run logged, tracebacks of failures included
      logs/<stage>.metrics.jsonl
      <stage>/             each stage's published artifact, with align-manifest.json
      .work/<stage>-<fp>/  a stage in progress; kept across crashes so the stage can resume

This module is also the core plugin that provides the default ``align_run_stage``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import align
from align import hookimpl
from align.artifacts import (
    MANIFEST_FORMAT,
    fingerprint,
    hash_file,
    publish,
    read_manifest,
    tokenizer_identity,
    write_json,
)
from align.backend import is_main_process, wait_for_everyone
from align.errors import AlignError
from align.plugin_manager import AlignPluginManager
from align.recipe import Recipe, StageSpec
from align.schema import did_you_mean, to_plain
from align.stage import BASE, Artifact, StageContext, StageOutcome

__all__ = ["RunSummary", "align_home", "default_run_dir", "run_recipe"]

logger = logging.getLogger("align")

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

    def write(self) -> None:
        if is_main_process():  # with several processes, rank 0 keeps the books
            self.seconds = round(time.time() - self.started, 3)
            write_json(Path(self.run_dir) / "summary.json", asdict(self))


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
) -> RunSummary:
    """Run every stage of ``recipe`` that is not cached; returns the summary (also on failure).

    :param force: stage names to run even when their output is up to date.
    :param cache_dir: where model sources keep built models (default: ``$ALIGN_HOME`` or ~/.cache/align).
    """
    for name in force:
        if name not in recipe.stages:
            raise AlignError(
                f"--force {name}: the recipe has no stage '{name}'{did_you_mean(name, recipe.stages)}",
                hint=f"its stages: {', '.join(recipe.stages)}",
            )
    run_dir = Path(run_dir or default_run_dir(recipe))
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_plain(), sort_keys=False), encoding="utf-8")
    summary = RunSummary(str(run_dir), str(recipe.path) if recipe.path else None)
    summary.stages = {name: StageOutcome("pending") for name in recipe.stages}
    with _run_log(run_dir / "logs" / "run.log"):
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
    return summary


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
            if manifest and manifest.get("fingerprint") == fp and spec.name not in self.force:
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
                logger.info(
                    "%s %s: done in %.1f s%s",
                    counter,
                    spec.name,
                    time.perf_counter() - started,
                    _headline(outcome.metrics),
                )
            self.artifacts[spec.name] = Artifact(spec.name, manifest["artifact_id"], str(final_dir), manifest)
        except AlignError as error:
            outcome.status, outcome.error = "failed", str(error)
            logger.error("%s %s: failed: %s", counter, spec.name, error)
        except Exception as error:  # a bug in a stage: keep the traceback in the log, tell the user where
            outcome.status, outcome.error = "failed", f"{type(error).__name__}: {error}"
            logger.debug("%s", traceback.format_exc())
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

    def execute(self, context: StageContext, fp: str, final_dir: Path, data_files: Mapping[str, str]) -> dict[str, Any]:
        """Run the stage in its work folder and publish it; returns the manifest."""
        self.check_tokenizers_agree(context)
        context.output_dir.mkdir(parents=True, exist_ok=True)
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
        publish(context.output_dir, final_dir, manifest)
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
                "settings": spec.to_plain(),
                "inputs": {
                    role: [a.fingerprint for a in found] if isinstance(found, list) else found.fingerprint
                    for role, found in inputs.items()
                },
                "data_files": dict(data_files),
                "backend": to_plain(self.recipe.backend),
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


def _headline(metrics: Mapping[str, float]) -> str:
    first = [k for k in ("task_score",) if k in metrics]  # what a user looks for first, when there is one
    keys = first + [k for k in metrics if k not in first]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys[:4])
    return f" ({shown})" if shown else ""


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Send everything align logs, tracebacks of failures included, to the run's log file."""
    if not is_main_process():
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
