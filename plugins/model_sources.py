"""Built-in model sources: ``path`` (a local folder or hub id) and ``tiny-llama`` (built offline).

``tiny-llama`` exists so that tests, demos and the quickstart run anywhere without a download: a
two-layer Llama with a byte-level BPE tokenizer trained on the spot and a ChatML chat template. Its head
dimension is 64 because vLLM's CPU attention accepts that and not smaller ones.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import AlignError, hookimpl
from align.artifacts import fingerprint, hash_file
from align.model_source import ModelSource, build_once
from align.schema import MAX_SEED, setting

# ChatML, with {% generation %} around assistant replies so that trainers that rely on it can mask the
# rest, tool descriptions in the system turn and tool calls as <tool_call> blocks (as Qwen2.5 does).
CHATML = (
    "{%- if tools or messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}"
    "{%- if tools %}"
    "{%- if messages[0]['role'] == 'system' %}{{- '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools, one <tool_call> block each:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>\\n' + (call['function'] | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Bump when the builder's output changes, so that cached tiny models are rebuilt.
BUILDER_VERSION = 2

# Words for the tokenizer's training text: enough everyday English that demo data tokenizes into
# words and sub-words rather than single bytes.
_WORDS = """
the a an and or but if then so because of to in on at by for with from about as into over after
before is are was were be been being have has had do does did will would can could should may might
must not no yes this that these those it its they them their we us our you your he she him her his i
me my what which who whom whose when where why how all any both each few more most other some such
only own same than too very just also now here there again once up down out off under good great bad
best worst better worse happy sad love hate like enjoy boring exciting wonderful terrible awful
amazing excellent poor fine nice beautiful ugly brilliant dull fun funny lovely pleasant horrible
fantastic delightful movie film story book song meal food day trip hotel service product music show
game plot actor ending write review short long sentence positive negative reply answer question
please thanks thank help tell explain describe give list make word words number one two three four
five six seven eight nine ten time year people way thing man woman child world life hand part place
case week company system program work home water room mother area money point night city house
friend car dog cat tree sun sky rain user assistant system really quite rather almost always never
often sometimes today tomorrow yesterday well much many little
""".split()


@dataclass
class PathConfig:
    path: str = setting(help="A local model folder, or a Hugging Face hub id such as `Qwen/Qwen2.5-0.5B`.")
    revision: str | None = setting(None, help="A hub revision (branch, tag or commit); ignored for folders.")

    def __post_init__(self) -> None:
        folder = Path(self.path).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise AlignError(f"model folder {folder} has no config.json: it is not a Hugging Face checkpoint")
        elif not _looks_like_hub_id(self.path):
            raise AlignError(
                f"model '{self.path}' is not a model source, a local folder, or a hub id",
                hint="`align plugins` lists the model sources (e.g. tiny-llama); folders must exist",
            )


class PathSource(ModelSource):
    """A model that already exists: a local folder or a hub id passed to ``from_pretrained``."""

    name = "path"
    Config = PathConfig

    def fingerprint(self, config: PathConfig) -> str:
        folder = Path(config.path).expanduser()
        if not folder.is_dir():
            return fingerprint({"hub": config.path, "revision": config.revision or "main"})
        # Small files by content, weights by size and time: hashing gigabytes per run is not worth it.
        parts = {}
        for file in sorted(folder.iterdir()):
            if file.is_file():
                stat = file.stat()
                small = stat.st_size < (1 << 20)
                parts[file.name] = hash_file(file) if small else [stat.st_size, stat.st_mtime_ns]
        return fingerprint(parts)

    def materialize(self, config: PathConfig, cache_dir: Path) -> str:
        folder = Path(config.path).expanduser()
        return str(folder.resolve()) if folder.is_dir() else config.path

    def architecture(self, config: PathConfig) -> dict[str, Any] | None:
        folder = Path(config.path).expanduser()
        if folder.is_dir():
            path: str | None = str(folder / "config.json")
        else:  # a hub model is read from the local hub cache, never downloaded for a check
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(config.path, "config.json", revision=config.revision)
            path = found if isinstance(found, str) else None
        if path is None:
            return None
        try:
            architecture = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # loading the model will say what is wrong with it
        return architecture if isinstance(architecture, dict) else None


@dataclass
class TinyLlamaConfig:
    # At least 300: the 256 bytes of byte-level BPE, the special tokens and some merges.
    vocab_size: int = setting(1024, help="Tokenizer vocabulary size (byte-level BPE, trained offline).", minimum=300)
    hidden_size: int = setting(128, help="Model width. hidden_size / num_heads is the head dimension.", minimum=1)
    num_layers: int = setting(2, help="Number of transformer layers.", minimum=1)
    num_heads: int = setting(
        2, help="Attention heads; vLLM on CPU has kernels for head dimensions 32, 64, 80, …", minimum=1
    )
    intermediate_size: int = setting(256, help="Width of the MLP.", minimum=1)
    max_position_embeddings: int = setting(1024, help="Longest sequence the model accepts.", minimum=1)
    seed: int = setting(0, help="Seed of the random weights.", minimum=0, maximum=MAX_SEED)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise AlignError(f"model: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class TinyLlamaSource(ModelSource):
    """A tiny random Llama and tokenizer, built offline in about a second and cached by its settings."""

    name = "tiny-llama"
    fallback = True  # offline and quick: what `align data preview` shows a dataset with by default
    Config = TinyLlamaConfig

    def fingerprint(self, config: TinyLlamaConfig) -> str:
        return fingerprint({"tiny-llama": vars(config), "builder": BUILDER_VERSION})

    def architecture(self, config: TinyLlamaConfig) -> dict[str, Any]:
        return {
            "model_type": "llama",
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_heads,
            "head_dim": config.head_dim,
            "num_hidden_layers": config.num_layers,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": True,
        }

    def materialize(self, config: TinyLlamaConfig, cache_dir: Path) -> str:
        folder = cache_dir / f"tiny-llama-{self.fingerprint(config)[:16]}"
        return build_once(folder, lambda tmp: build_tiny_llama(config, tmp))


def build_tiny_llama(config: TinyLlamaConfig, folder: Path) -> None:
    """Write a tiny Llama checkpoint with tokenizer and chat template into ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(config.seed), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    tokenizer.chat_template = CHATML

    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(model_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "align-tiny-llama.json").write_text(json.dumps(vars(config), indent=2), encoding="utf-8")


def _training_text(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(4000)]
    lines += [w.capitalize() + rng.choice(".,!?:;") for w in _WORDS]
    lines += ["0123456789 +-*/=()[]{}<>\"'#%&@_\n\t" * 4]
    return lines


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and " " not in text


@hookimpl
def align_register_model_sources() -> list[ModelSource]:
    return [PathSource(), TinyLlamaSource()]
