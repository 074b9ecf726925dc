"""Loading the models stages hand to each other, and exporting them.

A stage trained with a PEFT adapter publishes the adapter (``adapter_config.json`` and its weights,
which peft loads), not a merged copy. When a later stage takes it as input, :func:`load_model` loads the
adapter's base (itself perhaps an adapter: chains are followed) and merges the adapter into it, so
adapters *stack by merging*: each stage trains on the merged result of the stages before it.
``align export --merge`` writes that merged model as a plain checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from align.artifacts import MANIFEST
from align.errors import AlignError

__all__ = ["Kind", "adapter_base", "export", "is_adapter", "load_model"]

ADAPTER_CONFIG = "adapter_config.json"

Kind = Literal["causal", "reward"]


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise AlignError(f"{path}: the adapter does not say which model it adapts (base_model_name_or_path)")
    return str(base)


def load_model(path: str | Path, kind: Kind = "causal", **kwargs: Any) -> Any:
    """A causal LM (``kind="causal"``) or a one-output sequence classifier (``"reward"``), adapters merged.

    :param kwargs: passed to ``from_pretrained`` (``dtype``, ``quantization_config``, …).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if is_adapter(path):
        from peft import PeftModel

        adapts: Kind = "reward" if _task(Path(path)) == "SEQ_CLS" else "causal"
        base = load_model(adapter_base(path), adapts, **kwargs)
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        if kind == "reward" and adapts == "causal":
            merged = _as_reward_model(merged, path)
        # An adapter trained on top of this model must name this folder as its base, not the one below it.
        merged.config._name_or_path = merged.name_or_path = str(path)
        return merged
    if kind == "reward":
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # a new score head is expected, not worth a warning
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
        finally:
            transformers_logging.set_verbosity(verbosity)
        return _with_pad_token(model, path)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _as_reward_model(causal: Any, path: str | Path) -> Any:
    """A one-output sequence classifier with the body of a (merged) causal LM and a new score head."""
    from transformers import AutoModelForSequenceClassification

    config = causal.config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    body = {k: v for k, v in causal.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not key.startswith("score.") for key in missing):
        raise AlignError(f"{path}: cannot turn this model into a reward model ({unexpected or missing})")
    return _with_pad_token(model, path)


def _with_pad_token(model: Any, path: str | Path) -> Any:
    if model.config.pad_token_id is None:  # sequence classifiers find each row's last token by padding
        from transformers import AutoTokenizer

        model.config.pad_token_id = AutoTokenizer.from_pretrained(str(path)).pad_token_id
    return model


def export(source: Path, target: Path, merge: bool, force: bool = False) -> str:
    """Write a stage's output to ``target`` as a standalone checkpoint; returns what was written.

    Only an output that the last run of its run folder vouches for (:func:`align.runner.why_unvouched`):
    a stage whose rerun failed leaves its previous output in place, which must not pass for the new one.

    :param force: export it anyway, with a warning saying why it is not vouched for.
    :raises AlignError: not a published output, not vouched for (without ``force``), or ``target`` in use.
    """
    from align.runner import why_unvouched

    if not source.is_dir() or not (source / MANIFEST).is_file():
        raise AlignError(f"{source} is not a published stage output (it has no {MANIFEST})")
    if target.exists() and any(target.iterdir()):
        raise AlignError(f"{target} exists and is not empty; choose a new folder")
    reason = why_unvouched(source)
    if reason is not None and not force:
        raise AlignError(
            f"not exporting {source}: {reason}",
            hint=f"run its recipe again (align run RECIPE --run-dir {source.parent}) to rebuild it, "
            "or pass --force to export it anyway",
        )
    if reason is not None:
        logging.getLogger("align").warning("warning: exporting %s although %s (--force)", source, reason)
    if not (merge and is_adapter(source)):
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(MANIFEST), dirs_exist_ok=True)
        return "adapter" if is_adapter(source) else "checkpoint"
    from transformers import AutoTokenizer

    kind: Kind = "reward" if _task(source) == "SEQ_CLS" else "causal"
    load_model(source, kind).save_pretrained(target)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target)
    return "merged checkpoint"


def _task(path: Path) -> str | None:
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config.get("task_type")
