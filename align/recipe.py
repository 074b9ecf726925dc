"""The recipe: one YAML file that says what to train, on what, and in which order.

::

    model: tiny-llama            # a model source, a local folder or a hub id
    backend: {kind: single}      # how every stage runs (see Backend)
    defaults: {seed: 7}          # settings applied to every stage that has them
    stages:                      # run in this order
      sft:                       # the stage's name; its plugin defaults to the same name
        data: demo_sft           # a registry entry or a file
      dpo:
        policy: sft              # an input: another stage's output (or `base`)
        beta: 0.1

:func:`load_recipe` reads such a file, applies ``key.path=value`` overrides, and validates every part
against the schemas the plugins declare, so that a recipe that loads is a recipe that can run.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.backend import BACKEND_OPTIONS, Backend, check_hardware
from align.backend_files import resolve_backend
from align.errors import AlignError
from align.peft_method import PeftChoice
from align.plugin_manager import AlignPluginManager
from align.schema import build, did_you_mean, reject_unknown_keys, to_plain
from align.stage import BASE, Input, Stage
from align.trackers import REPORT_TO, check_report_to

__all__ = [
    "OWNED_OPTIONS",
    "DuplicateKeyError",
    "ModelSpec",
    "Recipe",
    "RecipeLoader",
    "StageSpec",
    "load_recipe",
    "validate_model",
    "validate_recipe",
]

TOP_LEVEL_KEYS = ("model", "backend", "defaults", "stages", "run_dir", "dataset_dir")

_UPLOAD = (
    "align does not upload anything",
    "`align export RUN_DIR/STAGE OUT` writes a stage's output as a checkpoint to upload (`hf upload`)",
)

#: Trainer options (transformers' ``TrainingArguments`` names) that align sets itself, because the run
#: contract depends on them: where outputs go, how a killed stage resumes, what the NaN guard sees. A
#: stage's pass-through settings may not set them; each maps to (why align owns it, what to do instead).
#: The options that ``backend:`` sets are refused the same way (:data:`align.backend.BACKEND_OPTIONS`).
OWNED_OPTIONS: dict[str, tuple[str, str]] = {
    "output_dir": (
        "align writes every output into the run folder, and checkpoints where a rerun finds them",
        "use --run-dir or `run_dir:`",
    ),
    "overwrite_output_dir": (
        "align trains each stage in a fresh work folder and publishes it only when the stage succeeds",
        "use --force STAGE to rerun a stage whose output is cached",
    ),
    "logging_dir": (
        "align writes metrics to RUN_DIR/logs and hands them to the stage's trackers, which write where they say",
        "use --run-dir or `run_dir:` to move them, and `report_to` to choose the trackers",
    ),
    "run_name": (
        "align names a run by its run folder and its parts by the stages' names",
        "use --run-dir or `run_dir:`, or rename the stage",
    ),
    "resume_from_checkpoint": (
        "align resumes a killed stage from its last checkpoint by itself",
        "rerun the recipe",
    ),
    # Two, not one: a checkpoint saved just before the loss became NaN may hold broken weights already,
    # and the NaN guard must keep one from before it. They are deleted when the stage succeeds anyway.
    "save_total_limit": (
        "align keeps the last two checkpoints, so that the NaN guard always has one from before a failure",
        "set save_steps to checkpoint more or less often",
    ),
    "save_only_model": (
        "a checkpoint without the optimizer's state cannot resume a killed stage as if it had never stopped",
        "leave it out",
    ),
    "logging_nan_inf_filter": ("the NaN guard must see every loss, so align turns the filter off", "leave it out"),
    "logging_strategy": (
        "align logs every `logging_steps` steps, and the NaN guard reads those logs",
        "set logging_steps",
    ),
    "save_strategy": ("align checkpoints every `save_steps` steps", "set save_steps (0: no checkpoints)"),
    "eval_strategy": (
        "align evaluates the held-out rows every `eval_steps` steps",
        "set eval_steps (0: at the end only)",
    ),
    "push_to_hub": _UPLOAD,
}


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping.

    PyYAML keeps the last of two equal keys without a word: two stages named ``sft`` would become one, and
    a setting written twice in a stage would take the lower value. The check runs on the composed document,
    where every key still has its line, before anything is constructed.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _reject_duplicate_keys(node, "", set())
        return super().construct_document(node)


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one mapping; ``str()`` says which, where, and on which lines."""

    def __init__(self, key: str, parent: str, first: int, second: int) -> None:
        self.key, self.parent = key, parent
        self.lines = f"lines {first} and {second}" if first != second else f"both on line {first}"
        where = f"under '{parent}'" if parent else "at the top level"
        super().__init__(f"key '{key}' appears twice {where} ({self.lines})")
        self.hint = (
            "stages need distinct names: rename one, and keep its stage plugin with `plugin: NAME`"
            if parent == "stages"
            else "YAML keeps only one of them: delete one, or merge what they say"
        )


def _reject_duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: its anchor was checked where it was written (and may refer to itself)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                _reject_duplicate_keys(value, path, seen)
                continue
            # `<<: *base` merges keys on purpose: what the mapping itself says wins, as YAML intends.
            if key.tag != "tag:yaml.org,2002:merge":
                identity = (key.tag, key.value)  # the resolved tag: `1` and `"1"` are different keys
                if identity in first:
                    line = first[identity].start_mark.line + 1
                    raise DuplicateKeyError(key.value, path, line, key.start_mark.line + 1)
                first[identity] = key
            _reject_duplicate_keys(value, f"{path}.{key.value}" if path else key.value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicate_keys(item, f"{path}[{index}]", seen)


@dataclass
class ModelSpec:
    """The base model: a registered model source and its validated settings."""

    source: str
    config: Any

    def to_plain(self) -> dict[str, Any]:
        return {"source": self.source, **to_plain(self.config)}


@dataclass
class StageSpec:
    """One stage as the recipe configures it, after defaults and validation."""

    name: str
    plugin: str
    stage: Stage
    inputs: dict[str, str | list[str]]  #: role → ``base`` or an earlier stage (a list for ``pick="all"``)
    config: Any  #: an instance of ``stage.Config``
    peft: PeftChoice | None = None  #: the validated ``peft`` setting, for stages that have one
    passthrough: dict[str, Any] = field(default_factory=dict)  #: trainer options align does not name

    def to_plain(self) -> dict[str, Any]:
        settings = to_plain(self.config)
        if self.peft is not None:
            settings["peft"] = self.peft.to_plain()
        return {"plugin": self.plugin, **self.inputs, **settings, **self.passthrough}


@dataclass
class Recipe:
    """A validated recipe."""

    model: ModelSpec
    backend: Backend
    stages: dict[str, StageSpec]  #: in run order
    defaults: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    dataset_dir: str | None = None  #: a folder with a dataset_info.json, searched before align's own
    path: Path | None = None  #: the file it was read from

    def spec_of(self, config: Any) -> StageSpec:
        """The stage whose validated settings are ``config``: ``Stage.check`` is handed the settings, and
        needs the stage's name in the recipe for its error messages."""
        return next(spec for spec in self.stages.values() if spec.config is config)

    def to_plain(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in) as plain data: what ``align config`` prints."""
        return {
            "model": self.model.to_plain(),
            "backend": to_plain(self.backend),
            "defaults": self.defaults,
            "stages": {name: spec.to_plain() for name, spec in self.stages.items()},
            **({"run_dir": self.run_dir} if self.run_dir else {}),
            **({"dataset_dir": self.dataset_dir} if self.dataset_dir else {}),
        }

    def to_yaml(self) -> str:
        """:meth:`to_plain` as YAML: what ``RUN/recipe.yaml`` holds and ``align config`` prints."""
        return yaml.safe_dump(self.to_plain(), sort_keys=False)


def load_recipe(path: str | Path, overrides: Sequence[str], pm: AlignPluginManager) -> Recipe:
    """Read, override and validate a recipe file; every problem is an :class:`AlignError`."""
    path = Path(path)
    raw = read_yaml(path)
    apply_overrides(raw, overrides)
    return validate_recipe(raw, pm, path)


def read_yaml(path: Path) -> dict[str, Any]:
    """A recipe file's content as a mapping, with YAML errors given as file, line and column."""
    if not path.is_file():
        raise AlignError(f"recipe {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise AlignError(f"recipe {path}: cannot be read as YAML: {error}") from None
    data = parse_yaml(text, f"recipe {path}")
    if not isinstance(data, dict):
        raise AlignError(f"recipe {path}: expected a mapping with `model:` and `stages:` at the top")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """YAML ``text`` read safely, refusing duplicate keys; errors start with ``where`` and give line and column."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # RecipeLoader is a SafeLoader that refuses duplicate keys
    except DuplicateKeyError as error:
        raise AlignError(f"{where}: {error}", hint=error.hint) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise AlignError(f"{where}: invalid YAML at {at}: {error.problem}") from None
    except yaml.YAMLError as error:
        raise AlignError(f"{where}: cannot be read as YAML: {error}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply ``a.b.c=value`` overrides in place; values are read as YAML (``0.2`` is a number)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise AlignError(f"override '{override}' is not of the form key.path=value (e.g. stages.dpo.beta=0.2)")
        try:
            value = yaml.load(text, Loader=RecipeLoader)  # RecipeLoader is a SafeLoader
        except DuplicateKeyError as error:
            inside = f" under '{error.parent}'" if error.parent else ""
            raise AlignError(
                f"override '{override}': key '{error.key}' appears twice{inside}", hint=error.hint
            ) from None
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(parents):
            if depth == 1 and parents[0] == "stages":
                stages = raw.get("stages") or {}
                if part not in stages:
                    known = ", ".join(stages) or "none"
                    raise AlignError(
                        f"override '{override}': the recipe has no stage '{part}'{did_you_mean(part, stages)}",
                        hint=f"its stages: {known}",
                    )
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise AlignError(f"override '{override}': '{'.'.join(parents[: depth + 1])}' is not a mapping")
            node = child
        node[leaf] = value


def validate_recipe(raw: Mapping[str, Any], pm: AlignPluginManager, path: Path | None = None) -> Recipe:
    """Check a recipe's plain data against the plugins' schemas and build the :class:`Recipe`.

    Then each stage checks its settings against the registries (:meth:`Stage.check`) and plugins see the
    recipe (``align_recipe_loaded``), so that every mistake is found before any stage runs.
    """
    reject_unknown_keys(raw, TOP_LEVEL_KEYS, "")
    if "model" not in raw:
        raise AlignError("the recipe has no `model:`", hint="e.g. `model: tiny-llama`, a local folder, or a hub id")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, Mapping) or not stages_raw:
        raise AlignError(
            "the recipe has no stages: `stages:` must map stage names to their settings",
            hint="e.g.\nstages:\n  sft:\n    data: demo_sft",
        )
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise AlignError("'defaults' must be a mapping of settings shared by the stages")
    for key in ("run_dir", "dataset_dir"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise AlignError(f"'{key}' must be a folder path; got {raw[key]!r}")
    dataset_dir = raw.get("dataset_dir")
    if dataset_dir is not None and not Path(dataset_dir).expanduser().is_dir():
        raise AlignError(f"dataset_dir {dataset_dir}: no such folder")

    stages: dict[str, StageSpec] = {}
    for name, entry in stages_raw.items():
        stages[name] = _validate_stage(str(name), entry, defaults, stages_raw, stages, pm)
    _reject_unused_defaults(defaults, stages.values())
    backend = resolve_backend(raw.get("backend"))  # with the DeepSpeed and accelerate configs it names
    check_hardware(backend)
    recipe = Recipe(
        model=validate_model(raw["model"], pm),
        backend=backend,
        stages=stages,
        defaults=dict(defaults),
        run_dir=raw.get("run_dir"),
        dataset_dir=dataset_dir,
        path=path,
    )
    for spec in stages.values():
        spec.stage.check(spec.config, recipe, pm)
    check_report_to(recipe, pm)  # every stage's, a third party's too, whatever its own check does
    pm.hook.align_recipe_loaded(recipe=recipe, plugins=pm)
    return recipe


def validate_model(value: Any, pm: AlignPluginManager) -> ModelSpec:
    """A recipe's ``model:`` value (a source name, a mapping with ``source:``, a folder or a hub id) checked
    against the registered model sources."""
    sources = pm.registry("model source")
    if isinstance(value, str):
        if value in sources:
            return ModelSpec(value, build(sources[value].obj.Config, {}, "model"))
        try:
            return ModelSpec("path", build(pm.get("model source", "path").Config, {"path": value}, "model"))
        except AlignError as error:
            if suggestion := did_you_mean(value, sources):  # `tiny-lama` is a typo, not a folder
                raise AlignError(error.message + suggestion, hint=error.hint) from None
            raise
    if isinstance(value, Mapping):
        settings = dict(value)
        source = settings.pop("source", None)
        if not isinstance(source, str):
            raise AlignError(
                "'model' as a mapping needs `source:` naming a model source",
                hint=f"known sources: {', '.join(sorted(sources))}",
            )
        plugin = pm.get("model source", source)
        return ModelSpec(source, build(plugin.Config, settings, "model"))
    raise AlignError(f"'model' must be a model source name, a folder or a mapping; got {value!r}")


def _validate_stage(
    name: str,
    entry: Any,
    defaults: Mapping[str, Any],
    all_stages: Mapping[str, Any],
    earlier: Mapping[str, StageSpec],
    pm: AlignPluginManager,
) -> StageSpec:
    path = f"stages.{name}"
    if name == BASE:
        raise AlignError(f"'{path}': '{BASE}' names the recipe's model; give the stage another name")
    if entry is not None and not isinstance(entry, Mapping):
        raise AlignError(f"'{path}' must be a mapping of settings; got {entry!r}")
    entry = dict(entry or {})
    plugin_name = entry.pop("plugin", name)
    if plugin_name not in pm.registry("stage"):
        known = ", ".join(sorted(pm.registry("stage"))) or "none"
        raise AlignError(
            f"'{path}' uses the stage plugin '{plugin_name}', which no installed plugin provides"
            f"{did_you_mean(plugin_name, pm.registry('stage'))}",
            hint=f"known stage plugins: {known}. Set `plugin:` when the stage's name is not its plugin's",
        )
    stage: Stage = pm.get("stage", plugin_name)
    resolved = {
        role: _resolve_input(name, role, entry.pop(role, None), stage, all_stages, earlier) for role in stage.inputs
    }
    inputs = {role: source for role, source in resolved.items() if source is not None}

    config_fields = [f.name for f in dataclasses.fields(stage.Config)]
    settings = {k: copy.deepcopy(v) for k, v in defaults.items() if k in config_fields}
    for key, value in entry.items():
        if isinstance(value, Mapping) and isinstance(settings.get(key), Mapping):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    passthrough = _passthrough(stage, {k: settings.pop(k) for k in list(settings) if k not in config_fields}, path)
    config: Any = build(stage.Config, settings, path)
    peft = _validate_peft(config.peft, f"{path}.peft", pm) if "peft" in config_fields else None
    return StageSpec(name, plugin_name, stage, inputs, config, peft, passthrough)


def _passthrough(stage: Stage, unknown: dict[str, Any], path: str) -> dict[str, Any]:
    """Settings the stage does not declare: its trainer's own options if it passes them through, else errors."""
    if not unknown:
        return {}
    for key in unknown:  # before the trainer's own check: a better message, also for options it lacks
        owned = _owned_option(key)
        if owned is not None:
            why, instead = owned
            raise AlignError(f"'{path}.{key}' cannot be set in a recipe: {why}", hint=instead)
    known = ["plugin", *stage.inputs, *(f.name for f in dataclasses.fields(stage.Config))]
    trainer_config = stage.passthrough_class()
    if trainer_config is None:
        reject_unknown_keys(unknown, known, path)
    assert trainer_config is not None  # reject_unknown_keys raised otherwise
    name = trainer_config.__name__
    trainer_fields = [f.name for f in dataclasses.fields(trainer_config)]
    for key in unknown:
        if key not in trainer_fields:
            raise AlignError(
                f"unknown key '{path}.{key}'{did_you_mean(key, known + trainer_fields)}",
                hint=f"this stage takes its own settings (`align explain {stage.name}`) and those of {name}",
            )
    return unknown


def _owned_option(key: str) -> tuple[str, str] | None:
    """(why, what to do instead) for a trainer option that align or ``backend:`` sets, else ``None``."""
    if key in OWNED_OPTIONS:
        return OWNED_OPTIONS[key]
    if key.startswith(("hub_", "push_to_hub_")):  # hub_model_id, hub_token, hub_strategy, …
        return _UPLOAD
    if key in BACKEND_OPTIONS:
        return "`backend:` sets it, the same for every stage", BACKEND_OPTIONS[key]
    return None


def _validate_peft(value: Any, path: str, pm: AlignPluginManager) -> PeftChoice:
    if not isinstance(value, Mapping) or not isinstance(value.get("method", ""), str):
        known = ", ".join(sorted(pm.registry("peft method")))
        raise AlignError(f"'{path}' must be a mapping with `method:` ({known})")
    settings = dict(value)
    name = settings.pop("method", None)
    method = pm.get("peft method", name) if name else pm.fallback("peft method", f"'{path}.method'")
    config = build(method.Config, settings, path)
    method.check(config)
    return PeftChoice(method, config)


def _resolve_input(
    name: str, role: str, given: Any, stage: Stage, all_stages: Mapping[str, Any], earlier: Mapping[str, StageSpec]
) -> str | list[str] | None:
    """Where input ``role`` of stage ``name`` comes from: what the recipe says, else the role's default."""
    path = f"stages.{name}.{role}"
    spec = stage.inputs[role]
    if given is None:
        return _default_input(path, spec, earlier)
    if spec.pick == "all" and isinstance(given, list):
        return [_named_input(path, role, item, spec, name, all_stages, earlier) for item in given]
    return _named_input(path, role, given, spec, name, all_stages, earlier)


def _default_input(path: str, spec: Input, earlier: Mapping[str, StageSpec]) -> str | list[str] | None:
    producers = [n for n, s in earlier.items() if spec.artifact is not None and s.stage.produces == spec.artifact]
    if producers:
        return producers if spec.pick == "all" else producers[-1 if spec.pick == "last" else 0]
    for candidate in spec.default:
        if candidate == BASE or candidate in earlier:
            return [candidate] if spec.pick == "all" else candidate
    if spec.optional:
        return None
    raise AlignError(
        f"'{path}' is required: {spec.help}",
        hint=f"point it at an earlier stage (`{path.rsplit('.', 1)[1]}: STAGE`) or at `{BASE}`",
    )


def _named_input(
    path: str,
    role: str,
    given: Any,
    spec: Input,
    name: str,
    all_stages: Mapping[str, Any],
    earlier: Mapping[str, StageSpec],
) -> str:
    if not isinstance(given, str):
        wanted = "an earlier stage, a list of them," if spec.pick == "all" else "an earlier stage"
        raise AlignError(f"'{path}' must name {wanted} or `{BASE}`; got {given!r}")
    if given in earlier:
        produces = earlier[given].stage.produces
        if spec.artifact and produces and produces != spec.artifact:
            raise AlignError(
                f"'{path}': stage '{given}' produces a {produces}, but the {role} must be a {spec.artifact}",
                hint=f"stages producing a {spec.artifact}: "
                + (", ".join(n for n, s in earlier.items() if s.stage.produces == spec.artifact) or "none yet"),
            )
        return given
    if given == BASE:
        return given
    if given == name:
        raise AlignError(f"'{path}': stage '{name}' cannot take its own output as input (a cycle)")
    if given in all_stages:
        cycle = _cycle_through(name, given, all_stages)
        if cycle:
            raise AlignError(f"'{path}': the stages' inputs form a cycle: {' → '.join(cycle)}")
        raise AlignError(
            f"'{path}': stage '{name}' takes its {role} from '{given}', which runs after it",
            hint=f"stages run in the order they are written: move '{given}' above '{name}'",
        )
    raise AlignError(
        f"'{path}': '{given}' is not a stage of this recipe{did_you_mean(given, [*all_stages, BASE])}",
        hint=f"stages: {', '.join(all_stages)}; `{BASE}` is the recipe's model",
    )


def _cycle_through(start: str, first: str, all_stages: Mapping[str, Any]) -> list[str] | None:
    """The chain start → first → … → start if the stages' written references lead back, else None."""

    def references(name: str) -> list[str]:
        entry = all_stages.get(name)
        values = entry.values() if isinstance(entry, Mapping) else ()
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        return [v for v in flat if isinstance(v, str) and v in all_stages]

    chains = [[start, first]]
    while chains:
        chain = chains.pop()
        for ref in references(chain[-1]):
            if ref == start:
                return [*chain, start]
            if ref not in chain:
                chains.append([*chain, ref])
    return None


def _reject_unused_defaults(defaults: Mapping[str, Any], stages: Iterable[StageSpec]) -> None:
    # report_to is the core's (align.trackers): it serves stages whose settings lack it, a third party's too.
    accepted = {f.name for spec in stages for f in dataclasses.fields(spec.stage.Config)} | {REPORT_TO}
    for key in defaults:
        if key not in accepted:
            raise AlignError(
                f"'defaults.{key}' is not a setting of any stage in this recipe{did_you_mean(key, accepted)}",
                hint=f"settings these stages share: {', '.join(sorted(accepted)) or 'none'}",
            )
