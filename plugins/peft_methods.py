"""Built-in PEFT methods: ``full``, ``freeze``, ``lora``, ``dora`` and ``qlora``.

``lora`` and friends write an adapter as the stage's output; see :mod:`align.models` for how a later
stage (and ``align export --merge``) merges it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from align import AlignError, hookimpl
from align.peft_method import PeftMethod, Task
from align.schema import setting

if TYPE_CHECKING:
    from align.memory import ModelShape


@dataclass
class FullConfig:
    pass


class Full(PeftMethod):
    """Train every parameter."""

    name = "full"
    fallback = True  # every weight trains unless a stage names another method
    Config = FullConfig


@dataclass
class FreezeConfig:
    trainable_layers: int = setting(
        2, help="How many of the last transformer layers train; the rest are frozen.", minimum=1
    )
    train_embeddings: bool = setting(False, help="Also train the input embeddings (and a tied output layer).")


class Freeze(PeftMethod):
    """Train only the last N layers and the output head: cheap, and it keeps early features intact."""

    name = "freeze"
    Config = FreezeConfig

    def apply(self, model: Any, config: FreezeConfig, task: Task) -> Any:
        layers = _decoder_layers(model)
        if config.trainable_layers > len(layers):
            raise AlignError(f"peft: trainable_layers is {config.trainable_layers}, but the model has {len(layers)}")
        for parameter in model.parameters():
            parameter.requires_grad = False
        trainable = [*layers[-config.trainable_layers :], model.get_output_embeddings() if task == "causal" else None]
        if task == "reward":
            trainable.append(getattr(model, "score", None))
        if config.train_embeddings:
            trainable.append(model.get_input_embeddings())
        for module in filter(None, trainable):
            for parameter in module.parameters():
                parameter.requires_grad = True
        return model

    def trainable_parameters(self, config: FreezeConfig, shape: ModelShape) -> int:
        head = shape.vocab * shape.hidden
        return config.trainable_layers * shape.block_parameters + head * (
            1 + (config.train_embeddings and not shape.tied)
        )


@dataclass
class LoraConfig:
    r: int = setting(8, help="Rank of the update matrices: higher learns more and costs more memory.", minimum=1)
    alpha: int = setting(16, help="Scale of the update (alpha / r multiplies it); 2 × r is customary.", minimum=1)
    # Below 1: a dropout of 1 zeroes the adapter's input, so nothing would train.
    dropout: float = setting(0.05, help="Dropout on the adapter's input during training.", minimum=0, below=1)
    target_modules: str | list[str] = setting(
        "all-linear",
        help="Which layers get adapters: `all-linear` (every linear layer but the output head) "
        "or a list of module names such as [q_proj, v_proj].",
    )


class Lora(PeftMethod):
    """Low-rank adapters (Hu et al. 2021); the stage writes the adapter, not the merged model."""

    name = "lora"
    Config = LoraConfig
    dora = False
    trains_adapters = True

    def apply(self, model: Any, config: LoraConfig, task: Task) -> Any:
        from peft import LoraConfig as PeftLoraConfig
        from peft import TaskType, get_peft_model

        adapter = PeftLoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            use_dora=self.dora,
            task_type=TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM,
        )
        return get_peft_model(model, adapter)

    def trainable_parameters(self, config: LoraConfig, shape: ModelShape) -> int:
        layers = shape.linear_layers()
        targets = layers if config.target_modules == "all-linear" else set(config.target_modules) & set(layers)
        per_block = sum(config.r * sum(layers[name]) for name in targets)
        return shape.layers * per_block


class Dora(Lora):
    """Weight-decomposed low-rank adaptation (Liu et al. 2024): LoRA that also learns each weight's norm."""

    name = "dora"
    dora = True


@dataclass
class QLoraConfig(LoraConfig):
    bits: Literal[4, 8] = setting(4, help="Quantization of the frozen base weights (bitsandbytes).")


class QLora(Lora):
    """LoRA over a 4- or 8-bit quantized base (Dettmers et al. 2023). Needs CUDA and bitsandbytes."""

    name = "qlora"
    Config = QLoraConfig

    def bytes_per_base_parameter(self, config: QLoraConfig) -> float:
        return config.bits / 8

    def check(self, config: QLoraConfig) -> None:
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise AlignError(
                "peft: qlora needs a CUDA GPU (bitsandbytes quantizes on the GPU), and this machine has none",
                hint="use method: lora on this machine",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise AlignError("peft: qlora needs bitsandbytes", hint="pip install bitsandbytes")

    def load_kwargs(self, config: QLoraConfig) -> dict[str, Any]:
        import torch
        from transformers import BitsAndBytesConfig

        if config.bits == 8:
            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        }

    def apply(self, model: Any, config: LoraConfig, task: Task) -> Any:
        from peft import prepare_model_for_kbit_training

        return super().apply(prepare_model_for_kbit_training(model), config, task)


def _decoder_layers(model: Any) -> Any:
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise AlignError("peft: freeze cannot find the model's transformer layers")
    return max(lists, key=len)


@hookimpl
def align_register_peft_methods() -> list[PeftMethod]:
    return [Full(), Freeze(), Lora(), Dora(), QLora()]
