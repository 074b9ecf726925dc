"""What a PEFT-method plugin is: how a stage's model is made trainable (fully, partly, or by adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

__all__ = ["PeftChoice", "PeftMethod", "Task", "peft_setting"]

Task = Literal["causal", "reward"]


class PeftMethod:
    """Base class for PEFT-method plugins (registered with ``align_register_peft_methods``).

    A stage's ``peft: {method: NAME, ...settings}`` picks one; the settings are validated against
    ``Config`` when the recipe is loaded. The method whose ``fallback`` is true serves a stage that
    names none.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    fallback: ClassVar[bool] = False

    def check(self, config: Any) -> None:
        """Refuse, with an :class:`~align.AlignError`, what this machine cannot do (called at recipe check)."""

    def load_kwargs(self, config: Any) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (a quantization config, say)."""
        return {}

    def apply(self, model: Any, config: Any, task: Task) -> Any:
        """Return the model to train: ``model`` with its trainable parameters chosen, or wrapped by peft."""
        return model


@dataclass
class PeftChoice:
    """A stage's validated ``peft:`` setting: the method and its settings."""

    method: PeftMethod
    config: Any

    def to_plain(self) -> dict[str, Any]:
        from align.schema import to_plain

        return {"method": self.method.name, **to_plain(self.config)}


def peft_setting() -> Any:
    """The ``peft`` setting of a training stage."""
    from dataclasses import field

    return field(
        default_factory=dict,
        metadata={
            "help": "How the model trains: {method: full} (every weight, the default), freeze, lora, dora or "
            "qlora, with the method's settings, e.g. {method: lora, r: 16}. `align explain lora` lists them."
        },
    )
