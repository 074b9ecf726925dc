"""Evaluating aligned checkpoints: did alignment help, and at what cost?

:func:`evaluate_models` generates each model's responses to a prompt set through a rollout engine (the
same seed and sampling for every model), then lets every evaluator plugin (``align_register_evaluators``)
measure what it measures. An evaluator returns :class:`Metric` rows (a name, a value, and optionally a
label, a 95 % confidence interval, a count, per-item samples, a direction and a headline flag); nothing
downstream knows any evaluator or metric by name: ``results.json`` stores the rows generically, the
reports (:mod:`align.report`) draw a table column and a bar chart per metric and a distribution per metric
with samples, and the ``eval`` stage reports the rows flagged as headline. ``align eval`` and the ``eval``
stage both call it and write the same ``results.json``, ``report.md`` and ``report.html``.

``results.json`` (schema ``align.eval/2``, :data:`SCHEMA`)::

    {"schema": "align.eval/2",
     "settings": {...},            # everything that decides the numbers (the engine as resolved)
     "reference": PATH, "reward_model": PATH | null, "prompts": N,
     "models": {NAME: {
         "path": PATH,
         "metrics": {METRIC: {"value": float, "label": str, "evaluator": str, "ci95": [low, high] | null,
                              "n": int | null, "higher_is_better": bool | null, "headline": bool}},
         "samples": {METRIC: [float, ...]},   # per-item values, for metrics that have them
         "examples": [{"prompt": str, "response": str}, ...]}}}
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from align.data import DataSource
from align.errors import AlignError
from align.model_options import Attention, attention_setting, loading_kwargs
from align.plugin_manager import AlignPluginManager
from align.progress import Progress
from align.reward import columns_of
from align.rollout import RolloutEngine, Sampling, engine_named, generate_in_chunks
from align.schema import MAX_SEED, check_bounds, setting, to_plain

__all__ = [
    "SCHEMA",
    "EvalRun",
    "EvalSettings",
    "Evaluator",
    "Metric",
    "ModelUnderTest",
    "evaluate_models",
    "settings_fields",
    "write_reports",
]

logger = logging.getLogger("align.eval")

#: The version of results.json's layout (see the module's docstring).
SCHEMA = "align.eval/2"


@dataclass
class EvalSettings:
    prompts: str | list[str | DataSource] = setting(
        "demo_prompts_test", help="Prompts to answer: a registry dataset, a file, or the MT-Bench questions file."
    )
    data: str | list[str | DataSource] | None = setting(
        None, help="Held-out conversations: perplexity, and task metrics against their replies."
    )
    pairs: str | list[str | DataSource] | None = setting(
        None, help="Held-out preference pairs: the reward model's accuracy, and DPO's implicit-reward accuracy."
    )
    samples: int = setting(64, help="How many prompts (and rows of data and pairs) to use.", minimum=1)
    max_new_tokens: int = setting(64, help="Longest response.", minimum=1)
    temperature: float = setting(0.7, help="Sampling temperature (0: greedy).", minimum=0)
    seed: int = setting(0, help="Sampling seed: the same command gives the same numbers.", minimum=0, maximum=MAX_SEED)
    engine: str | None = setting(
        None, help="The rollout engine that generates (default: the engine installed as the fallback)."
    )
    reward_functions: list[str] = setting(default_factory=list, help="Rules to score responses with.")
    task_metrics: list[str] = setting(
        default_factory=lambda: ["exact_match", "bleu", "rouge_l"],
        help="`evaluate` modules comparing responses to the replies in `data`: align's own (exact_match, bleu, "
        "rouge_l) load offline; a path to a local module works too.",
    )
    dpo_beta: float = setting(
        0.1, help="β of DPO's implicit reward β·log(π/π_ref); accuracy does not depend on it.", above=0
    )
    evaluators: list[str] | None = setting(None, help="Evaluators to run (default: all that apply).")
    attn_implementation: Attention = attention_setting()

    def __post_init__(self) -> None:
        # `align eval` makes these from its options, without build(): check the ranges here too.
        check_bounds(self)


@dataclass(frozen=True)
class Metric:
    """One measurement of one model: a row of the results, a column of the reports.

    :param name: the key in ``results.json`` and, prefixed by the model's name, in the eval stage's
        metrics (``reward``, ``win_rate``, ``preference_accuracy/reward_model``, …); unique per model.
    :param value: the number.
    :param label: the column heading in the reports (default: ``name``).
    :param ci95: a 95 % confidence interval ``(low, high)`` around ``value``, when the evaluator has one.
    :param n: how many items (responses, pairs, tokens …) ``value`` summarises.
    :param samples: the per-item values ``value`` summarises (the score of each response): stored apart in
        ``results.json`` and drawn as a distribution in ``report.html``.
    :param higher_is_better: the direction in which the metric improves (``None``: neither, or unknown);
        the reports mark it with ↑ or ↓.
    :param headline: the ``eval`` stage reports it in the run's summary, per model (``ppo_reward``).
    """

    name: str
    value: float
    label: str | None = None
    ci95: tuple[float, float] | None = None
    n: int | None = None
    samples: Sequence[float] | None = None
    higher_is_better: bool | None = None
    headline: bool = False

    @property
    def heading(self) -> str:
        """The label the reports show (``label``, else ``name``)."""
        return self.label or self.name

    def stored(self, evaluator: str) -> dict[str, Any]:
        """The row as ``results.json`` keeps it under ``metrics`` (the samples go to ``samples``)."""
        return {
            "value": float(self.value),
            "label": self.heading,
            "evaluator": evaluator,
            "ci95": [float(self.ci95[0]), float(self.ci95[1])] if self.ci95 is not None else None,
            "n": self.n,
            "higher_is_better": self.higher_is_better,
            "headline": self.headline,
        }


@dataclass
class ModelUnderTest:
    """One model being evaluated, with its generations once they exist."""

    name: str
    path: str
    responses: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


@dataclass
class EvalRun:
    """Everything evaluators read: settings, models, tokenizer, prompts, and lazily loaded models."""

    settings: EvalSettings
    plugins: AlignPluginManager
    tokenizer: Any
    reference: ModelUnderTest
    reward_model: str | None
    prompts: list[list[int]]
    prompt_texts: list[str]
    #: The prompt rows' other columns (name → one value per prompt), for reward functions.
    prompt_columns: dict[str, list[Any]]
    dataset_dir: str | None = None
    engine: RolloutEngine | None = None  #: the engine that generates (``settings.engine`` resolved)
    memo: dict[Any, Any] = field(default_factory=dict)  #: what evaluators compute once per run and share
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def model(self, path: str, kind: str = "causal") -> Any:
        """A model loaded once per run, frozen."""
        from align.models import load_model

        if (path, kind) not in self._cache:
            model = load_model(path, kind, **loading_kwargs(self.settings.attn_implementation))  # type: ignore[arg-type]
            model.eval()
            self._cache[(path, kind)] = model
        return self._cache[(path, kind)]

    def generate(
        self, path: str, prompts: Sequence[Sequence[int]], sampling: Sampling, bar: Progress | None = None
    ) -> list[list[int]]:
        """The responses (token ids) of the model at ``path`` to ``prompts``, through the run's engine;
        ``bar`` advances as they come (:func:`align.rollout.generate_in_chunks`)."""
        engine = self.engine or engine_named(self.plugins, self.settings.engine)
        options = engine.Config()
        engine.check(options)
        session = engine.start(self.model(path), path, self.tokenizer, options)
        try:
            return generate_in_chunks(session, prompts, sampling, bar)
        finally:
            session.close()


class Evaluator:
    """Base class for evaluator plugins: one family of measurements of a model under test."""

    name: ClassVar[str]

    def applies(self, run: EvalRun) -> bool:
        """Whether this evaluator has what it needs (a reward model, held-out data, …)."""
        return True

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        """Measure ``model`` (its responses to ``run.prompts`` are in ``model.responses``): one row each."""
        raise NotImplementedError


def evaluate_models(
    models: Mapping[str, str],
    reference: str,
    reward_model: str | None,
    settings: EvalSettings,
    plugins: AlignPluginManager,
    dataset_dir: str | None = None,
    label: str = "eval",
) -> dict[str, Any]:
    """Evaluate ``models`` (name → checkpoint) against ``reference``; returns the results document.

    :param label: what its progress bars are called (the stage's name).
    """
    from transformers import AutoTokenizer

    from align.artifacts import tokenizer_identity
    from align.prepare import load_prompts
    from align.render import Renderer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    identity = tokenizer_identity(Path(reference)) if Path(reference).is_dir() else None
    for name, path in [*models.items(), *([("reward model", reward_model)] if reward_model else [])]:
        other = tokenizer_identity(Path(path)) if Path(path).is_dir() else None
        if identity and other and other["tokenizer"] != identity["tokenizer"]:
            raise AlignError(
                f"{name} ({path}) uses a different tokenizer from the reference ({reference})",
                hint="models, reference and reward model must share one tokenizer to be compared",
            )
    evaluators = _evaluators(plugins, settings)
    engine = engine_named(plugins, settings.engine)
    prompts = load_prompts(settings.prompts, plugins, dataset_dir=dataset_dir)[: settings.samples]
    renderer = Renderer(tokenizer, max_length=1 << 30)
    prompt_ids = [renderer.prompt_ids(p.messages) for p in prompts]
    run = EvalRun(
        settings,
        plugins,
        tokenizer,
        ModelUnderTest("reference", reference),
        reward_model,
        prompt_ids,
        [p.messages[-1]["content"] for p in prompts],
        columns_of(prompts),
        dataset_dir,
        engine,
    )
    under_test = {name: ModelUnderTest(name, path) for name, path in models.items()}
    generating = len({model.path for model in [run.reference, *under_test.values()]})
    with Progress(f"{label} generating", generating * len(prompt_ids), "responses") as bar:
        for model in [run.reference, *under_test.values()]:
            if model.responses:
                continue
            _generate(run, model, bar)
            for twin in under_test.values():  # a model given twice (or the reference itself) generates once
                if twin.path == model.path and not twin.responses:
                    twin.responses, twin.texts = model.responses, model.texts
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {**to_plain(settings), "engine": engine.name},
        "reference": reference,
        "reward_model": reward_model,
        "prompts": len(prompt_ids),
        "models": {},
    }
    applying = [e for e in evaluators if e.applies(run)]
    with Progress(f"{label} measuring", len(under_test), "models") as bar:
        for name, model in under_test.items():
            logger.debug("evaluating %s", name)
            results["models"][name] = _measure(run, model, applying)
            bar.update(advance=1)
    return results


def _measure(run: EvalRun, model: ModelUnderTest, evaluators: Sequence[Evaluator]) -> dict[str, Any]:
    """``model``'s entry in the results: every applying evaluator's rows, and a few of its answers."""
    entry: dict[str, Any] = {"path": model.path, "metrics": {}, "samples": {}}
    for evaluator in evaluators:
        for row in _rows(evaluator, evaluator.evaluate(run, model)):
            if row.name in entry["metrics"]:
                raise AlignError(
                    f"evaluators '{entry['metrics'][row.name]['evaluator']}' and '{evaluator.name}' both "
                    f"report a metric named '{row.name}'",
                    hint="metric names are unique per model: rename one, or run one of the evaluators (`evaluators:`)",
                )
            entry["metrics"][row.name] = row.stored(evaluator.name)
            if row.samples is not None:
                entry["samples"][row.name] = [float(v) for v in row.samples]
    answers = list(zip(run.prompt_texts, model.texts, strict=True))[:5]
    entry["examples"] = [{"prompt": prompt, "response": text} for prompt, text in answers]
    return entry


def _rows(evaluator: Evaluator, rows: Any) -> list[Metric]:
    """The evaluator's rows, checked: a third party's mistake is named, not a crash in the report."""
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, Metric) for r in rows):
        raise AlignError(
            f"evaluator '{evaluator.name}' returned {type(rows).__name__}, not a list of Metric rows",
            hint="Evaluator.evaluate returns [align.evaluation.Metric(name, value, ...), ...]",
        )
    for row in rows:
        if not isinstance(row.name, str) or not row.name or isinstance(row.value, bool):
            raise AlignError(f"evaluator '{evaluator.name}' returned a malformed row: {row!r}")
        if not isinstance(row.value, (int, float)):
            raise AlignError(
                f"evaluator '{evaluator.name}': metric '{row.name}' has the value {row.value!r}, not a number"
            )
    return list(rows)


def _evaluators(plugins: AlignPluginManager, settings: EvalSettings) -> list[Evaluator]:
    registry = plugins.registry("evaluator")
    names = settings.evaluators if settings.evaluators is not None else list(registry)
    return [plugins.get("evaluator", name) for name in names]


def _generate(run: EvalRun, model: ModelUnderTest, bar: Progress) -> None:
    settings = run.settings
    sampling = Sampling(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature or 1.0,
        greedy=settings.temperature == 0,
        seed=settings.seed,
    )
    model.responses = run.generate(model.path, run.prompts, sampling, bar)
    model.texts = [run.tokenizer.decode(r, skip_special_tokens=True) for r in model.responses]


def write_reports(results: Mapping[str, Any], output: Path) -> None:
    """``results.json``, ``report.md`` and a self-contained ``report.html`` in ``output``."""
    import json

    from align.report import html_report, markdown_report

    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (output / "report.md").write_text(markdown_report(results), encoding="utf-8")
    (output / "report.html").write_text(html_report(results), encoding="utf-8")


def settings_fields() -> Sequence[str]:
    """The names of :class:`EvalSettings`' fields."""
    return [f.name for f in dataclasses.fields(EvalSettings)]
