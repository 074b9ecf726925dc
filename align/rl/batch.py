"""One iteration's responses and everything computed about them, as a typed batch.

A :class:`RolloutBatch` starts as the packed sequences (:func:`align.sequences.pack`'s layout: prompts
left-padded to ``prompt_width``, responses right-padded after them) and is filled in as the iteration goes:
log-probabilities, reference log-probabilities, values, scores, advantages, returns. :meth:`select` takes
rows (a minibatch), :meth:`chunks` splits it for forward passes of bounded memory; both keep the padding
columns, so positions mean the same in every part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["RolloutBatch"]


@dataclass
class RolloutBatch:
    """Responses to prompts, row by row. Every tensor field's first dimension is the row."""

    input_ids: torch.Tensor  #: (rows, prompt_width + response_width)
    attention_mask: torch.Tensor  #: 1 on real tokens
    position_ids: torch.Tensor  #: counts real tokens only
    responses: torch.Tensor  #: (rows, response_width), the response tokens
    response_mask: torch.Tensor  #: (rows, response_width) floats, 1 on a response's real tokens
    response_lengths: torch.Tensor  #: (rows,)
    groups: torch.Tensor  #: (rows,): responses to the same prompt share a group number
    ended: torch.Tensor  #: (rows,) bools: the response ended with EOS within the limit
    prompt_width: int  #: the column where every response starts
    logprobs: torch.Tensor | None = None  #: (rows, response_width), the sampling policy's, at its temperature
    ref_logprobs: torch.Tensor | None = None  #: the reference's, at the same temperature
    values: torch.Tensor | None = None  #: the critic's estimate at each response token
    scores: torch.Tensor | None = None  #: (rows,), the reward of each response (before the KL penalty)
    advantages: torch.Tensor | None = None  #: (rows, response_width)
    returns: torch.Tensor | None = None  #: the critic's targets

    @classmethod
    def pack(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        groups: Sequence[int],
        *,
        eos_token_id: int,
        pad_token_id: int,
        device: Any,
    ) -> RolloutBatch:
        """Lay out prompts and their responses (an empty response becomes a lone EOS: it ended at once)."""
        import torch

        from align.sequences import pack

        responses = [list(r) if r else [eos_token_id] for r in responses]
        packed = pack(prompts, responses, pad_token_id, device)
        return cls(
            **packed,
            groups=torch.tensor(list(groups), device=device),
            ended=torch.tensor([r[-1] == eos_token_id for r in responses], device=device),
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of a causal LM's or sequence classifier's forward pass."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    @property
    def last_tokens(self) -> torch.Tensor:
        """Each response's last token's column in ``input_ids``: where a reward model's score is read."""
        return self.prompt_width + self.response_lengths - 1

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The batch of the given rows (a tensor of indices or a boolean mask)."""
        import torch

        taken: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            taken[field.name] = value[rows] if torch.is_tensor(value) else value
        return RolloutBatch(**taken)

    def chunks(self, size: int | None) -> Iterator[RolloutBatch]:
        """Consecutive parts of at most ``size`` rows (``None``: the whole batch at once)."""
        import torch

        count = len(self)
        step = size or max(count, 1)
        for begin in range(0, count, step):
            yield self.select(torch.arange(begin, min(begin + step, count), device=self.input_ids.device))
