"""``interpolate``: blend a fine-tuned model with the model it started from (WiSE-FT).

Wortsman et al., "Robust fine-tuning of zero-shot models" (2022): averaging the weights of a fine-tuned
model and its starting point often keeps most of the gain while forgetting less. In a recipe::

    stages:
      sft:
        data: demo_sft
      wise:
        plugin: interpolate
        policy: sft        # the fine-tuned model
        anchor: base       # what it started from
        weight: 0.5        # 1.0 = the fine-tuned model, 0.0 = the anchor
"""

from __future__ import annotations

from dataclasses import dataclass

from align import AlignError, hookimpl
from align.schema import setting
from align.stage import Input, Stage, StageContext

__version__ = "0.1.0"


@dataclass
class InterpolateSettings:
    weight: float = setting(0.5, help="Share of the policy in the blend: 1.0 keeps the policy, 0.0 the anchor.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise AlignError(f"interpolate: weight must lie between 0 and 1; got {self.weight}")


class InterpolateStage(Stage):
    """Blend every weight of the policy with the anchor: weight * policy + (1 - weight) * anchor."""

    name = "interpolate"
    Config = InterpolateSettings
    inputs = {
        "policy": Input("the fine-tuned model", default=("sft",)),
        "anchor": Input("the model it started from", default=("base",)),
    }

    def run(self, context: StageContext) -> dict[str, float]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        weight = context.config.weight
        policy = AutoModelForCausalLM.from_pretrained(context.inputs["policy"].path)
        anchor = AutoModelForCausalLM.from_pretrained(context.inputs["anchor"].path)
        anchor_state = anchor.state_dict()
        if anchor_state.keys() != policy.state_dict().keys():
            raise AlignError("interpolate: the policy and the anchor have different architectures")
        distance = 0.0
        with torch.no_grad():
            for name, tensor in policy.state_dict().items():
                if tensor.is_floating_point():
                    distance += float((tensor - anchor_state[name]).pow(2).sum())
                    tensor.mul_(weight).add_(anchor_state[name], alpha=1.0 - weight)
        policy.save_pretrained(context.output_dir)
        AutoTokenizer.from_pretrained(context.inputs["policy"].path).save_pretrained(context.output_dir)
        return {"weight": weight, "policy_anchor_distance": distance**0.5}


@hookimpl
def align_register_stages() -> list[Stage]:
    return [InterpolateStage()]
