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
    args, extra = parser.parse_known_args(argv)
    # argparse gives up on KEY=VALUE overrides that come after an option (`run r.yaml --force a x=1`).
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides += extra
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


def _parser() -> argparse.ArgumentParser:
    from align import __version__

    parser = argparse.ArgumentParser(
        prog="align",
        description="Run RLHF pipelines (SFT, reward model, PPO, DPO, …) from one recipe.",
    )
    parser.add_argument("--version", action="version", version=f"align {__version__}")
    plugin_options = argparse.ArgumentParser(add_help=False)
    plugin_options.add_argument(
        "-p",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="load MODULE as a plugin (repeatable); -p no:NAME blocks the installed plugin NAME",
    )
    plugin_options.add_argument("--plugins-dir", metavar="DIR", help="load every .py file in DIR as a plugin")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        parents=[plugin_options],
        help="run a recipe's stages",
        description="Run a recipe's stages in order, skipping those whose output is up to date.",
    )
    run.add_argument("recipe", help="the recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe values (stages.sft.epochs=2)")
    run.add_argument("--run-dir", metavar="DIR", help="where outputs go (default: runs/<recipe name>)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun STAGE even if cached")
    run.add_argument(
        "--dataset-dir", metavar="DIR", help="a folder with a dataset_info.json (the recipe's dataset_dir)"
    )
    run.add_argument(
        "--no-memory-check", action="store_true", help="run stages the memory plan says will not fit (align plan)"
    )
    run.add_argument("--device-memory", metavar="SIZE", help=DEVICE_MEMORY_HELP)
    run.set_defaults(command=cmd_run)

    plan = commands.add_parser(
        "plan",
        parents=[plugin_options],
        help="estimate each stage's memory before running it",
        description="Estimate what each stage will hold per process (weights, gradients, optimizer states, "
        "activations, frozen models, rollout engine) and compare it with the device's memory.",
    )
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    plan.add_argument("--device-memory", metavar="SIZE", help=DEVICE_MEMORY_HELP)
    plan.add_argument(
        "--dataset-dir", metavar="DIR", help="a folder with a dataset_info.json (the recipe's dataset_dir)"
    )
    plan.set_defaults(command=cmd_plan)

    config = commands.add_parser(
        "config",
        parents=[plugin_options],
        help="validate a recipe and print it resolved",
        description="Validate a recipe (with overrides) and print it with every default filled in.",
    )
    config.add_argument("recipe")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    config.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    config.add_argument(
        "--dataset-dir", metavar="DIR", help="a folder with a dataset_info.json (the recipe's dataset_dir)"
    )
    config.set_defaults(command=cmd_config)

    plugins = commands.add_parser(
        "plugins", parents=[plugin_options], help="list plugins, their hooks and what they register"
    )
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.set_defaults(command=cmd_plugins)

    data = commands.add_parser("data", help="inspect datasets").add_subparsers(title="data commands", metavar="COMMAND")
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
    preview.add_argument("--format", help="the dataset format, when it cannot be detected")
    preview.add_argument(
        "--model", "-m", help="whose tokenizer and chat template (default: the fallback model source, tiny-llama)"
    )
    preview.add_argument("-n", type=int, default=3, help="rows to show (default: 3)")
    preview.add_argument("--max-length", type=int, default=1024, help="tokens per row (default: 1024)")
    preview.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        default="error",
        help="skip: leave out rows that cannot be read (counted; the others keep their file row numbers)",
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
    evaluate.add_argument("--prompts", default="demo_prompts_test", help="prompts: a dataset or file")
    evaluate.add_argument("--data", help="held-out conversations: perplexity and task metrics")
    evaluate.add_argument("--pairs", help="held-out preference pairs: preference accuracy")
    evaluate.add_argument("--dataset-dir", metavar="DIR", help="a folder with a dataset_info.json")
    evaluate.add_argument(
        "--reward-function",
        action="append",
        default=[],
        metavar="NAME",
        help="a rule to score responses with (repeatable)",
    )
    evaluate.add_argument("--samples", type=int, default=64)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--temperature", type=float, default=0.7)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--engine", help="the rollout engine that generates (default: the fallback engine, hf)")
    evaluate.add_argument("--output", required=True, metavar="DIR")
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

    explain = commands.add_parser(
        "explain",
        parents=[plugin_options],
        help="show the settings of a stage, model source, PEFT method, rollout engine, advantage estimator or "
        "reward function",
    )
    explain.add_argument("name", help="a plugin's name, e.g. sft, lora, vllm, grpo, exact_answer")
    explain.set_defaults(command=cmd_explain)
    return parser


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
    if is_main_process():
        _log_to_terminal()
    signal.signal(signal.SIGTERM, _interrupt)  # a killed run records where it stopped, like Ctrl-C
    summary = run_recipe(recipe, pm, run_dir, force=args.force)
    if summary.status != "done":
        print(f"error: {summary.error}", file=sys.stderr)
        print(f"  see {summary.run_dir}/logs/run.log; rerunning continues from the failed stage", file=sys.stderr)
        return EXIT_FAILED
    if is_main_process():
        print(f"done: {summary.run_dir}/summary.json")
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
        import yaml

        print(yaml.safe_dump(recipe.to_plain(), sort_keys=False), end="")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from align.plugin_manager import describe_plugins

    pm = _plugin_manager(args)
    # pluggy lists a name blocked with -p no:NAME as a plugin that is None: describe the loaded plugins,
    # and show the blocked names as such (this manager serves this listing only).
    blocked = [name for name, plugin in pm.list_name_plugin() if plugin is None]
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
        return 0
    table = [("PLUGIN", "VERSION", "FROM", "REGISTERS", "HOOKS")]
    for row in rows:
        registers = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in row["registers"].items())
        hooks = ", ".join(h.removeprefix("align_") for h in row["hooks"])
        table.append((row["plugin"], row["version"] or "-", f"{row['source']} {row['where']}", registers or "-", hooks))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


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
    logging.getLogger("align").setLevel(logging.INFO)
    _log_to_terminal()
    results = evaluate_models(
        models, args.reference, args.reward_model, settings, _plugin_manager(args), args.dataset_dir
    )
    write_reports(results, Path(args.output))
    print(f"wrote {args.output}/results.json, report.md and report.html")
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
    kinds = ("stage", "model source", "peft method", "rollout engine", "advantage estimator", "reward function")
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _log_to_terminal() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("align").addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
