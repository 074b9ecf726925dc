"""Quick stages and a model source without torch, for testing the runner and the recipe machinery.

Loaded by tests through --plugins-dir, the way a user's local plugin file would be.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from align import AlignError, hookimpl
from align.artifacts import fingerprint
from align.model_source import ModelSource
from align.schema import setting
from align.stage import Input, Stage, StageContext


@dataclass
class FakeModelConfig:
    vocab: str = setting("abc", help="The content of the fake tokenizer file.")


class FakeSource(ModelSource):
    """A 'model' that is a folder with a config and a tokenizer file."""

    name = "fake-model"
    Config = FakeModelConfig

    def fingerprint(self, config: FakeModelConfig) -> str:
        return fingerprint({"fake": config.vocab})

    def materialize(self, config: FakeModelConfig, cache_dir: Path) -> str:
        folder = cache_dir / f"fake-{config.vocab}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer.json").write_text(json.dumps({"vocab": config.vocab}))
        return str(folder)


@dataclass
class CountSettings:
    data: str | None = setting(None, help="A file whose lines are counted.")
    value: float = setting(1.0, help="Added to the input's value.")
    fail: str | None = setting(None, help="`align` raises an AlignError, `bug` a ValueError, after writing.")
    learning_rate: float = setting(1e-3, help="Unused; there to test float parsing.")
    mode: str = setting("plain", help="Unused; free text.")
    sleep: float = setting(0.0, help="Seconds to wait before finishing, to be killed meanwhile.")


class CountStage(Stage):
    """Writes value.json = input value + `value`, and logs each run into runs.log beside the run."""

    name = "count"
    Config = CountSettings
    inputs = {"policy": Input("what to add to", default=("base",))}

    def data_files(self, config: CountSettings, recipe: object) -> list[Path]:
        return [Path(config.data)] if config.data else []

    def run(self, context: StageContext) -> dict[str, float]:
        source = Path(context.inputs["policy"].path)
        before = json.loads((source / "value.json").read_text())["value"] if (source / "value.json").exists() else 0
        value = before + context.config.value
        with (context.run_dir / "runs.log").open("a") as log:
            log.write(f"{context.name}\n")
        for name in os.listdir(source):  # carry the tokenizer along, as a real stage would
            if name.startswith("tokenizer"):
                (context.output_dir / name).write_text((source / name).read_text())
        (context.output_dir / "value.json").write_text(json.dumps({"value": value}))
        if context.config.sleep:
            (context.run_dir / "sleeping").write_text(context.name)
            time.sleep(context.config.sleep)
        if context.config.fail == "align":
            raise AlignError("the fake stage was told to fail")
        if context.config.fail == "bug":
            raise ValueError("a bug in the fake stage")
        context.log_metrics({"value": value}, step=1)
        return {"value": value}


@dataclass
class PairSettings:
    pass


class PairStage(Stage):
    """Takes two inputs, to test tokenizer agreement and multi-input references."""

    name = "pair"
    Config = PairSettings
    inputs = {
        "policy": Input("first model", default=("base",)),
        "reward_model": Input("second model", default=()),
    }

    def run(self, context: StageContext) -> dict[str, float]:
        (context.output_dir / "done").write_text("yes")
        return {}


@hookimpl
def align_register_stages() -> list[Stage]:
    return [CountStage(), PairStage()]


@hookimpl
def align_register_model_sources() -> list[ModelSource]:
    return [FakeSource()]
