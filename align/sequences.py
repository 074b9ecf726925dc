"""Batch layout of prompt+response sequences for scoring, shared by PPO and the evaluators.

:func:`pack` lays a batch out as one tensor of rows ``[left padding] prompt response [right padding]``:
every prompt is left-padded to the batch's widest prompt, so all responses start at the same column
(``prompt_width``), and responses are right-padded to the widest response. Position ids count only real
tokens, so a left-padded prompt is seen as if it had no padding. The dictionary it returns:

* ``input_ids``, ``attention_mask``, ``position_ids``: ``(batch, prompt_width + response_width)``, ready for
  a causal LM or a sequence classifier;
* ``responses``: ``(batch, response_width)``, the response tokens (padding after each response);
* ``response_mask``: ``(batch, response_width)`` floats, 1 on a response's real tokens;
* ``response_lengths``: ``(batch,)``, each response's length;
* ``prompt_width``: an ``int``, the column where every response starts.

:func:`response_logprobs` (a causal LM's log-probability of each response token) and
:func:`token_values` (a sequence classifier's score at every position: a reward model's score where a
response ends is at column ``prompt_width + response_lengths - 1``) read that layout.

Importing this module is cheap: torch is imported by the functions that need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["pack", "response_logprobs", "token_values"]


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad: int, device: Any) -> dict[str, Any]:
    """Prompts left-padded to one width, responses right-padded after them, with masks and positions.

    :param pad: the token id written into padding (masked out, so any id works).
    :param device: where the tensors are created (``"cpu"``, ``accelerator.device``, …).
    """
    import torch

    prompt_width = max(len(p) for p in prompts)
    response_width = max(len(r) for r in responses)
    rows, attention, response_mask, response_tokens = [], [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt, response = list(prompt), list(response)
        left, right = prompt_width - len(prompt), response_width - len(response)
        rows.append([pad] * left + prompt + response + [pad] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        response_mask.append([1] * len(response) + [0] * right)
        response_tokens.append(response + [pad] * right)
    attention_mask = torch.tensor(attention, device=device)
    return {
        "input_ids": torch.tensor(rows, device=device),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "responses": torch.tensor(response_tokens, device=device),
        "response_mask": torch.tensor(response_mask, device=device, dtype=torch.float),
        "response_lengths": torch.tensor([len(r) for r in responses], device=device),
        "prompt_width": prompt_width,
    }


def token_values(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """A sequence classifier's score at every position: the value model's per-token estimate, and the
    reward model's score where a response ends."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).last_hidden_state
    return model.score(hidden).squeeze(-1).float()  # type: ignore[no-any-return]


def response_logprobs(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """A causal LM's log-probability of each response token, ``(batch, response_width)``, 0 on padding.

    Computed in float32 at temperature 1 (the model's own distribution); gradients flow unless the caller
    wraps the call in ``torch.no_grad()``. Summed over a row, it is the response's log-likelihood.
    """
    import torch

    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits[:, batch["prompt_width"] - 1 : -1]
    logprobs = torch.gather(logits.float().log_softmax(-1), 2, batch["responses"].unsqueeze(-1)).squeeze(-1)
    return logprobs * batch["response_mask"]
