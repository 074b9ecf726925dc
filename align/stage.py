"""What a stage plugin is, and what it is handed when it runs.

A stage subclasses :class:`Stage`, declares its settings (``Config``), the artifacts it consumes
(``inputs``) and implements :meth:`Stage.run`, which writes a Hugging Face folder into
``context.output_dir`` and returns its headline metrics. The runner handles everything around it:
fingerprints, caching, atomic publishing, manifests, logs and the summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.artifacts import tokenizer_identity

if TYPE_CHECKING:
    from align.memory import ModelShape, Need
    from align.peft_method import PeftChoice
    from align.plugin_manager import AlignPluginManager
    from align.progress import Progress
    from align.recipe import Recipe, StageSpec

__all__ = ["BASE", "POLICY", "REWARD_MODEL", "Artifact", "Input", "Stage", "StageContext", "StageOutcome"]

#: The name an input uses for the recipe's base model instead of a stage's output.
BASE = "base"


#: The kinds of artifact the built-in stages produce; a plugin may name others.
POLICY, REWARD_MODEL = "policy", "reward_model"


@dataclass(frozen=True)
class Input:
    """An artifact a stage consumes, by role (``policy``, ``reward_model``, …).

    Where it comes from when the recipe does not say is decided by capability, not by stage name: with
    ``artifact="policy"`` the input is the latest earlier stage whose plugin ``produces`` a policy (or the
    first, or all of them, by ``pick``), and only when the recipe has none do the names in ``default``
    apply (``base``, the recipe's model, or a stage name).

    :param help: what the stage does with it.
    :param artifact: the kind of artifact it takes (:data:`POLICY`, :data:`REWARD_MODEL`, or a plugin's
        own); a recipe that points the role at a stage producing another kind is refused.
    :param pick: which of several producing stages: the ``last`` (default), the ``first``, or ``all`` of
        them (the role then takes a list, found in ``context.input_groups``).
    :param default: fallbacks when no earlier stage produces ``artifact``: the first of these names that
        is an earlier stage, else ``base`` when listed.
    :param optional: the stage can do without it (``context.inputs`` then lacks the role).
    """

    help: str
    artifact: str | None = None
    pick: Literal["last", "first", "all"] = "last"
    default: tuple[str, ...] = (BASE,)
    optional: bool = False  #: when no default applies and the recipe names none, the input is absent

    def describe_default(self) -> str:
        """The default in words, for ``align explain``."""
        found = []
        if self.artifact:
            which = {"last": "the latest", "first": "the first", "all": "every"}[self.pick]
            found.append(f"{which} earlier stage producing a {self.artifact}")
        found += list(self.default)
        return " or ".join(found) or "none"


class Artifact:
    """A model a stage reads: the base model, or an earlier stage's published output.

    :param producer: the stage that wrote it, or ``base``.
    :param fingerprint: identity of its content, part of every downstream stage's fingerprint.
    :param path: a local folder (or, for a base model, a hub id) that ``from_pretrained`` accepts.
    :param manifest: the artifact's manifest (empty for a base model).
    :param materialize: for a base model, builds or finds it on first use of :attr:`path`; a stage
        whose output is cached never pays for that.
    """

    def __init__(
        self,
        producer: str,
        fingerprint: str,
        path: str | None = None,
        manifest: Mapping[str, Any] | None = None,
        materialize: Callable[[], str] | None = None,
    ) -> None:
        self.producer, self.fingerprint = producer, fingerprint
        self.manifest = manifest or {}
        self._path, self._materialize = path, materialize

    @property
    def path(self) -> str:
        if self._path is None:
            assert self._materialize is not None, "an Artifact needs a path or a way to materialize one"
            self._path = self._materialize()
        return self._path

    @property
    def tokenizer(self) -> dict[str, str] | None:
        """Identity of its tokenizer and chat template (see :func:`align.artifacts.tokenizer_identity`)."""
        if "tokenizer" in self.manifest:
            return self.manifest["tokenizer"]
        local = Path(self.path)
        return tokenizer_identity(local) if local.is_dir() else None

    def __repr__(self) -> str:
        return f"Artifact({self.producer!r}, {self._path or 'not materialized'})"


class Stage:
    """Base class for stage plugins; see ``docs/plugins.md`` and ``examples/align-wise-ft``.

    Class attributes a subclass sets:

    * ``name``: the plugin name recipes use (``plugin: sft``).
    * ``Config``: a dataclass of the stage's settings, fields declared with :func:`align.schema.setting`.
    * ``inputs``: role → :class:`Input`. A recipe points a role at an earlier stage (``policy: sft``).
    * ``produces``: the kind of artifact its output is (:data:`POLICY`, :data:`REWARD_MODEL`, …), or
      ``None``; later stages' inputs find their defaults by it.
    * ``version``: bump it when a change of the stage's code should invalidate cached outputs.
    * ``passthrough``: ``"module:Class"`` of a dataclass (a TRL config) whose fields a recipe may also set
      on this stage; they reach the stage as ``context.passthrough``, so a new trainer option works without
      a new release of align.
    * ``key_metrics``: the few metrics that say how the stage goes, in order. Its progress bar shows them
      (from what it gives the bar) and its headline, when it ends, shows them from the metrics it returned:
      there ``loss`` stands for ``first_loss`` → ``last_loss``, ``reward`` for ``reward_first`` →
      ``reward_last``, ``task_score`` for ``task_score_before`` → ``task_score``, and a held-out
      ``eval_<name>`` is preferred to ``<name>`` (see :func:`align.progress.headline`).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    inputs: ClassVar[Mapping[str, Input]] = {}
    produces: ClassVar[str | None] = None
    version: ClassVar[str] = "1"
    passthrough: ClassVar[str | None] = None
    key_metrics: ClassVar[tuple[str, ...]] = ()

    def data_files(self, config: Any, recipe: Recipe) -> Sequence[Path]:
        """The files the stage will read, hashed into its fingerprint so that edited data reruns it."""
        return []

    def check(self, config: Any, recipe: Recipe, plugins: AlignPluginManager) -> None:
        """Refuse, with an :class:`~align.AlignError`, settings that cannot work, before any stage runs.

        Called when the recipe is loaded (``align config`` and ``align run``), after every stage's settings
        were validated against its ``Config``: the place to check names against the registries (a reward
        function, an engine, a data kind) so that a typo stops the run before earlier stages train.
        """

    def memory(
        self, config: Any, spec: StageSpec, recipe: Recipe, plugins: AlignPluginManager, shape: ModelShape
    ) -> Sequence[Need] | None:
        """What the stage will hold per process at its peak, for the memory plan (``align plan``), from the
        base model's ``shape`` and the stage's settings; :mod:`align.memory` has the usual parts. None, the
        default: the stage does not say, and the plan shows it as not estimated."""
        return None

    def facts(self) -> list[str]:
        """Lines ``align explain`` prints under the stage's description (what it takes and produces)."""
        return [f"produces: a {self.produces}"] if self.produces else []

    def passthrough_class(self) -> type | None:
        """The dataclass whose fields a recipe may also set on this stage (see ``passthrough``)."""
        if self.passthrough is None:
            return None
        import importlib

        module, _, name = self.passthrough.partition(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]

    def run(self, context: StageContext) -> Mapping[str, float]:
        """Do the work: write the artifact into ``context.output_dir`` and return headline metrics.

        ``output_dir`` survives a crash or a kill (it is only renamed into place on success), so a stage
        that checkpoints there can resume when the run is repeated.
        """
        raise NotImplementedError(f"stage plugin {type(self).__name__} does not implement run()")


@dataclass
class StageContext:
    """Everything a running stage is given."""

    name: str  #: the stage's name in the recipe
    stage: Stage  #: the plugin object
    config: Any  #: the validated ``stage.Config`` instance
    inputs: Mapping[str, Artifact]  #: role → artifact, for roles that take one
    output_dir: Path  #: where the stage writes its artifact (a work folder, published on success)
    run_dir: Path
    recipe: Recipe
    plugins: AlignPluginManager  #: registries (``plugins.get("dataset format", name)``) and ``plugins.hook``
    logger: logging.Logger
    peft: PeftChoice | None = None  #: the validated ``peft`` setting, for stages that have one
    passthrough: Mapping[str, Any] = field(default_factory=dict)  #: settings for the trainer's own config
    input_groups: Mapping[str, list[Artifact]] = field(default_factory=dict)  #: roles with ``pick="all"``

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / "logs" / f"{self.name}.metrics.jsonl"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metrics: one JSON line in ``logs/<stage>.metrics.jsonl``, a readable line in the run's log
        (and on the terminal with ``-v``), then ``align_metrics_logged``."""
        from align.progress import format_numbers

        record = {"time": round(time.time(), 3), "step": step, **metrics}
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        self.logger.debug("  %s%s: %s", self.name, f" step {step}" if step is not None else "", format_numbers(metrics))
        self.plugins.hook.align_metrics_logged(context=self, step=step, metrics=metrics)

    def progress(self, total: int, unit: str = "steps", what: str = "", done: int = 0) -> Progress:
        """A progress bar for this stage (:class:`align.progress.Progress`), labelled with its name and
        ``what`` it counts when that is not its training (``"scoring"``, ``"generating"``)."""
        from align.progress import Progress

        return Progress(f"{self.name} {what}".strip(), total, unit, done=done)


@dataclass
class StageOutcome:
    """How a stage ended, as ``summary.json`` records it."""

    status: Literal["pending", "running", "done", "cached", "failed"]
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: str | None = None
    error: str | None = None
