"""``sft``: supervised fine-tuning on conversations, with TRL's SFTTrainer.

align renders and masks the data itself (:mod:`align.prepare`): every assistant turn is trained on and
nothing else, for any chat template; long conversations lose their oldest exchanges first; every
skipped, truncated or dropped row is counted. TRL then trains on the token ids. The output is a Hugging
Face checkpoint (or, with a PEFT adapter, the adapter) with its tokenizer and chat template, and each
dataset's held-out loss is reported on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align import hookimpl
from align.kinds import CONVERSATIONS
from align.prepare import Prepared
from align.render import padding_waste
from align.schema import setting
from align.stage import BASE, POLICY, Input, Stage
from align.training import PolicyTrainingSettings, TRLStage


@dataclass
class SFTSettings(PolicyTrainingSettings):
    packing: bool = setting(
        False,
        help="Pack several conversations into each sequence of max_length tokens "
        "(best-fit, without attention across conversations): less padding, faster epochs.",
    )


class SFTStage(TRLStage):
    """Supervised fine-tuning on conversations (TRL SFTTrainer), loss on assistant turns only."""

    name = "sft"
    Config = SFTSettings
    trainer, trainer_config = "SFTTrainer", "SFTConfig"
    data_kind = CONVERSATIONS
    inputs = {"policy": Input("the model to fine-tune", artifact=POLICY, default=(BASE,))}
    version = "3"

    def trainer_settings(self, config: SFTSettings) -> dict[str, Any]:
        return {"packing": config.packing}

    def extra_metrics(self, trainer: Any, data: Prepared, config: SFTSettings) -> dict[str, float]:
        return {"padding_waste": padding_waste([len(i) for i in data.train["input_ids"]], config.batch_size)}


@hookimpl
def align_register_stages() -> list[Stage]:
    return [SFTStage()]
