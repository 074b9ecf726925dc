"""Evaluating aligned checkpoints: did alignment help, and at what cost?

:func:`evaluate_models` generates each model's responses to a prompt set through a rollout engine (the
same seed and sampling for every model), then lets every evaluator plugin (``align_register_evaluators``)
measure what it measures: reward-model score with a confidence interval, win rate against the reference
judged by the reward model, KL to the reference, response length, perplexity on held-out conversations,
preference accuracy on held-out pairs, rule-based reward functions and task metrics. ``align eval`` and
the ``eval`` stage both call it and write the same ``results.json``, ``report.md`` and ``report.html``.
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
from align.plugin_manager import AlignPluginManager
from align.rollout import Sampling
from align.schema import setting, to_plain

logger = logging.getLogger("align.eval")

#: The version of results.json's layout; see :func:`results_schema`.
SCHEMA = "align.eval/1"


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
    samples: int = setting(64, help="How many prompts (and rows of data and pairs) to use.")
    max_new_tokens: int = setting(64, help="Longest response.")
    temperature: float = setting(0.7, help="Sampling temperature (0: greedy).")
    seed: int = setting(0, help="Sampling seed: the same command gives the same numbers.")
    engine: str = setting("hf", help="The rollout engine that generates (hf, vllm, …).")
    reward_functions: list[str] = setting(default_factory=list, help="Rules to score responses with.")
    task_metrics: list[str] = setting(
        default_factory=lambda: ["exact_match", "bleu", "rouge_l"],
        help="`evaluate` modules comparing responses to the replies in `data`: align's own (exact_match, bleu, "
        "rouge_l) load offline; a path to a local module works too.",
    )
    dpo_beta: float = setting(0.1, help="β of DPO's implicit reward β·log(π/π_ref); accuracy does not depend on it.")
    evaluators: list[str] | None = setting(None, help="Evaluators to run (default: all that apply).")


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
    dataset_dir: str | None = None
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def model(self, path: str, kind: str = "causal") -> Any:
        """A model loaded once per run, frozen."""
        from align.models import load_model

        if (path, kind) not in self._cache:
            model = load_model(path, kind)  # type: ignore[arg-type]
            model.eval()
            self._cache[(path, kind)] = model
        return self._cache[(path, kind)]


class Evaluator:
    """Base class for evaluator plugins: one family of measurements of a model under test."""

    name: ClassVar[str]

    def applies(self, run: EvalRun) -> bool:
        """Whether this evaluator has what it needs (a reward model, held-out data, …)."""
        return True

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        raise NotImplementedError


def evaluate_models(
    models: Mapping[str, str],
    reference: str,
    reward_model: str | None,
    settings: EvalSettings,
    plugins: AlignPluginManager,
    dataset_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` (name → checkpoint) against ``reference``; returns the results document."""
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
    prompts = load_prompts(settings.prompts, plugins, dataset_dir=dataset_dir)[: settings.samples]
    renderer = Renderer(tokenizer, max_length=1 << 30)
    prompt_ids = [renderer.prompt_ids(p) for p in prompts]
    run = EvalRun(
        settings,
        plugins,
        tokenizer,
        ModelUnderTest("reference", reference),
        reward_model,
        prompt_ids,
        [p[-1]["content"] for p in prompts],
        dataset_dir,
    )
    under_test = {name: ModelUnderTest(name, path) for name, path in models.items()}
    for model in [run.reference, *under_test.values()]:
        if model.responses:
            continue
        _generate(run, model)
        for twin in under_test.values():  # a model given twice (or the reference itself) generates once
            if twin.path == model.path and not twin.responses:
                twin.responses, twin.texts = model.responses, model.texts
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": to_plain(settings),
        "reference": reference,
        "reward_model": reward_model,
        "prompts": len(prompt_ids),
        "models": {},
    }
    for name, model in under_test.items():
        logger.info("evaluating %s", name)
        entry: dict[str, Any] = {"path": model.path}
        for evaluator in evaluators:
            if evaluator.applies(run):
                entry.update(evaluator.evaluate(run, model))
        entry["examples"] = [
            {"prompt": prompt, "response": text}
            for prompt, text in list(zip(run.prompt_texts, model.texts, strict=True))[:5]
        ]
        results["models"][name] = entry
    return results


def _evaluators(plugins: AlignPluginManager, settings: EvalSettings) -> list[Evaluator]:
    registry = plugins.registry("evaluator")
    names = settings.evaluators if settings.evaluators is not None else list(registry)
    return [plugins.get("evaluator", name) for name in names]


def _generate(run: EvalRun, model: ModelUnderTest) -> None:
    settings = run.settings
    engine = run.plugins.get("rollout engine", settings.engine)
    options = engine.Config()
    engine.check(options)
    policy = run.model(model.path)
    session = engine.start(policy, model.path, run.tokenizer, options)
    sampling = Sampling(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature or 1.0,
        greedy=settings.temperature == 0,
        seed=settings.seed,
    )
    model.responses = session.generate(run.prompts, sampling)
    model.texts = [run.tokenizer.decode(r, skip_special_tokens=True) for r in model.responses]
    session.close()


def write_reports(results: Mapping[str, Any], output: Path) -> None:
    """``results.json``, ``report.md`` and a self-contained ``report.html`` in ``output``."""
    import json

    from align.report import html_report, markdown_report

    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (output / "report.md").write_text(markdown_report(results), encoding="utf-8")
    (output / "report.html").write_text(html_report(results), encoding="utf-8")


def settings_fields() -> Sequence[str]:
    return [f.name for f in dataclasses.fields(EvalSettings)]
