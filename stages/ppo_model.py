"""The piece of the ppo stage that holds tensors: the trained pair of models.

The batch layout it reads (:func:`align.sequences.pack`) is align's toolkit, shared with the evaluators.
"""

from __future__ import annotations

from typing import Any

import torch

from align.sequences import token_values


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, so that one optimizer and one DDP or DeepSpeed
    wrapper serve both (TRL's old PPOTrainer did the same)."""

    def __init__(self, policy: Any, value: Any) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> tuple[Any, Any]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return self.policy(**batch).logits, token_values(self.value, batch)
