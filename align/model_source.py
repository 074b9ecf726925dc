"""Model sources: how a recipe's ``model:`` becomes a folder that ``from_pretrained`` loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["ModelSource", "build_once"]


class ModelSource:
    """Base class for model-source plugins (registered with ``align_register_model_sources``).

    * ``name``: what a recipe writes (``model: tiny-llama`` or ``model: {source: tiny-llama, ...}``).
    * ``Config``: a dataclass of the source's settings.
    * ``fallback``: serves where no model is named (``align data preview`` without ``--model``); it must
      work offline with its default settings.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    fallback: ClassVar[bool] = False

    def fingerprint(self, config: Any) -> str:
        """A cheap identity of the model this config gives; it keys caches and downstream fingerprints."""
        raise NotImplementedError

    def materialize(self, config: Any, cache_dir: Path) -> str:
        """Make the model available and return a local folder or hub id for ``from_pretrained``.

        :param cache_dir: a folder this source may keep built models in across runs.
        """
        raise NotImplementedError

    def architecture(self, config: Any) -> Mapping[str, Any] | None:
        """The model's ``config.json`` values, when they can be known without building or downloading it.

        Recipe checks read them (a rollout engine refuses a head dimension it has no kernel for) before any
        stage trains; ``None``, the default, skips those checks.
        """
        return None


def build_once(folder: Path, build: Callable[[Path], None]) -> str:
    """``folder``, built by ``build(tmp)`` in a temporary folder beside it and renamed into place, unless it
    was built before (it holds a ``config.json``). A run killed mid-build leaves no half-built model, and
    two runs building at once both end with the one that was renamed first."""
    if (folder / "config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a race with another process: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
