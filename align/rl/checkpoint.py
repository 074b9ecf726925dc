"""RL checkpoints: written whole or not at all, read back only when complete and of this format.

A checkpoint of step N is the folder ``step-N`` holding accelerate's state (the trained weights, optimizer
and registered objects such as the scheduler), one ``align_process_R.pt`` per process (its prompt
sampler's place and its random generators: every process draws its own prompts and samples) and, written
last, ``align_rl_state.json`` (:class:`RLState`: the format version, the step, the process count, the run's
history, and every file with its size). It is written into ``.partial-step-N`` and renamed when complete;
older checkpoints are deleted only then. :meth:`Checkpoints.latest` skips a partial folder or one whose
state file is missing, of another format or disagrees with the files, for the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.backend import is_main_process

__all__ = ["CHECKPOINT_FORMAT", "Checkpoints", "RLState"]

#: The version of the layout above; a checkpoint of another version is skipped, not misread.
CHECKPOINT_FORMAT = 2
STATE_FILE = "align_rl_state.json"
PARTIAL = ".partial-"


@dataclass
class RLState:
    """What a resumed run needs beyond weights and optimizer, shared by every process."""

    step: int
    processes: int
    kl_coef: float
    #: Figures the stage's final metrics are made of (the score before training, say).
    before: dict[str, float] = field(default_factory=dict)
    #: Per-step figures kept for the final metrics (``reward`` → one value per step so far).
    history: dict[str, list[float]] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    format: int = CHECKPOINT_FORMAT


class Checkpoints:
    """The checkpoints folder of one stage. ``accelerator`` is the stage's; ``log`` takes a message."""

    def __init__(self, folder: Path, accelerator: Any, log: Any) -> None:
        self.folder, self.accelerator, self.log = folder, accelerator, log

    def save(self, state: RLState, process_state: dict[str, Any]) -> Path:
        """Write ``step-N`` so that it is complete or absent, then delete the checkpoints before it.

        Every process calls this with its own ``process_state`` (its sampler's state); the random
        generators are added here.
        """
        import torch

        accelerator = self.accelerator
        final = self.folder / f"step-{state.step}"
        partial = self.folder / f"{PARTIAL}step-{state.step}"
        if is_main_process():  # rank 0, or each machine's first one when it keeps its own run folder
            shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing it
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        # accelerate saves random states too, but its load_state only logs (at info) when it cannot
        # restore them: these are listed in the state file and checked.
        torch.save({**process_state, **_random_state()}, partial / f"align_process_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()  # every process's files exist before the state file lists them
        if is_main_process():
            state.files = {
                str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()
            }
            (partial / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)  # an incomplete step-N that the resume skipped
            os.replace(partial, final)
            for other in self.folder.iterdir():  # older checkpoints, and incomplete ones skipped
                if other != final:
                    shutil.rmtree(other, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def complete(self) -> list[tuple[Path, RLState]]:
        """The complete checkpoints, newest first; incomplete ones are logged and skipped."""
        found = []
        for folder in self.folder.glob("*"):
            number = folder.name.removeprefix("step-")
            if folder.name.startswith(PARTIAL):
                self.log(f"  skipping {folder}: the run stopped while writing it")
            elif folder.is_dir() and number.isdigit():
                found.append((int(number), folder))
        complete = []
        for step, folder in sorted(found, reverse=True):
            state, problem = _read_state(folder, step)
            if state is None:
                self.log(f"  skipping {folder}: {problem}")
            else:
                complete.append((folder, state))
        return complete

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore accelerate's state and this process's random generators; returns its ``process_state``."""
        import torch

        self.accelerator.load_state(str(folder))
        saved: dict[str, Any] = torch.load(
            folder / f"align_process_{self.accelerator.process_index}.pt", weights_only=True
        )
        random.setstate(saved.pop("python"))
        torch.random.set_rng_state(saved.pop("torch"))
        cuda = saved.pop("cuda", None)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        return saved

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _random_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _read_state(folder: Path, step: int) -> tuple[RLState | None, str]:
    """A checkpoint's state, or None and why it cannot be resumed from (a kill while writing it, say)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None, f"it has no {STATE_FILE} (the run stopped while writing it)"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"its {STATE_FILE} cannot be read ({error})"
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != CHECKPOINT_FORMAT:
        return None, f"its checkpoint format is {found!r} and this align reads format {CHECKPOINT_FORMAT}"
    try:
        state = RLState(**raw)
    except TypeError as error:
        return None, f"its {STATE_FILE} does not hold an RL state ({error})"
    if state.step != step:
        return None, f"its {STATE_FILE} is for step {state.step}, not {step}"
    for name, size in state.files.items():
        file = folder / name
        if not file.is_file():
            return None, f"{name} is missing"
        if file.stat().st_size != size:
            return None, f"{name} has {file.stat().st_size} bytes, not the {size} it was written with"
    return state, ""
