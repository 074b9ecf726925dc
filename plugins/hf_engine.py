"""The ``hf`` rollout engine: batched ``generate`` on the live policy, with KV cache and left padding.

It generates from the very model being trained, so a policy update needs no weight transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from align import hookimpl
from align.memory import ModelShape, Need, kv_cache, logits
from align.rollout import RolloutEngine, RolloutSession, Sampling
from align.schema import setting


@dataclass
class HFConfig:
    batch_size: int = setting(
        64, help="Prompts generated together; lower it if generation runs out of memory.", minimum=1
    )


class HFSession(RolloutSession):
    def __init__(self, model: Any, tokenizer: Any, config: HFConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config

    def sync(self, model: Any) -> None:
        self.model = model

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
        import torch

        responses: list[list[int]] = []
        device = next(self.model.parameters()).device
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), self.config.batch_size):
                batch = [list(p) for p in prompts[start : start + self.config.batch_size]]
                width = max(len(p) for p in batch)
                pad = self.tokenizer.pad_token_id
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
                attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
                with torch.no_grad():
                    output = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=attention,
                        max_new_tokens=sampling.max_new_tokens,
                        do_sample=not sampling.greedy,
                        temperature=sampling.temperature if not sampling.greedy else None,
                        top_p=sampling.top_p if not sampling.greedy else None,
                        top_k=0 if not sampling.greedy else None,
                        pad_token_id=pad,
                        eos_token_id=self.tokenizer.eos_token_id,
                        use_cache=True,
                    )
                responses += [_until_eos(row[width:].tolist(), self.tokenizer.eos_token_id, pad) for row in output]
        finally:
            self.model.train(was_training)
            torch.random.set_rng_state(generator_state)
        return responses


def _until_eos(tokens: list[int], eos: int, pad: int) -> list[int]:
    if eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    while tokens and tokens[-1] == pad:
        tokens.pop()
    return tokens


class HFEngine(RolloutEngine):
    """transformers ``generate``, batched, on the policy being trained."""

    name = "hf"
    fallback = True  # plain transformers: serves wherever no engine is named
    Config = HFConfig

    def start(self, model: Any, model_path: str, tokenizer: Any, config: HFConfig) -> RolloutSession:
        return HFSession(model, tokenizer, config)

    def memory(
        self, config: HFConfig, shape: ModelShape, sequences: int, length: int, bytes_per_value: int
    ) -> list[Need]:
        at_once = min(sequences, config.batch_size)
        return [
            kv_cache(shape, at_once, length, bytes_per_value),
            logits(shape, at_once, copies=1, what="sampling logits"),
        ]


@hookimpl
def align_register_rollout_engines() -> list[RolloutEngine]:
    return [HFEngine()]
