"""align: a plugin-based RLHF pipeline.

Importing this package is cheap on purpose (no torch, no transformers): the CLI and plugin discovery
import it before they know whether any training will happen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import pluggy

from align.errors import AlignError

try:
    __version__ = version("align")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Marks a function as the implementation of an align hook. A plugin module does
#: ``from align import hookimpl`` and decorates functions named after the specs in
#: :mod:`align.hookspecs`.
hookimpl = pluggy.HookimplMarker("align")

if TYPE_CHECKING:
    from align.runner import RunSummary

__all__ = ["AlignError", "__version__", "hookimpl", "run"]


def run(
    recipe: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    run_dir: str | os.PathLike[str] | None = None,
    force: Sequence[str] = (),
    plugins: Sequence[str] = (),
    verbose: bool = False,
) -> RunSummary:
    """Run a recipe in this process, as ``align run`` does, and return its summary (``summary.json``).

    For notebooks and scripts::

        summary = align.run("examples/quickstart.yaml", {"stages.sft.max_steps": 50})
        summary.status                          # "done", or "failed" with summary.error
        summary.stages["rm"].metrics["eval_accuracy"]

    :param recipe: a recipe file, or the recipe itself as a mapping (relative paths in it are read from
        the current folder).
    :param overrides: ``["stages.sft.epochs=2"]`` as on the command line, or ``{"stages.sft.epochs": 2}``.
    :param run_dir: where outputs go (default: the recipe's ``run_dir``, else ``runs/<recipe name>``).
    :param force: stages to rerun even when their output is up to date.
    :param plugins: modules to load as plugins, as ``-p`` (``no:NAME`` blocks one).
    :param verbose: also show what libraries print (it always goes to ``RUN/logs/run.log``).
    :raises AlignError: the recipe, overrides or plugins are wrong, the memory plan says a stage cannot fit,
        or the recipe asks for several processes (run those with ``align run``). A stage that fails does not
        raise: the summary says which, and why.
    """
    import json
    from pathlib import Path

    from align.backend import must_launch
    from align.memory import Device, check_fits, plan_recipe
    from align.plugin_manager import get_plugin_manager
    from align.recipe import apply_overrides, load_recipe, validate_recipe
    from align.runner import default_run_dir, run_recipe

    pm = get_plugin_manager(list(plugins))
    if isinstance(overrides, Mapping):
        overrides = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    elif isinstance(overrides, str):
        raise AlignError(f"overrides must be a list or a mapping, not the string {overrides!r}")
    if isinstance(recipe, Mapping):
        raw = json.loads(json.dumps(recipe))  # a deep copy of plain data; overrides must not change the caller's
        apply_overrides(raw, overrides)
        loaded = validate_recipe(raw, pm)
    else:
        loaded = load_recipe(Path(recipe), overrides, pm)
    if must_launch(loaded.backend):
        raise AlignError(
            f"align.run runs in this process, and the recipe's backend asks for {loaded.backend.world_size}",
            hint="run it with `align run RECIPE` (in a notebook: `!align run RECIPE`), which starts them",
        )
    _, stage_plans = plan_recipe(loaded, pm)
    check_fits(stage_plans, Device.this_machine(loaded.backend.num_processes))
    folder = Path(run_dir) if run_dir is not None else default_run_dir(loaded)
    return run_recipe(loaded, pm, folder, force=force, verbose=verbose)
