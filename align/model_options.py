"""How a stage loads its models: attention kernel, gradient checkpointing, the dtype of frozen models,
and whether frozen models wait on the CPU between uses.

Every built-in stage that loads a model honours these (the TRL stages, the online-RL loop, evaluation);
a stage's settings class inherits :class:`ModelOptions` to offer them. They decide memory, not results:
a run with gradient checkpointing computes what one without does, with less memory and more time.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from align.errors import AlignError
from align.schema import setting

if TYPE_CHECKING:
    from align.backend import Backend

__all__ = [
    "Attention",
    "ModelOptions",
    "attention_setting",
    "check_attention",
    "check_liger",
    "frozen_dtype",
    "loading_kwargs",
    "offload_setting",
    "on_device",
]

Attention = Literal["sdpa", "eager", "flash_attention_2"]


def attention_setting() -> Any:
    return setting(
        "sdpa",
        help="Attention kernel: sdpa (PyTorch's, any device), eager, or flash_attention_2 (a GPU and the "
        "flash-attn package).",
    )


def offload_setting() -> Any:
    return setting(
        False,
        help="Keep the reference and reward models on the CPU between uses, moving them to the GPU only to "
        "score a batch: their GPU memory is free while the policy trains.",
    )


@dataclass(kw_only=True)  # keyword-only: a subclass's settings without defaults (`data`) may follow
class ModelOptions:
    """How a training stage loads the model it trains; its settings class inherits these."""

    attn_implementation: Attention = attention_setting()
    gradient_checkpointing: bool = setting(
        False,
        help="Recompute activations in the backward pass instead of keeping them: much less memory for "
        "about a third more compute.",
    )


def check_attention(attn_implementation: str, key: str) -> None:
    """Refuse, when the recipe loads, an attention kernel this machine cannot run."""
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise AlignError(
            f"'{key}.attn_implementation' is flash_attention_2, but the flash-attn package is not installed",
            hint="on a GPU: pip install flash-attn --no-build-isolation; or use attn_implementation: sdpa",
        )
    import torch

    if not torch.cuda.is_available():
        raise AlignError(
            f"'{key}.attn_implementation' is flash_attention_2, which needs a GPU; this machine has none",
            hint="use attn_implementation: sdpa",
        )


def check_liger(key: str) -> None:
    """Refuse, when the recipe loads, Liger kernels where they cannot run: they are Triton GPU kernels."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise AlignError(
            f"'{key}.liger_kernel' is true, but the liger-kernel package is not installed",
            hint="pip install -e '.[liger]' (on a GPU), or leave liger_kernel false",
        )
    import torch

    if not torch.cuda.is_available():
        raise AlignError(
            f"'{key}.liger_kernel' needs a GPU (Liger's kernels are Triton GPU kernels); this machine has none"
        )


def frozen_dtype(backend: Backend) -> Any:
    """The dtype of models that are not trained (reference, reward, evaluated): the backend's precision.

    Trained models load in float32 whatever the precision: mixed precision computes in bf16/fp16 and keeps
    float32 master weights.
    """
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[backend.precision]


def loading_kwargs(attn_implementation: str, backend: Backend | None = None) -> dict[str, Any]:
    """``from_pretrained`` arguments; with ``backend``, for a frozen model (in the backend's precision)."""
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if backend is not None:
        kwargs["dtype"] = frozen_dtype(backend)
    return kwargs


@contextlib.contextmanager
def on_device(models: Iterable[Any], device: Any, offload: bool) -> Iterator[None]:
    """Within the block, ``models`` are on ``device``; with ``offload`` they go back to the CPU after it."""
    models = [m for m in models if m is not None]
    if offload:
        for model in models:
            model.to(device)
    try:
        yield
    finally:
        if offload:
            for model in models:
                model.to("cpu")
