"""Experiment trackers: the contract by which every stage's metrics reach them, and the ``report_to`` setting.

A tracker is a plugin: an :class:`ExperimentTracker` registered with ``align_register_trackers``. A stage's
``report_to`` setting (``defaults: {report_to: ...}`` for all of them) names the trackers its metrics go to
besides ``logs/<stage>.metrics.jsonl``: a registered tracker's name, ``none``, or a list of names. Left
unset, every installed tracker whose ``fallback`` is true reports (align's own: TensorBoard).

Every row a stage logs through :meth:`~align.stage.StageContext.log_metrics` reaches each tracker under
its name and step in the metrics file: a TRL trainer's logs, each online-RL iteration, and every stage's
closing metrics (those of ``summary.json``, eval's included), which a tracker gets at the stage's last
step. One place serves every stage, a third party's too, so a tracker shows exactly what the metrics file
holds. Each stage is a run of its own (:class:`RunIdentity`): named ``<run folder>/<stage>``, with the
resolved recipe and the stage's fingerprint (the identity caching keys on). Only the run's first process
(global rank 0) reports, so that a run on several machines is one run in a tracker, not one per machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align import hookimpl
from align.backend import agree, is_rank_zero
from align.errors import AlignError
from align.schema import did_you_mean, setting

if TYPE_CHECKING:
    from align.plugin_manager import AlignPluginManager
    from align.recipe import Recipe
    from align.stage import StageContext

__all__ = [
    "REPORT_TO",
    "TRACKER",
    "ExperimentTracker",
    "RunIdentity",
    "RunStatus",
    "Tracker",
    "TrackerRun",
    "check_report_to",
    "recipe_yaml",
    "report_to_setting",
    "run_name",
    "stage_recipe",
    "trackers_of",
    "tracking",
]

logger = logging.getLogger("align")

#: The registry kind of trackers (``plugins.registry(TRACKER)``).
TRACKER = "tracker"
#: The setting's name, in a stage's settings and in ``defaults:``.
REPORT_TO = "report_to"
#: The ``report_to`` value that reports nowhere.
NONE = "none"

#: A tracker's name, as ``report_to`` takes it: annotate a stage's setting
#: ``report_to: Tracker | list[Tracker] | None = report_to_setting()``. The names are the registry's, so
#: they are checked when the recipe loads (:func:`check_report_to`), not by the type.
Tracker = str

#: How a stage ended, as a tracker's run is closed: ``killed`` for an interrupt (Ctrl-C, a signal).
RunStatus = Literal["finished", "failed", "killed"]


@dataclass(frozen=True)
class RunIdentity:
    """Which stage of which run a tracker's run is: what every tracker names and describes its run with."""

    name: str  #: ``<run folder>/<stage>`` (``quickstart/sft``): the run's name in every tracker
    group: str  #: the run folder's name, shared by a run's stages (a W&B group, an MLflow experiment)
    stage: str  #: the stage's name in the recipe
    plugin: str  #: the stage's plugin
    fingerprint: str  #: the stage's fingerprint: its settings and inputs, as caching keys on them
    run_dir: Path  #: the run folder, absolute

    @classmethod
    def of(cls, context: StageContext, fingerprint: str) -> RunIdentity:
        """The identity of the stage ``context`` runs."""
        run_dir = Path(context.run_dir).resolve()
        return cls(run_name(context), run_dir.name, context.name, context.stage.name, fingerprint, run_dir)

    def params(self) -> dict[str, str]:
        """The identity as short text parameters (stage, plugin, fingerprint, run folder), for a run's config."""
        return {
            "stage": self.stage,
            "plugin": self.plugin,
            "fingerprint": self.fingerprint,
            "run_dir": str(self.run_dir),
        }


class TrackerRun:
    """One stage's run in a tracker, which :meth:`ExperimentTracker.open` returns."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one row of the stage's metrics file at ``step`` (closing metrics: at the stage's last step).

        An exception here drops this tracker for the rest of the stage, with a warning; the stage goes on.
        """
        raise NotImplementedError

    def close(self, status: RunStatus) -> None:
        """End the run, as the stage ended: ``finished``, ``failed`` or ``killed``."""


class ExperimentTracker:
    """Base class for tracker plugins: where a stage's metrics are reported besides its metrics file.

    ``name`` is what ``report_to`` names it by. ``fallback = True`` makes it report for every stage whose
    recipe names no tracker (every such tracker does; align's TensorBoard is one). ``distribution`` is the
    pip package that :meth:`open` needs beyond align's own dependencies, so that a recipe naming the tracker
    without it is refused when it loads, with the command that installs it (:meth:`missing`).
    """

    name: ClassVar[str]
    fallback: ClassVar[bool] = False
    distribution: ClassVar[str | None] = None
    #: The module :meth:`open` imports from ``distribution``, when its name is not the distribution's.
    module: ClassVar[str | None] = None

    def missing(self) -> str | None:
        """The package to install before this tracker can open, or ``None`` when nothing is missing.

        Asked for each tracker a recipe names, when it loads. By default: ``distribution`` when ``module``
        (else the distribution's name, ``-`` read as ``_``) cannot be imported.
        """
        if self.distribution is None:
            return None
        module = self.module or self.distribution.replace("-", "_")
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a dotted name whose parent package is missing
            found = False
        return None if found else self.distribution

    def open(self, context: StageContext, identity: RunIdentity) -> TrackerRun:
        """Start the stage's run, before the stage does any work; called in the run's first process only.

        Import the tracker's package here, not at module level. Raise :class:`~align.AlignError` saying how
        to fix what stops it (not logged in, a server out of reach): align names the tracker and stops the
        stage, in every process, before it trains. Any other exception is reported the same way.

        :param context: the stage about to run: ``run_dir`` (write under it unless told otherwise),
            ``name``, ``config``, ``recipe`` (:func:`recipe_yaml`, :func:`stage_recipe`).
        :param identity: the run's name, group and fingerprint.
        """
        raise NotImplementedError


def report_to_setting() -> Any:
    """The ``report_to`` setting, for a stage's settings class (a dataclass field)."""
    return setting(
        None,
        help="Where the stage's metrics are reported besides logs/<stage>.metrics.jsonl: a tracker's name "
        "(e.g. tensorboard, wandb, mlflow; `align plugins` lists those installed), none, or a list of names. "
        "Unset: defaults.report_to, else every installed tracker that serves by default (align's: tensorboard).",
    )


def trackers_of(value: Any, plugins: AlignPluginManager, key: str = REPORT_TO) -> list[ExperimentTracker]:
    """The trackers a ``report_to`` value names: ``None`` for the installed fallback trackers, ``none``
    (or ``[]``) for none.

    :param value: a tracker's name, a list of them, ``none`` or ``None``.
    :param plugins: the plugin manager whose tracker registry the names are looked up in.
    :param key: the setting's key path, for the error.
    :raises AlignError: an unknown name (with the nearest registered one), or ``none`` beside others.
    """
    registry = plugins.registry(TRACKER)
    if value is None:
        return [entry.obj for name, entry in sorted(registry.items()) if getattr(entry.obj, "fallback", False)]
    names = list(value) if isinstance(value, (list, tuple)) else [value]
    for index, name in enumerate(names):
        where = f"{key}[{index}]" if isinstance(value, (list, tuple)) else key
        if not isinstance(name, str):
            raise AlignError(f"'{where}' must be a tracker's name; got {name!r} ({type(name).__name__})")
        if name != NONE and name not in registry:
            raise AlignError(
                f"'{where}': unknown tracker '{name}'{did_you_mean(name, [*registry, NONE])}",
                hint=(f"installed trackers: {', '.join(sorted(registry))}, or {NONE}" if registry else f"say {NONE}")
                + "; is the plugin that provides it installed? `align plugins` lists every tracker",
            )
    if NONE in names and len(set(names)) > 1:
        raise AlignError(f"'{key}' lists {NONE} beside other trackers", hint=f"say {NONE} alone, or leave it out")
    return [registry[name].obj for name in dict.fromkeys(names) if name != NONE]


def check_report_to(recipe: Recipe, plugins: AlignPluginManager) -> None:
    """Refuse, when the recipe loads, a tracker that is not registered or whose package is not installed."""
    for spec in recipe.stages.values():
        key = _key(spec.name, spec.config)
        for tracker in trackers_of(_configured(spec.config, recipe), plugins, key):
            package = tracker.missing()
            if package is not None:
                raise AlignError(
                    f"'{key}' asks for {tracker.name}, but the {package} package is not installed",
                    hint=f"pip install {package}, or leave {tracker.name} out",
                )


def run_name(context: StageContext) -> str:
    """The stage's name in every tracker: ``<run folder>/<stage>``."""
    return f"{Path(context.run_dir).resolve().name}/{context.name}"


def recipe_yaml(context: StageContext) -> str:
    """The resolved recipe as YAML, as ``RUN/recipe.yaml`` holds it: a tracker's record of the whole run."""
    return context.recipe.to_yaml()


def stage_recipe(context: StageContext) -> dict[str, Any]:
    """The part of the resolved recipe that makes this stage: ``model``, ``backend`` and its own settings."""
    plain = context.recipe.to_plain()
    return {"model": plain["model"], "backend": plain["backend"], **plain["stages"][context.name]}


@contextlib.contextmanager
def tracking(context: StageContext, fingerprint: str) -> Iterator[None]:
    """Report the stage's metrics to its trackers while the block runs; the runner wraps each stage in it.

    In the run's first process (global rank 0), opens each tracker the stage's ``report_to`` names,
    hands it every row logged meanwhile, and closes it as finished, or as failed when the block raises.
    Other processes report nothing: with machines that keep run folders of their own, each machine's
    main process would otherwise open a run of the same name.

    :raises AlignError: in every process, when a tracker cannot be opened, whatever it raised (wandb not
        logged in, a package missing, a bug): the others must not start the stage and wait for rank 0 in it.
    """
    key = _key(context.name, context.config)
    trackers = trackers_of(_configured(context.config, context.recipe), context.plugins, key)
    if not trackers:
        yield
        return
    session = _Session(context)
    problem = None
    if is_rank_zero():
        identity = RunIdentity.of(context, fingerprint)
        for tracker in trackers:
            try:
                session.runs[tracker.name] = tracker.open(context, identity)
            except Exception as error:  # a third party's tracker may raise anything: never leave a rank waiting
                session.close("failed")
                problem = _cannot_open(tracker, error)
                break
            except BaseException:
                session.close("killed")
                raise
    agree(problem)
    if not session.runs:  # the other processes
        yield
        return
    context.plugins.register(session, name=f"align.trackers:{context.name}")
    try:
        yield
    except KeyboardInterrupt:
        session.close("killed")
        raise
    except BaseException:
        session.close("failed")
        raise
    else:
        session.close("finished")
    finally:
        context.plugins.unregister(session)


class _Session:
    """The trackers' runs of the stage that runs; a plugin while it runs, to see ``align_metrics_logged``."""

    def __init__(self, context: StageContext) -> None:
        self.stage = context.name
        self.runs: dict[str, TrackerRun] = {}
        self.last_step = 0

    @hookimpl
    def align_metrics_logged(self, context: StageContext, step: int | None, metrics: Mapping[str, float]) -> None:
        if context.name != self.stage:
            return
        if step is None:  # closing metrics: at the last step, where a tracker's step axis ends
            step = self.last_step
        self.last_step = max(self.last_step, step)
        for name, run in list(self.runs.items()):
            try:
                run.log(metrics, step)
            except Exception as error:  # a tracker's server gone must not end hours of training
                logger.warning(
                    "%s: %s stopped reporting: %s (every metric is still in %s)",
                    self.stage,
                    name,
                    error,
                    context.metrics_file,
                )
                del self.runs[name]

    def close(self, status: RunStatus) -> None:
        for name, run in self.runs.items():
            try:
                run.close(status)
            except Exception as error:  # never hide the stage's own outcome behind a tracker's
                logger.warning("%s: could not close %s: %s", self.stage, name, error)
        self.runs.clear()


def _configured(config: Any, recipe: Recipe) -> Any:
    """A stage's ``report_to``: its setting, else (for a stage whose settings lack it) the recipe's default."""
    value = getattr(config, REPORT_TO, None)
    return value if value is not None else recipe.defaults.get(REPORT_TO)


def _key(stage: str, config: Any) -> str:
    """Where the stage's ``report_to`` was written, for messages."""
    return f"stages.{stage}.{REPORT_TO}" if hasattr(config, REPORT_TO) else f"defaults.{REPORT_TO}"


def _cannot_open(tracker: ExperimentTracker, error: Exception) -> AlignError:
    """What stops the stage, in every process, when ``tracker`` could not open its run."""
    if isinstance(error, AlignError):
        return AlignError(f"tracker '{tracker.name}': {error.message}", hint=error.hint)
    if isinstance(error, ImportError) and tracker.distribution:
        hint = f"pip install {tracker.distribution}, or leave {tracker.name} out of report_to"
    else:
        hint = f"leave {tracker.name} out of report_to to run without it; the metrics file keeps every row"
    return AlignError(f"tracker '{tracker.name}' could not start a run: {type(error).__name__}: {error}", hint=hint)
