"""The memory plan: what each stage will hold per process, estimated before anything loads.

A stage lists its :class:`Need` items (:meth:`align.stage.Stage.memory`) from the model's shape
(:class:`ModelShape`, read from the base model's ``config.json`` values) and its settings; the helpers
here give the usual parts: weights, gradients and Adam states (sharded by ZeRO, offloaded or not),
activations at the stage's batch and length (with or without gradient checkpointing), logits, a KV cache.
``align plan`` prints the table, and ``align run`` prints it first and refuses a stage that cannot fit.

The figures are estimates of the peak: each is written so that ``bench/memory_plan.py`` can compare it
with the measured peak, stage by stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from align.errors import AlignError

if TYPE_CHECKING:
    from align.backend import Backend
    from align.peft_method import PeftChoice
    from align.plugin_manager import AlignPluginManager
    from align.recipe import Recipe

__all__ = [
    "Device",
    "ModelShape",
    "Need",
    "StagePlan",
    "activations",
    "adam_and_gradients",
    "check_fits",
    "describe_bytes",
    "format_plan",
    "fused_lm_head",
    "kv_cache",
    "logits",
    "padding",
    "parse_bytes",
    "plan_recipe",
    "weights",
]

GiB = 1 << 30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer (Llama, Qwen2, Mistral, SmolLM…) that set its memory."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_architecture(cls, config: Mapping[str, Any]) -> ModelShape | None:
        """From ``config.json`` values; None when they do not describe such a model."""
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config.get("intermediate_size") or 4 * hidden),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """Each block's linear layers: name → (inputs, outputs)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def block_parameters(self) -> int:
        return sum(a * b for a, b in self.linear_layers().values()) + 2 * self.hidden  # and two norms

    @property
    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.block_parameters + embeddings + self.hidden


@dataclass(frozen=True)
class Need:
    """One thing a stage holds at its peak, per process: ``where`` is ``device`` or ``cpu`` (offloaded)."""

    what: str
    bytes: int
    where: str = "device"


@dataclass
class StagePlan:
    """A stage's needs; ``None`` for a stage that does not estimate them."""

    stage: str
    needs: list[Need] | None
    notes: list[str] = field(default_factory=list)

    @property
    def on_device(self) -> int:
        return sum(n.bytes for n in self.needs or [] if n.where == "device")


@dataclass(frozen=True)
class Device:
    """What each process has: a GPU's memory, or on a CPU the machine's memory shared by its processes."""

    label: str
    bytes: int

    @classmethod
    def this_machine(cls, processes: int = 1) -> Device:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            return cls(f"GPU ({torch.cuda.get_device_name(0)}, {describe_bytes(total)})", total)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        share = f", shared by {processes} processes" if processes > 1 else ""
        return cls(f"CPU memory ({describe_bytes(total)}{share})", total // processes)


# ------------------------------------------------------------------------------------------- the parts


def weights(what: str, parameters: int, bytes_per_parameter: float, backend: Backend, trained: bool) -> Need:
    """A model's weights; ZeRO-3 shards trained ones over the processes and may keep them on the CPU."""
    size = int(parameters * bytes_per_parameter)
    if trained and _zero(backend) >= 3:
        where = "cpu" if backend.offload_params else "device"
        return Need(f"{what} weights (ZeRO-3: 1/{backend.world_size})", size // backend.world_size, where)
    return Need(f"{what} weights", size)


def adam_and_gradients(what: str, trainable: int, backend: Backend) -> list[Need]:
    """Float32 gradients and AdamW's two moments (and, in mixed precision, no extra master copy: trained
    weights already are float32), sharded by ZeRO 2 (gradients) and 1 (states), optimizer maybe offloaded."""
    zero, world = _zero(backend), backend.world_size
    gradients = trainable * 4 // (world if zero >= 2 else 1)
    states = trainable * 8 // (world if zero >= 1 else 1)
    return [
        Need(f"{what} gradients" + (f" (1/{world})" if zero >= 2 else ""), gradients),
        Need(
            f"{what} Adam states" + (f" (1/{world})" if zero >= 1 else ""),
            states,
            "cpu" if backend.offload_optimizer else "device",
        ),
    ]


def activations(
    shape: ModelShape, tokens: int, bytes_per_value: int, checkpointing: bool, padded_length: int | None = None
) -> Need:
    """What a training forward pass keeps for the backward pass, over ``tokens`` (batch × length).

    Per token and layer a Llama block keeps three hidden-sized tensors for each of its two norms (input,
    normalised, output), q, k, v and the attention output (sdpa and flash attention keep no score
    matrix), and the MLP's gate, up, activation and product; the final norm keeps three more. With
    padding (``padded_length``: the padded sequence length; None with flash attention, which takes none)
    sdpa also keeps each layer's mask row, and k and v repeated to every query head. With gradient
    checkpointing only each layer's input is kept, and one layer is recomputed at a time. Measured against
    autograd's saved tensors on tiny-llama and SmolLM2 (``bench/memory_plan.py``).
    """
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = 6 * shape.hidden + 2 * q + 2 * kv + 4 * shape.intermediate
    if padded_length:
        per_layer += padded_length + 2 * (q - kv)
    outside = 3 * shape.hidden
    if checkpointing:
        values = tokens * (shape.hidden * shape.layers + per_layer + outside)
        return Need(f"activations, {tokens} tokens (gradient checkpointing)", values * bytes_per_value)
    return Need(f"activations, {tokens} tokens", tokens * (per_layer * shape.layers + outside) * bytes_per_value)


def padding(attn_implementation: str, length: int) -> int | None:
    """The padded length :func:`activations` takes: None for flash attention, which works unpadded."""
    return None if attn_implementation == "flash_attention_2" else length


def logits(shape: ModelShape, tokens: int, copies: int = 3, what: str = "logits") -> Need:
    """Float32 logits over the vocabulary: the logits, their log-softmax and its gradient (``copies``)."""
    return Need(what, tokens * shape.vocab * 4 * copies)


def fused_lm_head(shape: ModelShape, tokens: int) -> Need:
    """TRL's fused output layer and loss (SFT, DPO, KTO in TRL 1.16): float32 tiles of at most 4096 tokens ×
    32768 vocabulary entries, about ten held at once in the backward pass (measured on a CPU)."""
    return Need("output layer and loss (fused, in tiles)", 10 * min(tokens, 4096) * min(shape.vocab, 32768) * 4)


def kv_cache(shape: ModelShape, sequences: int, length: int, bytes_per_value: int) -> Need:
    """Keys and values of every layer for ``sequences`` generated to ``length`` tokens."""
    values = 2 * shape.layers * shape.kv_heads * shape.head_dim * sequences * length
    return Need(f"KV cache ({sequences} × {length} tokens)", values * bytes_per_value)


def trainable(peft: PeftChoice | None, shape: ModelShape) -> int:
    """Parameters the stage's PEFT method trains (all, for a method that does not say)."""
    count = peft.method.trainable_parameters(peft.config, shape) if peft is not None else None
    return shape.parameters if count is None else count


def base_bytes(peft: PeftChoice | None) -> float:
    """Bytes per parameter of the base weights under the PEFT method: float32 unless it quantizes them."""
    quantized = peft.method.bytes_per_base_parameter(peft.config) if peft is not None else None
    return 4.0 if quantized is None else quantized


def _zero(backend: Backend) -> int:
    return backend.zero_stage if backend.kind == "deepspeed" else 0


# ------------------------------------------------------------------------------------------- the plan


def plan_recipe(recipe: Recipe, plugins: AlignPluginManager) -> tuple[ModelShape | None, list[StagePlan]]:
    """Every stage's needs, from the base model's shape; no plan (None) when its source cannot tell it."""
    architecture = plugins.get("model source", recipe.model.source).architecture(recipe.model.config)
    shape = ModelShape.from_architecture(architecture) if architecture is not None else None
    if shape is None:
        return None, [
            StagePlan(name, None, ["the model source does not tell the model's shape"]) for name in recipe.stages
        ]
    plans = []
    for name, spec in recipe.stages.items():
        needs = spec.stage.memory(spec.config, spec, recipe, plugins, shape)
        plans.append(StagePlan(name, None if needs is None else list(needs)))
    return shape, plans


def check_fits(plans: Sequence[StagePlan], device: Device) -> None:
    """Refuse a plan with a stage whose device needs exceed the device, saying what would make it fit."""
    too_big = [plan for plan in plans if plan.needs is not None and plan.on_device > device.bytes]
    if not too_big:
        return
    lines = [
        f"stage '{plan.stage}' needs about {describe_bytes(plan.on_device)} per process; "
        f"{device.label} has {describe_bytes(device.bytes)}"
        for plan in too_big
    ]
    largest = max(too_big[0].needs or [], key=lambda need: need.bytes)
    raise AlignError(
        "; ".join(lines) + f" (its largest need: {largest.what}, {describe_bytes(largest.bytes)})",
        hint="make it fit with peft: {method: lora}, gradient_checkpointing: true, a smaller batch_size or "
        "micro_batch_size (max_length), backend: {kind: deepspeed, zero_stage: 3} with more processes, "
        "offload_optimizer / offload_params, or offload_frozen_models; `align plan` shows every part. "
        "--no-memory-check runs it anyway",
    )


def format_plan(shape: ModelShape | None, plans: Sequence[StagePlan], device: Device, detail: bool = True) -> str:
    """The plan as text: per stage its total on the device against the device, and (``detail``) each need."""
    if shape is None:  # `align run` says nothing then; `align plan` says why
        return "memory plan: not estimated (the model source does not tell the model's shape)" if detail else ""
    model = f"{shape.parameters / 1e6:.1f}M-parameter model"
    estimated = [plan for plan in plans if plan.needs is not None]
    if not detail and estimated and all(plan.on_device <= device.bytes for plan in estimated):
        largest = max(estimated, key=lambda plan: plan.on_device)
        return (
            f"memory plan: every stage fits {device.label}, {model} (the most: {largest.stage}, "
            f"{describe_bytes(largest.on_device)}, {largest.on_device / device.bytes:.1%}; `align plan` for details)"
        )
    lines = [f"memory plan, per process, against {device.label}: {model}"]
    width = max(len(plan.stage) for plan in plans)
    for plan in plans:
        if plan.needs is None:
            lines.append(f"  {plan.stage:<{width}}  not estimated by its stage plugin")
            continue
        share = plan.on_device / device.bytes
        verdict = "fits" if share <= 1 else "DOES NOT FIT"
        lines.append(f"  {plan.stage:<{width}}  {describe_bytes(plan.on_device):>10}  {share:6.1%}  {verdict}")
        if detail:
            for need in plan.needs:
                where = "" if need.where == "device" else f"  ({need.where}, not counted)"
                lines.append(f"  {'':<{width}}    {need.what:<44} {describe_bytes(need.bytes):>10}{where}")
    return "\n".join(lines)


def describe_bytes(count: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def parse_bytes(text: str) -> int:
    """``80GB``, ``80 GiB``, ``512MiB``, ``1.5T`` → bytes (binary units either way: memory is sold so)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": GiB, "t": 1 << 40}
    cleaned = text.strip().lower().replace(" ", "").removesuffix("b").removesuffix("i")
    number, unit = cleaned.rstrip("kmgt"), cleaned[len(cleaned.rstrip("kmgt")) :]
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise AlignError(f"memory size '{text}' is not a size", hint="write it like 80GB, 24GiB or 512MB") from None
