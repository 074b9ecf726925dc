# PYTHON_ARGCOMPLETE_OK
"""The ``align`` command.

Start-up stays fast: this module imports only the standard library and align's light core. Commands
that train import torch and transformers inside the stage plugins, when a stage actually runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.errors import AlignError

EXIT_FAILED = 1  # the work itself failed (a stage raised, the disk filled up during a stage)
EXIT_USAGE = 2  # the input was wrong (recipe, overrides, plugins), or the run folder cannot be used: a file,
# read-only, or in use by another run; found before any work. Also an export the last run does not vouch for.


EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: 128 + SIGINT, what a shell reports for Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (`align completion`): answer and exit
        _complete(parser)
    args, extra = parser.parse_known_args(argv)
    # argparse gives up on KEY=VALUE overrides that come after an option (`run r.yaml --force a x=1`).
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "command"):
        parser.print_help()
        return EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to start the same command again, distributed
    if args.command is not cmd_run:
        # A killed command stops like Ctrl-C, with the same exit status. `align run` installs this itself
        # once it knows it runs the stages here: a run handed to accelerate leaves signals to the launcher.
        signal.signal(signal.SIGTERM, _interrupt)
    # Exit statuses (README, "Exit codes"): an AlignError that reaches here is bad input wherever it was
    # found (2); a failed stage is 1 (cmd_run; a bug's traceback also exits 1); an interruption is 130.
    try:
        return args.command(args)
    except AlignError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


DEVICE_MEMORY_HELP = "plan against SIZE per process (80GB: a GPU you will run on) instead of this machine"
DATASET_DIR_HELP = "a folder with a dataset_info.json (the recipe's dataset_dir)"
RECIPE_HELP = "the recipe YAML file"
OVERRIDES_HELP = "recipe values to override, any number of them (stages.sft.epochs=2)"
VERBOSE_HELP = (
    "also show third-party output (library progress bars, warnings, vLLM logs) on the terminal; "
    "it always goes to RUN/logs/run.log"
)
SHELLS = ("bash", "zsh", "fish")
#: What ``align explain`` explains, and the names its Tab completion offers.
EXPLAINABLE = ("stage", "model source", "peft method", "rollout engine", "advantage estimator", "reward function")


def _parser() -> argparse.ArgumentParser:
    from align import __version__

    parser = argparse.ArgumentParser(
        prog="align",
        description="Run RLHF pipelines (SFT, reward model, PPO, DPO, …) from one recipe.",
        epilog="`align COMMAND -h` shows a command's options; `align completion -h` sets up Tab completion.",
    )
    parser.add_argument(
        "--version", action="version", version=f"align {__version__}", help="print align's version and exit"
    )
    plugin_options = argparse.ArgumentParser(add_help=False)
    plugin_options.add_argument(
        "-p",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="load MODULE as a plugin (repeatable); -p no:NAME blocks the plugin NAME (`align plugins` lists them)",
    )
    plugin_options.add_argument("--plugins-dir", metavar="DIR", help="load every .py file in DIR as a plugin")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        parents=[plugin_options],
        help="run a recipe's stages",
        description="Run a recipe's stages in order, skipping those whose output is up to date.",
    )
    _recipe_arguments(run)
    run.add_argument("--run-dir", metavar="DIR", help="where outputs go (default: runs/<recipe name>)")
    _completes(
        run.add_argument(
            "--force",
            action="append",
            default=[],
            metavar="STAGE",
            help="rerun STAGE even if its output is up to date (repeatable)",
        ),
        _complete_stages,
    )
    run.add_argument("--dataset-dir", metavar="DIR", help=DATASET_DIR_HELP)
    run.add_argument(
        "--no-memory-check", action="store_true", help="run stages the memory plan says will not fit (align plan)"
    )
    run.add_argument("--device-memory", metavar="SIZE", help=DEVICE_MEMORY_HELP)
    run.add_argument("-v", "--verbose", action="store_true", dest="verbose", help=VERBOSE_HELP)
    run.set_defaults(command=cmd_run)

    plan = commands.add_parser(
        "plan",
        parents=[plugin_options],
        help="estimate each stage's memory before running it",
        description="Estimate what each stage will hold per process (weights, gradients, optimizer states, "
        "activations, frozen models, rollout engine) and compare it with the device's memory.",
    )
    _recipe_arguments(plan)
    plan.add_argument("--device-memory", metavar="SIZE", help=DEVICE_MEMORY_HELP)
    plan.add_argument("--dataset-dir", metavar="DIR", help=DATASET_DIR_HELP)
    plan.set_defaults(command=cmd_plan)

    config = commands.add_parser(
        "config",
        parents=[plugin_options],
        help="validate a recipe and print it resolved",
        description="Validate a recipe (with overrides) and print it with every default filled in.",
    )
    _recipe_arguments(config)
    config.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    config.add_argument("--dataset-dir", metavar="DIR", help=DATASET_DIR_HELP)
    config.set_defaults(command=cmd_config)

    plugins = commands.add_parser(
        "plugins",
        parents=[plugin_options],
        help="list plugins and what they register",
        description="List every plugin: its version, where it comes from and what it registers (stages, "
        "dataset formats, PEFT methods, …), in a table that fits 100 columns. -v adds the hooks each plugin "
        "implements and every name it registers; --json prints all of it for a script.",
    )
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.add_argument(
        "-v", "--verbose", action="store_true", help="show each plugin's hooks, its module and every name it registers"
    )
    plugins.set_defaults(command=cmd_plugins)

    data = commands.add_parser(
        "data", help="inspect datasets", description="Inspect datasets as the stages will read them."
    ).add_subparsers(title="data commands", metavar="COMMAND", required=True)
    preview = data.add_parser(
        "preview",
        parents=[plugin_options],
        help="render rows as the model sees them, trained tokens marked",
        description="Render rows of a dataset with a model's chat template, mark the tokens that carry loss, "
        "and count rows, tokens, truncated and dropped rows (by reason) for the whole dataset. Rows are numbered "
        "as in the file (row 0 is its first), as error messages number them.",
    )
    preview.add_argument("dataset", metavar="NAME|PATH", help="a registry entry or a data file")
    preview.add_argument("--dataset-dir", metavar="DIR", help="a folder with a dataset_info.json")
    preview.add_argument(
        "--format", help="the dataset format, when it cannot be detected (`align plugins` lists the formats)"
    )
    preview.add_argument(
        "--model", "-m", help="whose tokenizer and chat template (default: the fallback model source, tiny-llama)"
    )
    preview.add_argument("-n", type=int, default=3, help="rows to show (default: %(default)s)")
    preview.add_argument("--max-length", type=int, default=1024, help="tokens per row (default: %(default)s)")
    preview.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        default="error",
        help="skip: leave out rows that cannot be read (counted; the others keep their file row numbers) "
        "(default: %(default)s)",
    )
    preview.add_argument(
        "--chat-template",
        metavar="FILE|TEMPLATE",
        help="a registered template's name (`align plugins` lists them), a .jinja file or the template itself, "
        "replacing the tokenizer's (as a stage's chat_template:)",
    )
    preview.set_defaults(command=cmd_data_preview)

    evaluate = commands.add_parser(
        "eval",
        parents=[plugin_options],
        help="evaluate checkpoints against a reference",
        description="Generate with each model for the same prompts (same seed and sampling), then report reward-"
        "model score, win rate against the reference, KL to it, length, perplexity, preference accuracy, reward "
        "functions and task metrics in OUTPUT/results.json, report.md and report.html.",
    )
    evaluate.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="a checkpoint to evaluate (repeatable); NAME defaults to the folder's name",
    )
    evaluate.add_argument("--reference", required=True, metavar="PATH", help="the checkpoint to compare with")
    evaluate.add_argument("--reward-model", metavar="PATH", help="the judge of scores and win rates")
    evaluate.add_argument(
        "--prompts", default="demo_prompts_test", help="prompts to answer: a dataset or a file (default: %(default)s)"
    )
    evaluate.add_argument("--data", help="held-out conversations: perplexity, and task metrics against their replies")
    evaluate.add_argument("--pairs", help="held-out preference pairs: preference accuracy")
    evaluate.add_argument("--dataset-dir", metavar="DIR", help="a folder with a dataset_info.json")
    evaluate.add_argument(
        "--reward-function",
        action="append",
        default=[],
        metavar="NAME",
        help="a rule to score responses with (repeatable)",
    )
    evaluate.add_argument(
        "--samples",
        type=int,
        default=64,
        metavar="N",
        help="how many prompts (and rows of --data and --pairs) to use (default: %(default)s)",
    )
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="longest response, in tokens (default: %(default)s)"
    )
    evaluate.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        metavar="T",
        help="sampling temperature, 0 for greedy (default: %(default)s)",
    )
    evaluate.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed, the same for every model: the same command gives the same numbers (default: %(default)s)",
    )
    evaluate.add_argument("--engine", help="the rollout engine that generates (default: the fallback engine, hf)")
    evaluate.add_argument(
        "--output", required=True, metavar="DIR", help="where results.json, report.md and report.html go"
    )
    evaluate.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show third-party output (library progress bars, warnings, vLLM logs) on the terminal; it "
        "always goes to OUTPUT/eval.log",
    )
    evaluate.set_defaults(command=cmd_eval)

    export = commands.add_parser(
        "export",
        help="write a stage's output as a standalone checkpoint",
        description="Copy a stage's output out of its run. With --merge, an adapter (lora, dora, qlora) is merged "
        "into the model it adapts, and a full checkpoint that transformers and vLLM load is written.",
    )
    export.add_argument("stage_dir", metavar="RUN_DIR/STAGE", help="a published stage output, e.g. runs/chain/sft")
    export.add_argument("out", metavar="OUT", help="a new (or empty) folder")
    export.add_argument("--merge", action="store_true", help="merge an adapter into its base model")
    export.add_argument(
        "--force",
        action="store_true",
        help="export even an output that the last run of its run folder does not vouch for (a failed rerun "
        "left it from an earlier run, or its files no longer match its manifest)",
    )
    export.set_defaults(command=cmd_export)

    report = commands.add_parser(
        "report",
        help="write RUN_DIR/report.html: the recipe, each stage's status, time, metrics, data and curves, and the "
        "evaluation",
        description="Write RUN_DIR/report.html, one page about a run: the recipe, each stage's status, time, "
        "metrics, data and curves, and the evaluation.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (`align run` makes runs/<recipe name>)")
    report.set_defaults(command=cmd_report)

    explain = commands.add_parser(
        "explain",
        parents=[plugin_options],
        help="show the settings of a stage, model source, PEFT method, rollout engine, advantage estimator or "
        "reward function",
        description="Show what a stage, model source, PEFT method, rollout engine, advantage estimator or reward "
        "function does, its inputs, and each of its settings with its type, range, default and meaning.",
    )
    _completes(
        explain.add_argument("name", help="a plugin's name, e.g. sft, lora, vllm, grpo, exact_answer"),
        _complete_explainable,
    )
    explain.set_defaults(command=cmd_explain)

    completion = commands.add_parser(
        "completion",
        help="print shell code that makes Tab complete align's commands and options",
        description="Print the shell code that makes Tab complete align's commands, options, recipe files, the "
        "recipe's stage names (run --force) and plugin names (explain). Try it in this shell with "
        '`eval "$(align completion bash)"` (zsh: the same with zsh; fish: `align completion fish | source`); '
        "add that line to ~/.bashrc, ~/.zshrc or ~/.config/fish/config.fish to keep it.",
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to print code for: %(choices)s")
    completion.set_defaults(command=cmd_completion)
    return parser


def _recipe_arguments(command: argparse.ArgumentParser) -> None:
    _completes(command.add_argument("recipe", help=RECIPE_HELP), _complete_recipes)
    # A default makes argparse treat KEY=VALUE as optional, in the usage line and in the error for no recipe.
    command.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=OVERRIDES_HELP)


# Tab completion (`align completion`). argcomplete is imported only while the shell asks for completions
# (_ARGCOMPLETE is set), so that every other command starts as fast as without it. A completer must never
# fail loudly: whatever it cannot read completes to nothing, as a shell's own completion does.


def _completes(action: argparse.Action, completer: Any) -> None:
    action.completer = completer  # type: ignore[attr-defined]  # argcomplete reads this attribute


def _complete(parser: argparse.ArgumentParser) -> None:
    """Print the completions the shell asked for, and exit."""
    import argcomplete

    argcomplete.autocomplete(parser)


def _complete_recipes(prefix: str, **_: Any) -> list[str]:
    """Folders and YAML files under ``prefix``."""
    folder, start = os.path.split(prefix)
    try:
        entries = list(os.scandir(folder or "."))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.name.startswith(start) or (entry.name.startswith(".") and not start.startswith(".")):
            continue
        if entry.is_dir():
            found.append(os.path.join(folder, entry.name) + "/")
        elif entry.name.endswith((".yaml", ".yml")):
            found.append(os.path.join(folder, entry.name))
    return sorted(found)


def _complete_stages(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """The recipe's stage names, read from its YAML alone: loading the plugins would slow every Tab."""
    import yaml

    try:
        stages = yaml.safe_load(Path(parsed_args.recipe).read_text(encoding="utf-8")).get("stages") or {}
        return [str(name) for name in stages if str(name).startswith(prefix)]
    except Exception:  # no recipe yet, or not one: nothing to offer
        return []


def _complete_explainable(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Every name ``align explain`` knows, with the plugins the command line loads (a third of a second)."""
    from align.plugin_manager import get_plugin_manager

    try:
        pm = get_plugin_manager(parsed_args.plugins or [], parsed_args.plugins_dir)
        names = {name for kind in EXPLAINABLE for name in pm.registry(kind)}
    except Exception:  # a plugin that fails to load: `align explain` itself says so
        return []
    return sorted(name for name in names if name.startswith(prefix))


def _plugin_manager(args: argparse.Namespace):  # -> AlignPluginManager, imported lazily
    from align.plugin_manager import get_plugin_manager

    return get_plugin_manager(args.plugins, args.plugins_dir)


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"dataset_dir={args.dataset_dir}"] if args.dataset_dir else [])]


def cmd_run(args: argparse.Namespace) -> int:
    import contextlib

    from align.backend import LAUNCHED_ENV, follow_launcher, is_main_process, launch, must_launch
    from align.launchers import outside_launcher
    from align.memory import check_fits, format_plan, plan_recipe
    from align.recipe import load_recipe
    from align.runner import claim_run_dir, default_run_dir, run_recipe

    pm = _plugin_manager(args)
    recipe = load_recipe(args.recipe, _overrides(args), pm)
    # Started by torchrun, accelerate, srun or mpirun: run in place, as one of the processes it started;
    # or, as srun's one task on this machine, launch this machine's processes as on any machine.
    launcher = outside_launcher()
    if launcher is not None:
        launcher.check(recipe.backend)
        if launcher.one_per_machine(recipe.backend):
            this_machine = launcher.machine_overrides(recipe.backend)
            recipe = load_recipe(args.recipe, [*_overrides(args), *this_machine], pm)
            args.argv = [*args.argv, *this_machine]
            launcher = None
        else:
            launcher.join(recipe.backend)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(recipe)
    if os.environ.get(LAUNCHED_ENV) != "1":  # the launcher plans; the processes it starts need not again
        shape, plans = plan_recipe(recipe, pm)
        if shape is not None:  # a model source that cannot tell its shape gets no plan, and no check
            device = _device(recipe, args.device_memory)
            if is_main_process():
                print(format_plan(shape, plans, device, detail=False), file=sys.stderr)
            if not args.no_memory_check:  # in every process run in place: one refusing alone would strand the rest
                check_fits(plans, device)
    if launcher is None and must_launch(recipe.backend):
        # The launching process holds the run folder's lock for the whole run (the processes it starts
        # know they were launched and leave it alone); other machines' launchers leave it to machine 0's.
        main_machine = recipe.backend.machine_rank == 0
        with claim_run_dir(run_dir) if main_machine else contextlib.nullcontext() as lock:
            print(f"launching {recipe.backend.world_size} processes ({recipe.backend.kind})", file=sys.stderr)
            return launch(recipe.backend, args.argv, lock=lock)
    follow_launcher()
    signal.signal(signal.SIGTERM, _interrupt)  # a killed run records where it stopped, like Ctrl-C
    summary = run_recipe(recipe, pm, run_dir, force=args.force, verbose=args.verbose)
    if summary.status != "done":
        print(f"error: {summary.error}", file=sys.stderr)
        print(f"  see {summary.run_dir}/logs/run.log; rerunning continues from the failed stage", file=sys.stderr)
        return EXIT_FAILED
    if is_main_process():
        print(f"done: {summary.run_dir}/summary.json, report {summary.run_dir}/report.html")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from align.memory import format_plan, plan_recipe
    from align.recipe import load_recipe

    pm = _plugin_manager(args)
    recipe = load_recipe(args.recipe, _overrides(args), pm)
    shape, plans = plan_recipe(recipe, pm)
    print(format_plan(shape, plans, _device(recipe, args.device_memory), detail=True))
    return 0


def _device(recipe: Any, device_memory: str | None) -> Any:
    """What each process has: ``--device-memory``, or this machine's GPU or memory."""
    from align.memory import Device, parse_bytes

    if device_memory:
        return Device(f"--device-memory {device_memory}", parse_bytes(device_memory))
    return Device.this_machine(recipe.backend.num_processes)


def cmd_config(args: argparse.Namespace) -> int:
    from align.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args), _plugin_manager(args))
    if args.json:
        print(json.dumps(recipe.to_plain(), indent=2))
    else:
        print(recipe.to_yaml(), end="")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from align.plugin_manager import describe_plugins

    pm = _plugin_manager(args)
    # pluggy lists a name blocked with -p no:NAME as a plugin that is None: describe the loaded plugins,
    # and show the blocked names as such (this manager serves this listing only).
    blocked = [name for name, plugin in pm.list_name_plugin() if plugin is None]
    modules = {name: getattr(pm.get_plugin(name), "__name__", None) for name, _ in pm.list_name_plugin()}
    for name in blocked:
        pm.unblock(name)
    rows = [
        *describe_plugins(pm),
        *(
            {"plugin": n, "version": None, "source": "blocked", "where": f"-p no:{n}", "hooks": [], "registers": {}}
            for n in blocked
        ),
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.verbose:
        print("\n\n".join(_plugin_details(row, modules.get(row["plugin"])) for row in rows))
    else:
        print("\n".join(_plugins_table(rows)))
    return 0


TABLE_WIDTH = 100  # `align plugins` fits a terminal this wide; -v and --json show what it leaves out


def _plugins_table(rows: Sequence[Any]) -> list[str]:
    """One line per plugin, no wider than :data:`TABLE_WIDTH`: long names and origins are shortened and
    the registered names are cut to what fits, saying how many more there are."""
    cells = [
        (
            _clip(row["plugin"], 24),
            _clip(row["version"] or "-", 12),
            f"{row['source']} {_clip(row['where'], 29 - len(row['source']), keep_end=True)}",  # a path's end
            row["registers"],
        )
        for row in rows
    ]
    header = ("PLUGIN", "VERSION", "FROM")
    widths = [max(len(cell[i]) for cell in [header, *cells]) for i in range(3)]
    room = TABLE_WIDTH - sum(widths) - 2 * len(widths)
    lines = []
    for first, registers in [(header, "REGISTERS"), *((cell[:3], _fit_registers(cell[3], room)) for cell in cells)]:
        lines.append("  ".join(text.ljust(width) for text, width in zip(first, widths, strict=True)) + "  " + registers)
    return lines


def _fit_registers(registers: dict[str, list[str]], width: int) -> str:
    """``kind: name, name; kind: name``, as many names as fit in ``width``, then ``+N more``; or, where
    not even one name fits, ``20 reward functions``."""
    items = [(kind, name) for kind, names in registers.items() for name in names]
    if not items:
        return "-"
    for shown in range(len(items), 0, -1):
        grouped: dict[str, list[str]] = {}
        for kind, name in items[:shown]:
            grouped.setdefault(kind, []).append(name)
        text = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in grouped.items())
        text += f", +{len(items) - shown} more" if shown < len(items) else ""
        if len(text) <= width:
            return text
    counts = "; ".join(f"{len(names)} {kind}{'s' if len(names) > 1 else ''}" for kind, names in registers.items())
    return _clip(counts, width)  # not even one name fits: how many of each kind


def _clip(text: str, width: int, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if keep_end else text[: width - 1] + "…"


def _plugin_details(row: Any, module: str | None) -> str:
    """Everything about one plugin, for ``align plugins -v``: wrapped to :data:`TABLE_WIDTH`, never cut."""
    import textwrap

    origin = f"{row['source']} {row['where']}" + (f" ({module})" if module and row["source"] == "entry point" else "")
    fields = {
        "from": origin,
        "registers": "; ".join(f"{kind}: {', '.join(names)}" for kind, names in row["registers"].items()) or "-",
        "hooks": ", ".join(row["hooks"]) or "-",
    }
    lines = [f"{row['plugin']} {row['version'] or ''}".rstrip()]
    for label, text in fields.items():
        lines.append(
            textwrap.fill(
                text,
                TABLE_WIDTH,
                initial_indent=f"  {label:<11}",
                subsequent_indent=" " * 13,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def cmd_data_preview(args: argparse.Namespace) -> int:
    from align.preview import preview
    from align.runner import align_home

    print(
        preview(
            _plugin_manager(args),
            args.dataset,
            model=args.model,
            dataset_dir=args.dataset_dir,
            format_name=args.format,
            count=args.n,
            max_length=args.max_length,
            on_bad_row=args.on_bad_row,
            cache_dir=align_home() / "models",
            chat_template=args.chat_template,
        )
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from align.console import capture
    from align.evaluation import EvalSettings, evaluate_models, write_reports

    models = {}
    for given in args.model:
        name, _, path = given.rpartition("=") if "=" in given else ("", "", given)
        models[name or Path(path).name] = path
    for path in [*models.values(), args.reference, *([args.reward_model] if args.reward_model else [])]:
        if not Path(path).is_dir():
            raise AlignError(f"{path}: no such checkpoint folder")
    settings = EvalSettings(
        prompts=args.prompts,
        data=args.data,
        pairs=args.pairs,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        engine=args.engine,
        reward_functions=args.reward_function,
    )
    pm = _plugin_manager(args)
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AlignError(f"cannot create --output {output}: {error}", hint="choose another folder") from None
    # As a run does: what libraries print goes to OUTPUT/eval.log, the terminal shows progress.
    with capture(output / "eval.log", show=True, verbose=args.verbose):
        results = evaluate_models(models, args.reference, args.reward_model, settings, pm, args.dataset_dir)
        write_reports(results, output)
    print(f"wrote {output}/results.json, report.md and report.html (log: {output}/eval.log)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from align.models import export

    _log_to_terminal()  # for the warning --force gives when it exports an output no run vouches for
    written = export(Path(args.stage_dir), Path(args.out), merge=args.merge, force=args.force)
    print(f"wrote {written} to {args.out}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import inspect

    from align.schema import describe, did_you_mean

    pm = _plugin_manager(args)
    kinds = EXPLAINABLE
    found = [(kind, pm.registry(kind)[args.name]) for kind in kinds if args.name in pm.registry(kind)]
    if not found:
        known = [name for kind in kinds for name in pm.registry(kind)]
        raise AlignError(
            f"nothing named '{args.name}' to explain{did_you_mean(args.name, known)}",
            hint="stages, model sources, PEFT methods, rollout engines, advantage estimators and reward "
            "functions can be explained",
        )
    for index, (kind, entry) in enumerate(found):  # a stage and its estimator may share a name (grpo)
        obj = entry.obj
        print(f"{chr(10) if index else ''}{kind} '{args.name}' ({entry.plugin})")
        print(inspect.getdoc(obj) or "")
        for line in obj.facts() if kind == "stage" else []:
            print(f"  {line}")
        if kind == "advantage estimator":
            print(f"  trains a critic: {'yes' if obj.needs_critic else 'no'}")
            print(f"  needs several responses per prompt: {'yes' if obj.needs_groups else 'no'}")
        for role, spec in getattr(obj, "inputs", {}).items():
            print(f"\n  {role}  (input; default: {spec.describe_default()})\n      {spec.help}")
        for name, type_, default, help_ in describe(obj.Config, nested=True):
            print(f"\n  {name}: {type_} = {default}\n      {help_}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from align.run_report import write_run_report

    path = write_run_report(Path(args.run_dir))
    print(f"wrote {path}")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import argcomplete
    except ImportError:
        raise AlignError(
            "shell completion needs argcomplete, which is not installed", hint="pip install 'argcomplete>=3.5,<4'"
        ) from None
    sys.stdout.write(argcomplete.shellcode(["align"], shell=args.shell))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _log_to_terminal() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("align").addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
