"""The pieces of the ppo stage that hold tensors: the trained pair of models, and batch layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, so that one optimizer and one DDP or DeepSpeed
    wrapper serve both (TRL's old PPOTrainer did the same)."""

    def __init__(self, policy: Any, value: Any) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> tuple[Any, Any]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return self.policy(**batch).logits, token_values(self.value, batch)


def token_values(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """A sequence classifier's score at every position: the value model's per-token estimate, and the
    reward model's score where a response ends."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def pack(prompts: list[list[int]], responses: list[list[int]], pad: int, device: Any) -> dict[str, Any]:
    """Prompts left-padded to one width, responses right-padded after them, with masks and positions.

    Position ids count only real tokens, so a left-padded prompt is seen as if it had no padding.
    """
    prompt_width = max(len(p) for p in prompts)
    response_width = max(len(r) for r in responses)
    rows, attention, response_mask, response_tokens = [], [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
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
