"""Built-in evaluators for ``align eval`` and the ``eval`` stage.

Each measures one thing about a model under test; :mod:`align.evaluation` runs them all by default.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Literal

from align import AlignError, hookimpl
from align.evaluation import EvalRun, Evaluator, ModelUnderTest

METRICS = Path(__file__).resolve().parent / "metrics"


def _sequences(prompts: list[list[int]], responses: list[list[int]], pad: int) -> dict[str, Any]:
    from align.stages.ppo_model import pack

    return pack(prompts, responses, pad, "cpu")


def _response_logprobs(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[:, batch["prompt_width"] - 1 : -1]
        logprobs = torch.gather(logits.float().log_softmax(-1), 2, batch["responses"].unsqueeze(-1)).squeeze(-1)
    return logprobs * batch["response_mask"]


def _rewards(run: EvalRun, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
    import torch

    from align.stages.ppo_model import token_values

    assert run.reward_model is not None
    model = run.model(run.reward_model, "reward")
    batch = _sequences(prompts, responses, run.tokenizer.pad_token_id)
    with torch.no_grad():
        values = token_values(model, batch)
    last = batch["prompt_width"] + batch["response_lengths"] - 1
    return values[torch.arange(len(responses)), last].tolist()


class RewardScore(Evaluator):
    """The reward model's mean score (95 % confidence interval) and win rate against the reference."""

    name = "reward_model"

    def applies(self, run: EvalRun) -> bool:
        return run.reward_model is not None

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        scores = _rewards(run, run.prompts, model.responses)
        reference = _rewards(run, run.prompts, run.reference.responses)
        mean = statistics.fmean(scores)
        half_width = 1.96 * statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else 0.0
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference, strict=True))
        return {
            "reward": {"mean": mean, "ci95": [mean - half_width, mean + half_width], "n": len(scores)},
            "reward_scores": scores,
            "win_rate": wins / len(scores),
        }


class KLToReference(Evaluator):
    """KL(model ‖ reference) per response, estimated on the model's own samples (sum of log-ratios)."""

    name = "kl"

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        batch = _sequences(run.prompts, model.responses, run.tokenizer.pad_token_id)
        ours = _response_logprobs(run.model(model.path), batch)
        theirs = _response_logprobs(run.model(run.reference.path), batch)
        per_response = (ours - theirs).sum(1)
        return {"kl": per_response.mean().item()}


class ResponseLength(Evaluator):
    """Mean response length in tokens, and the share of responses that ended (EOS) within the limit."""

    name = "length"

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        eos = run.tokenizer.eos_token_id
        return {
            "response_length": statistics.fmean(len(r) for r in model.responses),
            "ended_share": statistics.fmean(1.0 if r and r[-1] == eos else 0.0 for r in model.responses),
        }


class RuleRewards(Evaluator):
    """Rule-based reward functions' mean scores (the ground truth of a task with a known answer)."""

    name = "reward_functions"

    def applies(self, run: EvalRun) -> bool:
        return bool(run.settings.reward_functions)

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        found = {}
        for name in run.settings.reward_functions:
            function = run.plugins.get("reward function", name)
            found[name] = statistics.fmean(function(run.prompt_texts, model.texts))
        return {"reward_functions": found}


class Perplexity(Evaluator):
    """Perplexity of the held-out conversations' replies (``data``): how well the model still writes them."""

    name = "perplexity"

    def applies(self, run: EvalRun) -> bool:
        return run.settings.data is not None

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        import torch

        from align.render import IGNORE

        rows = _rendered(run, "sft")
        policy = run.model(model.path)
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
                logits = policy(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                targets = torch.tensor(labels[1:])
                keep = targets != IGNORE
                losses = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
                total, count = total + losses.item(), count + int(keep.sum())
        return {"perplexity": math.exp(total / max(count, 1))}


class PreferenceAccuracy(Evaluator):
    """Accuracy on held-out preference pairs (``pairs``): the reward model's, and DPO's implicit reward's."""

    name = "preference_accuracy"

    def applies(self, run: EvalRun) -> bool:
        return run.settings.pairs is not None

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        rows = _rendered(run, "preference")
        prompts = rows["prompt_ids"]
        found: dict[str, float] = {}
        if run.reward_model is not None:
            chosen = _rewards(run, prompts, rows["chosen_ids"])
            rejected = _rewards(run, prompts, rows["rejected_ids"])
            found["reward_model"] = statistics.fmean(c > r for c, r in zip(chosen, rejected, strict=True))
        if model.path != run.reference.path:
            pad = run.tokenizer.pad_token_id
            margins = []
            for side in ("chosen_ids", "rejected_ids"):
                batch = _sequences(prompts, rows[side], pad)
                ratio = _response_logprobs(run.model(model.path), batch) - _response_logprobs(
                    run.model(run.reference.path), batch
                )
                margins.append((run.settings.dpo_beta * ratio.sum(1)).tolist())
            found["implicit_reward"] = statistics.fmean(c > r for c, r in zip(*margins, strict=True))
        return {"preference_accuracy": found}


class TaskMetrics(Evaluator):
    """`evaluate` metrics of the responses to ``data``'s prompts against its replies (exact match, BLEU, …)."""

    name = "task_metrics"

    def applies(self, run: EvalRun) -> bool:
        return run.settings.data is not None and bool(run.settings.task_metrics)

    def evaluate(self, run: EvalRun, model: ModelUnderTest) -> dict[str, Any]:
        from align.data import DataSource, dataset_dirs, load_examples, resolve, sources
        from align.render import Renderer
        from align.rollout import Sampling

        formats = {name: e.obj for name, e in run.plugins.registry("dataset format").items()}
        examples = []
        for source in sources(run.settings.data):  # type: ignore[arg-type]
            entry = resolve(DataSource(source.dataset).dataset, dataset_dirs(run.dataset_dir))
            examples += load_examples(entry, formats, format_name=source.format)[0]
        examples = [e for e in examples if not e.is_preference][: run.settings.samples]
        renderer = Renderer(run.tokenizer, 1 << 30)
        engine = run.plugins.get("rollout engine", "hf")
        session = engine.start(run.model(model.path), model.path, run.tokenizer, engine.Config())
        sampling = Sampling(max_new_tokens=run.settings.max_new_tokens, greedy=True, seed=run.settings.seed)
        responses = session.generate([renderer.prompt_ids(e.prompt) for e in examples], sampling)
        predictions = [run.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        references = [e.messages[-1]["content"] for e in examples]
        return {"task_metrics": {name: _metric(name, predictions, references) for name in run.settings.task_metrics}}


def _metric(name: str, predictions: list[str], references: list[str]) -> float:
    import evaluate

    local = METRICS / f"{name}.py"
    where = str(local) if local.is_file() else name
    try:
        module = evaluate.load(where)
    except Exception as error:
        raise AlignError(
            f"task metric '{name}' cannot be loaded: {type(error).__name__}: {error}",
            hint="align's own metrics (exact_match, bleu, rouge_l) load offline; a hub metric needs the network, "
            "or give the path of a local evaluate module",
        ) from None
    computed = module.compute(predictions=predictions, references=references)
    return float(next(iter(computed.values()))) if len(computed) == 1 else float(computed.get(name, 0.0))


def _rendered(run: EvalRun, kind: Literal["sft", "preference"]) -> dict[str, list[list[int]]]:
    from align.prepare import prepare
    from align.render import Renderer

    data = run.settings.data if kind == "sft" else run.settings.pairs
    assert data is not None  # the evaluators that call this apply only when it is given
    prepared = prepare(data, Renderer(run.tokenizer, 4096), run.plugins, kind=kind, dataset_dir=run.dataset_dir)
    return {k: v[: run.settings.samples] for k, v in prepared.train.items()}


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
