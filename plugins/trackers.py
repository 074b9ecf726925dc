"""align's own trackers: TensorBoard (the default), Weights & Biases and MLflow.

Where each writes a stage's run (see :mod:`align.trackers` for what every tracker gets):

* ``tensorboard``: ``RUN/tensorboard/<stage>``; ``tensorboard --logdir RUN/tensorboard`` shows them all.
* ``wandb``: a run in project ``$WANDB_PROJECT`` (default ``align``), grouped by run folder; its files in
  ``RUN/wandb`` (``$WANDB_DIR/wandb`` when set). With ``WANDB_MODE=offline`` nothing leaves the machine
  until ``wandb sync``.
* ``mlflow``: ``$MLFLOW_TRACKING_URI``, else a file store in ``RUN/mlruns``; experiment
  ``$MLFLOW_EXPERIMENT_NAME``, else the run folder's name. The recipe is also an artifact, ``recipe.yaml``
  (MLflow parameters are short strings).

wandb and mlflow are align's ``trackers`` extra: ``pip install -e '.[trackers]'``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align import AlignError, hookimpl
from align.trackers import ExperimentTracker, RunIdentity, RunStatus, TrackerRun, recipe_yaml, stage_recipe

if TYPE_CHECKING:
    from align.stage import StageContext

#: The longest parameter value every MLflow server takes (a local store takes 6000); longer values are
#: in the recipe.yaml artifact only.
MLFLOW_PARAM_LENGTH = 500


# ---------------------------------------------------------------------------------------------- TensorBoard


class TensorBoard(ExperimentTracker):
    """TensorBoard event files in ``RUN/tensorboard/<stage>``: align's default, a dependency of align that
    writes nothing outside the run folder."""

    name = "tensorboard"
    fallback = True

    def open(self, context: StageContext, identity: RunIdentity) -> TrackerRun:
        return _TensorBoardRun(context.run_dir / "tensorboard" / context.name, identity, recipe_yaml(context))


class _TensorBoardRun(TrackerRun):
    """TensorBoard's own event writer, not torch's: a stage without torch (a third party's) need not load it."""

    def __init__(self, folder: Path, identity: RunIdentity, recipe: str) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(folder))
        # Text, not hparams: TensorBoard's hparams need a run of their own beside the stage's.
        self._text("run_name", identity.name)
        self._text("fingerprint", identity.fingerprint)
        self._text("recipe", "    " + recipe.replace("\n", "\n    "))  # indented: code in Markdown
        self.writer.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=name, simple_value=value) for name, value in metrics.items()]
        self._write(Summary(value=values), step)
        self.writer.flush()

    def close(self, status: RunStatus) -> None:
        self.writer.close()

    def _text(self, tag: str, text: str) -> None:
        """A string for TensorBoard's text plugin (its TEXT tab)."""
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._write(text_pb(tag, text), 0)

    def _write(self, summary: Any, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))


# ---------------------------------------------------------------------------------------------- W&B


class Wandb(ExperimentTracker):
    """A Weights & Biases run per stage, grouped by run folder; ``WANDB_MODE=offline`` keeps it local."""

    name = "wandb"
    distribution = "wandb"

    def open(self, context: StageContext, identity: RunIdentity) -> TrackerRun:
        import wandb

        folder = Path(os.environ.get("WANDB_DIR") or context.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "align",
                name=identity.name,
                group=identity.group,
                job_type=identity.plugin,
                dir=str(folder),
                config={**identity.params(), "recipe": context.recipe.to_plain()},
                reinit="create_new",  # its own run: never log into, or finish, one the user's code holds
            )
        except Exception as error:  # wandb's own types (UsageError, CommError) differ between versions
            raise AlignError(
                f"could not start a run: {error}",
                hint="log in (`wandb login`), or set WANDB_MODE=offline to keep the run in "
                f"{folder / 'wandb'} and `wandb sync` it later",
            ) from None
        return _WandbRun(run)


class _WandbRun(TrackerRun):
    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, status: RunStatus) -> None:
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 255}[status])


# ---------------------------------------------------------------------------------------------- MLflow


class MLflow(ExperimentTracker):
    """An MLflow run per stage, in an experiment per run folder; a file store in the run folder by default."""

    name = "mlflow"
    distribution = "mlflow-skinny"  # MLflow's client; full mlflow provides the same module
    module = "mlflow"

    def open(self, context: StageContext, identity: RunIdentity) -> TrackerRun:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (context.run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store in maintenance and asks for this opt-in; it needs no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or identity.group
        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment_name)
            experiment = found.experiment_id if found else client.create_experiment(experiment_name)
            tags = {f"align.{key}": value for key, value in identity.params().items()}
            run_id = client.create_run(experiment, run_name=identity.name, tags=tags).info.run_id
            params = {**identity.params(), **_flat(stage_recipe(context))}
            fitting = [Param(k, str(v)) for k, v in params.items() if len(str(v)) <= MLFLOW_PARAM_LENGTH]
            for begin in range(0, len(fitting), 100):  # MLflow takes at most 100 parameters per call
                client.log_batch(run_id, params=fitting[begin : begin + 100])
            client.log_text(run_id, recipe_yaml(context), "recipe.yaml")
        except Exception as error:  # MlflowException, or the connection's own errors
            raise AlignError(
                f"could not start a run at {uri}: {error}",
                hint="check MLFLOW_TRACKING_URI (unset, align keeps a file store in the run folder)",
            ) from None
        return _MLflowRun(client, run_id)


class _MLflowRun(TrackerRun):
    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_mlflow_key(name), value, now, step) for name, value in metrics.items()]
        for begin in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=rows[begin : begin + 1000])

    def close(self, status: RunStatus) -> None:
        self.client.set_terminated(self.run_id, status=status.upper())


def _flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists stay whole, as their text."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            flat.update(_flat(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def _mlflow_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", name)


@hookimpl
def align_register_trackers() -> list[ExperimentTracker]:
    return [TensorBoard(), Wandb(), MLflow()]
