"""Built-in evaluators for ``align eval`` and the ``eval`` stage.

Each measures one thing about a model under test and returns :class:`~align.evaluation.Metric` rows;
:mod:`align.evaluation` runs them all by default. Metric names (the keys of ``results.json``): ``reward``
and ``win_rate`` (reward model), ``kl``, ``response_length`` and ``ended_share``, each reward function's
name, ``perplexity``, ``preference_accuracy/reward_model`` and ``preference_accuracy/implicit_reward``, and
each task metric's name.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align import AlignError, hookimpl
from align.evaluation import EvalRun, Evaluator, Metric, ModelUnderTest
from align.kinds import CONVERSATIONS, PREFERENCES
from align.reward import RewardFunction
from align.sequences import pack, response_logprobs, token_values

METRICS = Path(__file__).resolve().parent / "metrics"


def _logprobs(model: Any, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad: int) -> Any:
    """Each response token's log-probability under ``model``, ``(batch, response_width)``, 0 on padding."""
    import torch

    with torch.no_grad():
        return response_logprobs(model, pack(prompts, responses, pad, "cpu"))


def _rewards(run: EvalRun, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[float]:
    """The reward model's score of each response (read where the response ends)."""
    import torch

    assert run.reward_model is not None
    model = run.model(run.reward_model, "reward")
    batch = pack(prompts, responses, run.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        values = token_values(model, batch)
    last = batch["prompt_width"] + batch["response_lengths"] - 1
    return values[torch.arange(len(responses)), last].tolist()  # type: ignore[no-any-return]


def _mean_ci95(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """The mean and its 95 % confidence interval (normal approximation)."""
    mean = statistics.fmean(values)
    half_width = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, (mean - half_width, mean + half_width)


class RewardScore(Evaluator):
    """The reward model's mean score (95 % confidence interval) and win rate against the reference."""

    name = "reward_model"

    def applies(self, run: EvalRun) -> bool:
        return run.reward_model is not None

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        scores = _rewards(run, run.prompts, model.responses)
        if ("reward_model", "reference") not in run.memo:  # the reference is scored once per run
            run.memo["reward_model", "reference"] = _rewards(run, run.prompts, run.reference.responses)
        reference = run.memo["reward_model", "reference"]
        mean, ci95 = _mean_ci95(scores)
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference, strict=True))
        return [
            Metric("win_rate", wins / len(scores), "win rate", n=len(scores), higher_is_better=True, headline=True),
            Metric(
                "reward", mean, "reward", ci95=ci95, n=len(scores), samples=scores, higher_is_better=True, headline=True
            ),
        ]


class KLToReference(Evaluator):
    """KL(model ‖ reference) per response, estimated on the model's own samples (sum of log-ratios)."""

    name = "kl"

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        pad = run.tokenizer.pad_token_id
        ours = _logprobs(run.model(model.path), run.prompts, model.responses, pad)
        theirs = _logprobs(run.model(run.reference.path), run.prompts, model.responses, pad)
        per_response = (ours - theirs).sum(1).tolist()
        mean, ci95 = _mean_ci95(per_response)
        return [
            Metric(
                "kl",
                mean,
                "KL",
                ci95=ci95,
                n=len(per_response),
                samples=per_response,
                higher_is_better=False,
                headline=True,
            )
        ]


class ResponseLength(Evaluator):
    """Mean response length in tokens, and the share of responses that ended (EOS) within the limit."""

    name = "length"

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        eos = run.tokenizer.eos_token_id
        lengths = [float(len(r)) for r in model.responses]
        return [
            Metric(
                "response_length", statistics.fmean(lengths), "length", n=len(lengths), samples=lengths, headline=True
            ),
            Metric(
                "ended_share",
                statistics.fmean(1.0 if r and r[-1] == eos else 0.0 for r in model.responses),
                "ended",
                n=len(lengths),
                higher_is_better=True,
            ),
        ]


class RuleRewards(Evaluator):
    """Rule-based reward functions' mean scores (the ground truth of a task with a known answer)."""

    name = "reward_functions"

    def applies(self, run: EvalRun) -> bool:
        return bool(run.settings.reward_functions)

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        found = []
        for name in run.settings.reward_functions:
            function: RewardFunction = run.plugins.get("reward function", name)
            scores = function.score(run.prompt_texts, model.texts, run.prompt_columns)
            mean, ci95 = _mean_ci95(scores)
            found.append(
                Metric(
                    name,
                    mean,
                    f"{name} (rule)",
                    ci95=ci95,
                    n=len(scores),
                    samples=scores,
                    higher_is_better=True,
                    headline=True,
                )
            )
        return found


class Perplexity(Evaluator):
    """Perplexity of the held-out conversations' replies (``data``): how well the model still writes them."""

    name = "perplexity"

    def applies(self, run: EvalRun) -> bool:
        return run.settings.data is not None

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        import torch

        from align.render import IGNORE

        rows = _rendered(run, CONVERSATIONS)
        policy = run.model(model.path)
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
                logits = policy(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                targets = torch.tensor(labels[1:])
                keep = targets != IGNORE
                losses = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
                total, count = total + losses.item(), count + int(keep.sum())
        return [
            Metric(
                "perplexity",
                math.exp(total / max(count, 1)),
                "perplexity",
                n=count,
                higher_is_better=False,
                headline=True,
            )
        ]


class PreferenceAccuracy(Evaluator):
    """Accuracy on held-out preference pairs (``pairs``): the reward model's, and DPO's implicit reward's."""

    name = "preference_accuracy"

    def applies(self, run: EvalRun) -> bool:
        return run.settings.pairs is not None

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        rows = _rendered(run, PREFERENCES)
        prompts = rows["prompt_ids"]
        found = []
        if run.reward_model is not None:
            if ("preference_accuracy", "reward_model") not in run.memo:  # the same for every model
                chosen = _rewards(run, prompts, rows["chosen_ids"])
                rejected = _rewards(run, prompts, rows["rejected_ids"])
                run.memo["preference_accuracy", "reward_model"] = [
                    1.0 if c > r else 0.0 for c, r in zip(chosen, rejected, strict=True)
                ]
            correct = run.memo["preference_accuracy", "reward_model"]
            found.append(
                Metric(
                    "preference_accuracy/reward_model",
                    statistics.fmean(correct),
                    "pref. accuracy (reward model)",
                    n=len(correct),
                    higher_is_better=True,
                )
            )
        if model.path != run.reference.path:
            pad = run.tokenizer.pad_token_id
            margins = []
            for side in ("chosen_ids", "rejected_ids"):
                ratio = _logprobs(run.model(model.path), prompts, rows[side], pad) - _logprobs(
                    run.model(run.reference.path), prompts, rows[side], pad
                )
                margins.append((run.settings.dpo_beta * ratio.sum(1)).tolist())
            correct = [1.0 if c > r else 0.0 for c, r in zip(*margins, strict=True)]
            found.append(
                Metric(
                    "preference_accuracy/implicit_reward",
                    statistics.fmean(correct),
                    "pref. accuracy (implicit reward)",
                    n=len(correct),
                    higher_is_better=True,
                )
            )
        return found


class TaskMetrics(Evaluator):
    """`evaluate` metrics of the responses to ``data``'s prompts against its replies (exact match, BLEU, …)."""

    name = "task_metrics"

    def applies(self, run: EvalRun) -> bool:
        return run.settings.data is not None and bool(run.settings.task_metrics)

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> list[Metric]:
        from align.data import DataSource, dataset_dirs, load_examples, resolve, sources
        from align.render import Renderer
        from align.rollout import Sampling

        if "task_metrics" not in run.memo:  # the held-out examples, read once per run
            formats = {name: e.obj for name, e in run.plugins.registry("dataset format").items()}
            examples = []
            for source in sources(run.settings.data):  # type: ignore[arg-type]
                entry = resolve(DataSource(source.dataset).dataset, dataset_dirs(run.dataset_dir))
                examples += load_examples(entry, formats, format_name=source.format)[0]
            run.memo["task_metrics"] = [e for e in examples if not e.is_preference][: run.settings.samples]
        examples = run.memo["task_metrics"]
        modules = {name: _metric_module(name) for name in run.settings.task_metrics}  # fail before generating
        renderer = Renderer(run.tokenizer, 1 << 30)
        sampling = Sampling(max_new_tokens=run.settings.max_new_tokens, greedy=True, seed=run.settings.seed)
        responses = run.generate(model.path, [renderer.prompt_ids(e.prompt) for e in examples], sampling)
        predictions = [run.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        references = [e.messages[-1]["content"] for e in examples]
        return [
            Metric(
                name,
                _score(name, modules[name], predictions, references),
                Path(name).stem,
                n=len(examples),
                higher_is_better=True if (METRICS / f"{name}.py").is_file() else None,  # align's own: scores
            )
            for name in run.settings.task_metrics
        ]


def _metric_module(name: str) -> Any:
    """The `evaluate` module ``name``: align's own (plugins/metrics), a local path, or a hub metric."""
    import evaluate

    local = METRICS / f"{name}.py"
    try:
        return evaluate.load(str(local) if local.is_file() else name)
    except AlignError:  # align's own module says which package it misses
        raise
    except Exception as error:
        raise AlignError(
            f"task metric '{name}' cannot be loaded: {type(error).__name__}: {error}",
            hint="align's own metrics (exact_match, bleu, rouge_l) load offline; a hub metric needs the network, "
            "or give the path of a local evaluate module",
        ) from None


def _score(name: str, module: Any, predictions: list[str], references: list[str]) -> float:
    computed = module.compute(predictions=predictions, references=references)
    return float(next(iter(computed.values()))) if len(computed) == 1 else float(computed.get(name, 0.0))


def _rendered(run: EvalRun, kind: str) -> dict[str, list[list[int]]]:
    """``data`` (conversations) or ``pairs`` (preferences), rendered as the data kind ``kind``."""
    from align.prepare import prepare
    from align.render import Renderer

    if ("rendered", kind) not in run.memo:  # rendered once per run, for every model
        data = run.settings.data if kind == CONVERSATIONS else run.settings.pairs
        assert data is not None  # the evaluators that call this apply only when it is given
        prepared = prepare(data, Renderer(run.tokenizer, 4096), run.plugins, kind=kind, dataset_dir=run.dataset_dir)
        run.memo["rendered", kind] = {k: v[: run.settings.samples] for k, v in prepared.train.items()}
    return run.memo["rendered", kind]  # type: ignore[no-any-return]


@hookimpl
def align_register_evaluators() -> list[Evaluator]:
    return [
        RewardScore(),
        KLToReference(),
        ResponseLength(),
        RuleRewards(),
        Perplexity(),
        PreferenceAccuracy(),
        TaskMetrics(),
    ]
