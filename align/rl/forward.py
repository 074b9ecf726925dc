"""Forward passes over a :class:`~align.rl.batch.RolloutBatch`: log-probabilities, values and the reference.

Log-probabilities are taken at the sampling temperature (the logits divided by it, "N details" 11): they
are then the probabilities of the distribution the responses were drawn from, which the importance ratio
and the KL need. Passes made without gradients run ``chunk`` rows at a time (a stage's
``forward_batch_size``), so their memory follows the chunk, not the batch.

Importing this module imports torch: a stage imports it inside ``run``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from align.sequences import token_values

if TYPE_CHECKING:
    from align.rl.batch import RolloutBatch

__all__ = [
    "PolicyAndValue",
    "Reference",
    "entropy_of",
    "logprobs_of",
    "policy_logprobs",
    "response_logits",
    "reward_scores",
]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``logits / temperature``, in float32."""
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The entropy of each position's distribution at the sampling temperature (what was sampled from)."""
    logprobs = (logits.float() / temperature).log_softmax(-1)
    # A token a logit of -inf rules out adds 0, not 0 × -inf.
    return -torch.where(logprobs.isfinite(), logprobs.exp() * logprobs, 0.0).sum(-1)


def response_logits(model: Any, batch: RolloutBatch) -> torch.Tensor:
    """A causal LM's logits that predict each response token, (rows, response_width, vocabulary).

    Only those columns go through the output layer (``logits_to_keep``): the prompt's would be thrown away.
    """
    width = batch.responses.shape[1]
    logits = model(**batch.model_inputs, logits_to_keep=width + 1).logits
    return logits[:, -(width + 1) : -1]


class PolicyAndValue(torch.nn.Module):
    """The module an RL loop trains: the policy, and the critic when one trains.

    One module, so that one optimizer and one DDP or DeepSpeed wrapper serve both (TRL's PPO trainer did
    the same). Its forward takes a :class:`~align.rl.batch.RolloutBatch` and returns the logits that
    predict each response token and, with a critic, its value at each response token (else None).
    """

    def __init__(self, policy: Any, value: Any | None) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        values = None
        if self.value is not None:
            values = token_values(self.value, batch.model_inputs)[:, batch.prompt_width - 1 : -1]
        return response_logits(self.policy, batch), values


def policy_logprobs(
    model: Any, batch: RolloutBatch, temperature: float, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trained module's (:class:`PolicyAndValue`) log-probabilities of the responses and, with a critic,
    its values at each response token; without gradients, ``chunk`` rows at a time. Zero on padding."""
    logprobs, values = [], []
    with torch.no_grad():
        for part in batch.chunks(chunk):
            logits, part_values = model(part)
            logprobs.append(logprobs_of(logits, part.responses, temperature))
            if part_values is not None:
                values.append(part_values)
            del logits
    mask = batch.response_mask
    return torch.cat(logprobs) * mask, (torch.cat(values) * mask if values else None)


class Reference:
    """The frozen policy that the KL is measured against.

    Either a model of its own, or, for a policy trained through a PEFT adapter, the policy itself with the
    adapter switched off (no second copy in memory; ``policy`` must then be passed to :meth:`logprobs`).
    """

    def __init__(self, model: Any | None = None) -> None:
        self.model = model

    def logprobs(
        self, batch: RolloutBatch, temperature: float, chunk: int | None, policy: Any | None = None
    ) -> torch.Tensor:
        model = self.model if self.model is not None else policy
        if model is None:
            raise ValueError("a Reference without a model of its own needs the adapter-trained policy")
        switched_off: AbstractContextManager[Any] = nullcontext() if self.model is not None else model.disable_adapter()
        parts = []
        with torch.no_grad(), switched_off:
            for part in batch.chunks(chunk):
                parts.append(logprobs_of(response_logits(model, part), part.responses, temperature))
        return torch.cat(parts) * batch.response_mask


def reward_scores(model: Any, batch: RolloutBatch, chunk: int | None) -> torch.Tensor:
    """A reward model's score of each response (at its last token), ``chunk`` rows at a time."""
    scores = []
    with torch.no_grad():
        for part in batch.chunks(chunk):
            values = token_values(model, part.model_inputs)
            scores.append(values[torch.arange(len(part), device=values.device), part.last_tokens])
    return torch.cat(scores)
