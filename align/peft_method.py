"""What a PEFT-method plugin is: how a stage's model is made trainable (fully, partly, or by adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from align.memory import ModelShape

__all__ = [
    "LearningRates",
    "PeftChoice",
    "PeftMethod",
    "Task",
    "learning_rate_setting",
    "peft_setting",
    "resolve_learning_rate",
]

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
    #: Trains a few new weights (an adapter) beside frozen ones, as the LoRA family does: such runs want
    #: learning rates about ten times higher, and stages default to their adapter rate (LearningRates).
    trains_adapters: ClassVar[bool] = False

    def check(self, config: Any) -> None:
        """Refuse, with an :class:`~align.AlignError`, what this machine cannot do (called at recipe check)."""

    def load_kwargs(self, config: Any) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (a quantization config, say)."""
        return {}

    def apply(self, model: Any, config: Any, task: Task) -> Any:
        """Return the model to train: ``model`` with its trainable parameters chosen, or wrapped by peft."""
        return model

    def trainable_parameters(self, config: Any, shape: ModelShape) -> int | None:
        """How many parameters train, for the memory plan (:mod:`align.memory`); None: all of them."""
        return None

    def bytes_per_base_parameter(self, config: Any) -> float | None:
        """Bytes per frozen base weight when the method quantizes them (for the memory plan); None: float32."""
        return None


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


@dataclass(frozen=True)
class LearningRates:
    """A stage's default learning rates, each with where it comes from: for training every weight, and
    for a method that trains an adapter (:attr:`PeftMethod.trains_adapters`)."""

    full: float
    full_source: str
    adapter: float
    adapter_source: str

    def for_method(self, method: PeftMethod) -> float:
        return self.adapter if method.trains_adapters else self.full


def learning_rate_setting(rates: LearningRates, what: str = "Peak learning rate") -> Any:
    """A stage's ``learning_rate``: unset, the stage takes ``rates``' rate for its PEFT method when the
    recipe loads (so ``align config`` shows it)."""
    from align.schema import setting

    return setting(
        None,
        help=f"{what}. Default: {rates.full:g} ({rates.full_source}); {rates.adapter:g} with an adapter "
        f"method such as lora ({rates.adapter_source}).",
        above=0,
    )


def resolve_learning_rate(config: Any, spec: Any, rates: LearningRates) -> None:
    """Give a stage's unset ``learning_rate`` its default for the stage's PEFT method (at recipe check)."""
    if config.learning_rate is None:
        assert spec.peft is not None, "a stage with a learning rate trains, and so has a `peft` setting"
        config.learning_rate = rates.for_method(spec.peft.method)
