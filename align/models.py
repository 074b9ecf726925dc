"""Loading the models stages hand to each other, and exporting them.

A stage trained with a PEFT adapter publishes the adapter (``adapter_config.json`` and its weights,
which peft loads), not a merged copy. When a later stage takes it as input, :func:`load_model` loads the
adapter's base (itself perhaps an adapter: chains are followed) and merges the adapter into it, so
adapters *stack by merging*: each stage trains on the merged result of the stages before it.
``align export --merge`` writes that merged model as a plain checkpoint.

Outputs travel: a stacked adapter finds its base wherever its run folder is (see :func:`adapter_base`),
so a run folder can be used from any working folder, and moved or copied whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path, PurePath
from typing import Any, Literal

from align.artifacts import MANIFEST, read_manifest
from align.errors import AlignError

__all__ = ["Kind", "adapter_base", "export", "is_adapter", "load_model"]

ADAPTER_CONFIG = "adapter_config.json"

Kind = Literal["causal", "reward"]


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The model the adapter at ``path`` adapts: a local folder or a hub id, for :func:`load_model`.

    peft records the base as the path the base was loaded from (``base_model_name_or_path``), which is
    only right while the run folder stays where it was. So a base that is another stage's output of the
    adapter's run is looked up beside the adapter instead, wherever the run folder now is; the adapter's
    manifest names that stage and the very output it was trained on, so a stage rebuilt since is never
    taken for it. A relative base (``../sft``) is resolved against the adapter's folder, not the working
    folder. A hub id, or a model outside the run (align's cache, a local folder), is returned as recorded.
    """
    folder = Path(path)
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise AlignError(f"{path}: the adapter does not say which model it adapts (base_model_name_or_path)")
    sibling = _same_run_base(folder, str(base))
    if sibling is not None:
        return str(sibling)
    if _is_relative_path(str(base)):
        return os.path.normpath(folder / str(base))
    return str(base)


def _same_run_base(folder: Path, base: str) -> Path | None:
    """The output beside ``folder`` that the adapter was trained on, if its recorded base is one."""
    manifest = read_manifest(folder)
    if not manifest:
        return None  # not a published output (an exported adapter): no run to look in
    stage = PurePath(base).name  # a run names each stage's output folder after the stage
    for used in manifest.get("inputs", {}).values():
        for artifact in used if isinstance(used, list) else [used]:
            if not isinstance(artifact, dict) or artifact.get("producer") != stage:
                continue
            candidate = folder.parent / stage
            published = read_manifest(candidate)
            # The artifact id, not the name: a stage rerun since holds another model under the same name.
            if published and published.get("artifact_id") == artifact.get("id"):
                return candidate
    return None


def _is_relative_path(base: str) -> bool:
    # A hub id (`org/name`) never starts with a dot, so `./x` and `../x` can only be folders.
    return base in (".", "..") or base.startswith(("./", "../"))


def _is_local_path(base: str) -> bool:
    return os.path.isabs(base) or _is_relative_path(base) or base.startswith("~")


def load_model(path: str | Path, kind: Kind = "causal", **kwargs: Any) -> Any:
    """A causal LM (``kind="causal"``) or a one-output sequence classifier (``"reward"``), adapters merged.

    :param kwargs: passed to ``from_pretrained`` (``dtype``, ``quantization_config``, …).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if is_adapter(path):
        from peft import PeftModel

        adapts: Kind = "reward" if _task(Path(path)) == "SEQ_CLS" else "causal"
        base_path = adapter_base(path)
        if _is_local_path(base_path) and not Path(base_path).expanduser().is_dir():
            raise AlignError(
                f"{path}: the model this adapter adapts, {base_path}, does not exist",
                hint="an adapter stacked on another stage's output finds it in its own run folder: move or copy "
                "the run folder whole, or write a standalone model with `align export RUN_DIR/STAGE OUT --merge`",
            )
        base = load_model(base_path, adapts, **kwargs)
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        if kind == "reward" and adapts == "causal":
            merged = _as_reward_model(merged, path)
        # An adapter trained on top of this model must name this folder as its base, not the one below it.
        return _named(merged, path)
    if kind == "reward":
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # a new score head is expected, not worth a warning
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
        finally:
            transformers_logging.set_verbosity(verbosity)
        return _named(_with_pad_token(model, path), path)
    return _named(AutoModelForCausalLM.from_pretrained(str(path), **kwargs), path)


def _named(model: Any, path: str | Path) -> Any:
    """``model``, named by the absolute path of its folder (a hub id stays as it is).

    peft records a model's name as the base of the adapter trained on it. The path as given may be
    relative to the working folder (``--run-dir runs/x``), which is no path at all from anywhere else.
    """
    if Path(path).is_dir():
        model.config._name_or_path = model.name_or_path = os.path.abspath(path)
    return model


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
        if is_adapter(source):
            _record_base(target, adapter_base(source))
        return "adapter" if is_adapter(source) else "checkpoint"
    from transformers import AutoTokenizer

    kind: Kind = "reward" if _task(source) == "SEQ_CLS" else "causal"
    load_model(source, kind).save_pretrained(target)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target)
    return "merged checkpoint"


def _record_base(adapter: Path, base: str) -> None:
    """Name ``base`` in the copied adapter's config by a path that holds outside its run folder.

    The copy has no manifest and no run folder around it, so a base found beside the original (another
    stage's output) must be named by its absolute path; one resolved from a relative path likewise.
    """
    path = adapter / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    if _is_local_path(base):
        base = os.path.abspath(Path(base).expanduser())
    if config.get("base_model_name_or_path") != base:
        config["base_model_name_or_path"] = base
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _task(path: Path) -> str | None:
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config.get("task_type")
