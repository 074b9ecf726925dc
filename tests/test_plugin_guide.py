"""docs/plugins.md works as written: every code block of the guide is executed here.

The guide's blocks are read from the page itself. A ``python`` block is a plugin file: all of them are
written into one ``plugins/`` folder and loaded with ``get_plugin_manager(plugins_dir=...)``, and each
must register what its section says. A block carries its file name in a ``<!-- file: NAME -->`` line
before it; one that is not meant to run says ``<!-- not run -->`` there, and any other block runs, so an
unmarked block that breaks fails this file. ``yaml`` blocks are recipes, run with ``align run`` from
the folder that holds ``plugins/`` (marked slow: they train), or, where training would take long, loaded
with ``align config``. A ``text`` block after ``<!-- output of: COMMAND -->`` is what that ``align``
command prints, and is compared with it.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, run_align, tiny_llama

GUIDE = REPO / "docs" / "plugins.md"
README = REPO / "README.md"

#: What each plugin file of the guide registers (kind → names), as its section says.
REGISTERS = {
    "cpo": {"stage": ["cpo"]},
    "prune": {"stage": ["prune"]},
    "shp": {"dataset format": ["shp"]},
    "vicuna": {"chat template": ["vicuna"]},
    "rows_file": {"tracker": ["rows_file"]},
    "demonstrations": {"stage": ["imitate"], "data kind": ["demonstrations"]},
    "distinct_words": {"reward function": ["distinct_words"]},
    "one_by_one": {"rollout engine": ["one_by_one"]},
    "distinct_n": {"evaluator": ["distinct_n"]},
    "house_rules": {},
    "group_rank": {"advantage estimator": ["group_rank"]},
    "dapo": {"stage": ["dapo"]},
}
#: The recipes of the guide: each is run by a test below, or where training would take long, checked by
#: `align config` (every name and setting validated, as before a run).
RECIPES = {"cpo.yaml", "prune.yaml", "imitate.yaml", "score.yaml", "rank.yaml"}
CHECKED_ONLY = {"score.yaml"}


# ---------------------------------------------------------------------------------------------------
# Reading the guide
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block and the marker line before it."""

    language: str
    text: str
    line: int  #: where the block starts, for messages
    file: str | None = None  #: ``<!-- file: NAME -->``
    run: bool = True  #: ``False`` after ``<!-- not run -->``
    output_of: str | None = None  #: ``<!-- output of: COMMAND -->``

    @property
    def name(self) -> str:
        """The file the block becomes (python blocks without a name get one from their line)."""
        return self.file or f"block_{self.line}.py"


_MARKER = re.compile(r"<!--\s*(file|not run|output of)\s*:?\s*(.*?)\s*-->")


def blocks(markdown: str) -> list[Block]:
    found, lines, index = [], markdown.splitlines(), 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)", lines[index])
        if not fence:
            index += 1
            continue
        start, language = index, fence.group(1)
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
        marker = _MARKER.fullmatch(lines[start - 1].strip()) if start else None
        kind, value = (marker.group(1), marker.group(2)) if marker else (None, "")
        found.append(
            Block(
                language,
                "\n".join(lines[start + 1 : end]) + "\n",
                start + 1,
                file=value if kind == "file" else None,
                run=kind != "not run",
                output_of=value if kind == "output of" else None,
            )
        )
        index = end + 1
    return found


def section(markdown: str, heading: str) -> str:
    """The text under the heading line ``heading`` (``## Plugins``), up to the next one of its level or above."""
    level = heading.split(" ")[0]
    start = markdown.index(f"\n{heading}\n")
    headings = re.finditer(rf"^#{{1,{len(level)}}} ", markdown, re.MULTILINE)
    ends = [m.start() for m in headings if m.start() > start + 1]
    return markdown[start : ends[0] if ends else len(markdown)]


def write_guide(markdown: str, folder: Path) -> Path:
    """The runnable blocks as files: python into ``folder/plugins``, named others (recipes, data) into ``folder``."""
    plugins = folder / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    for block in blocks(markdown):
        if not block.run:
            continue
        if block.language == "python":
            (plugins / block.name).write_text(block.text, encoding="utf-8")
        elif block.file:
            (folder / block.file).write_text(block.text, encoding="utf-8")
    return folder


def load(plugins: Path):  # -> AlignPluginManager
    from align.plugin_manager import get_plugin_manager

    return get_plugin_manager(plugins_dir=plugins)


def align(command: str, cwd: Path):
    """Run an ``align ...`` command of the guide from ``cwd``, where its ``plugins/`` folder is."""
    words = shlex.split(command)
    assert words[0] == "align", command
    return run_align(*words[1:], cwd=cwd)


GUIDE_BLOCKS = blocks(GUIDE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the guide's plugins in ``plugins/`` and its recipes and data beside it."""
    return write_guide(GUIDE.read_text(encoding="utf-8"), tmp_path_factory.mktemp("guide"))


@pytest.fixture(scope="module")
def pm(guide: Path):
    return load(guide / "plugins")


# ---------------------------------------------------------------------------------------------------
# Every block runs, and registers what its section says
# ---------------------------------------------------------------------------------------------------


def test_every_python_block_of_the_guide_is_a_plugin_that_loads(pm):
    python = [b for b in GUIDE_BLOCKS if b.language == "python" and b.run]
    assert len(python) >= 8
    for block in python:
        plugin = pm.get_plugin(Path(block.name).stem)
        assert plugin is not None, f"the block at line {block.line} of docs/plugins.md was not loaded"
        assert pm.get_hookcallers(plugin), f"the block at line {block.line} implements no hook"


def test_each_plugin_registers_what_its_section_says(pm):
    loaded = {name for name, origin in pm.origins.items() if origin.source == "plugins-dir"}
    assert loaded == set(REGISTERS), "a plugin of the guide has no entry in REGISTERS, or one is gone"
    for plugin, registers in REGISTERS.items():
        assert pm.registered_by(plugin) == registers, plugin
    assert [c.name for c in pm.get_hookcallers(pm.get_plugin("house_rules"))] == ["align_recipe_loaded"]


def test_an_unmarked_block_runs_and_a_broken_one_fails(tmp_path):
    from align import AlignError

    page = (
        "<!-- not run -->\n```python\nraise SystemExit('never run')\n```\n\n"
        "```python\nfrom align import hookimpl\n\n\n@hookimpl\ndef align_register_stages():\n    return []\n```\n"
    )
    assert [b.run for b in blocks(page)] == [False, True]
    assert load(write_guide(page, tmp_path / "good") / "plugins").get_plugin("block_6") is not None

    broken = page + "\n```python\nimport no_such_module\n```\n"
    with pytest.raises(AlignError, match="block_15.py failed to import"):
        load(write_guide(broken, tmp_path / "broken") / "plugins")


def test_every_block_is_accounted_for():
    for block in GUIDE_BLOCKS:
        where = f"the {block.language} block at line {block.line} of docs/plugins.md"
        if block.language == "yaml" and block.run:
            assert block.file in RECIPES, f"{where}: a recipe no test runs; add it to RECIPES or mark it not run"
        if block.output_of:
            assert block.language == "text" and block.output_of.startswith("align "), where
    assert {b.file for b in GUIDE_BLOCKS if b.language == "yaml" and b.run} == RECIPES


def _imports_outside_the_public_api(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "align":
            public = getattr(importlib.import_module(node.module), "__all__", None)
            names = [alias.name for alias in node.names]
            if public is None or any(name not in public for name in names):
                problems.append(f"from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.startswith("align.")]
    return problems


def test_the_examples_use_only_the_public_api():
    readme = blocks(section(README.read_text(encoding="utf-8"), "## Plugins"))
    for block in [*GUIDE_BLOCKS, *readme]:
        if block.language == "python":
            assert _imports_outside_the_public_api(block.text) == [], f"block at line {block.line}"


def test_the_guide_lists_every_public_module_and_names_only_public_names():
    table = section(GUIDE.read_text(encoding="utf-8"), "### The public API")
    rows = dict(re.findall(r"^\| `(align(?:\.\w+)*)` \| (.*) \|$", table, re.MULTILINE))
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "align").rglob("*.py")}
    public = {
        name for name in modules if not name.endswith("__init__") and "__all__" in vars(importlib.import_module(name))
    }
    assert set(rows) == public | {"align"}
    for name, text in rows.items():
        module = importlib.import_module(name)
        named = [n for n in re.findall(r"`(\w+)`", text) if hasattr(module, n) or n[0].isupper() or "_" in n]
        assert set(named) <= set(module.__all__), name


def test_the_entry_points_are_valid_toml():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    (toml,) = [b for b in GUIDE_BLOCKS if b.language == "toml"]
    entry_points = tomllib.loads(toml.text)["project"]["entry-points"]["align"]
    assert entry_points and all(re.fullmatch(r"[\w.]+", module) for module in entry_points.values())


def test_the_readme_points_to_the_guide_and_its_example_loads(tmp_path):
    plugins = section(README.read_text(encoding="utf-8"), "## Plugins")
    assert "docs/plugins.md" in plugins
    (example,) = [b for b in blocks(plugins) if b.language == "python"]
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "example.py").write_text(example.text, encoding="utf-8")
    assert list(load(folder).registered_by("example")) == ["stage"]


# ---------------------------------------------------------------------------------------------------
# What the plugins do, quickly and in-process
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in GUIDE_BLOCKS if b.output_of], ids=lambda b: b.output_of)
def test_a_command_prints_what_the_guide_shows(block, guide):
    result = align(block.output_of, guide)
    assert result.returncode in (0, 2), result.stderr[-3000:]
    printed = result.stdout if result.returncode == 0 else result.stderr
    # What align prints comes last, after any warnings that libraries print while they load.
    assert printed.strip().endswith(f"\n{block.text.strip()}") or printed.strip() == block.text.strip(), printed


def test_the_format_reads_its_file_and_names_a_bad_row(pm, guide, tmp_path):
    from align import AlignError
    from align.data import dataset_dirs, load_examples, resolve

    formats = {name: entry.obj for name, entry in pm.registry("dataset format").items()}
    entry = resolve(str(guide / "shp.jsonl"), dataset_dirs(None))
    examples, report = load_examples(entry, formats)
    assert report.kept == 3 and all(e.is_preference for e in examples)
    assert examples[1].chosen["content"].startswith("Give it six hours")  # labels 0: reply B won
    assert examples[1].columns == {"post_id": "t3_a2"}  # unread columns travel with the example

    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in (guide / "shp.jsonl").read_text().splitlines()]
    bad.write_text("\n".join(json.dumps(r) for r in [rows[0], {**rows[1], "labels": 2}]), encoding="utf-8")
    with pytest.raises(AlignError, match=r"bad.jsonl row 1: the column 'labels' must be 1 \(A won\) or 0"):
        load_examples(resolve(str(bad), dataset_dirs(None)), formats)
    _, skipped = load_examples(resolve(str(bad), dataset_dirs(None)), formats, on_bad_row="skip")
    assert skipped.kept == 1 and dict(skipped.skipped) == {"wrong_type": 1}


def test_the_data_kind_keeps_conversations_and_turns_pairs_into_them(pm):
    from align import AlignError
    from align.conversation import Example
    from align.prepare import as_kind

    kind = pm.get("data kind", "demonstrations")
    user = {"role": "user", "content": "Review the cafe."}
    good, bad = {"role": "assistant", "content": "Lovely."}, {"role": "assistant", "content": "Dull."}
    conversation = Example([user, good])
    assert kind.holds(conversation) and not kind.holds(Example([user], chosen=good, rejected=bad))
    (converted,) = kind.convert(Example([user], chosen=good, rejected=bad))
    assert converted.messages == [user, good] and kind.holds(converted)
    assert kind.convert(Example([user])) is None  # a bare prompt is no demonstration
    pairs = [Example([user], chosen=good, rejected=bad)]
    assert as_kind(pairs, kind, pm, "demo_pref")[0].messages == [user, good]
    with pytest.raises(AlignError, match="dataset 'demo_pref' holds preferences, but this stage trains on conv"):
        as_kind(pairs, pm.get("data kind", "conversations"), pm, "demo_pref")  # the built-in sft's kind


def test_the_tracker_appends_the_run_and_every_row_to_its_file(pm, tmp_path):
    from types import SimpleNamespace

    from align.trackers import RunIdentity

    identity = RunIdentity("run/prune", "run", "prune", "prune", "f1", tmp_path)
    run = pm.get("tracker", "rows_file").open(SimpleNamespace(run_dir=tmp_path, name="prune"), identity)
    run.log({"loss": 0.5}, 1)
    run.log({"sparsity": 0.3}, 1)
    run.close("finished")
    rows = [json.loads(line) for line in (tmp_path / "rows" / "prune.jsonl").read_text().splitlines()]
    assert rows == [
        {"run": "run/prune", "fingerprint": "f1"},
        {"step": 1, "loss": 0.5},
        {"step": 1, "sparsity": 0.3},
        {"status": "finished"},
    ]


def test_the_reward_function_scores_repetition(pm):
    rule = pm.get("reward function", "distinct_words")
    assert rule(["p"] * 3, ["A lovely, quiet room.", "great great great great", ""]) == [1.0, 0.25, 0.0]


def test_the_engine_generates_greedily_as_the_batched_one_does(pm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.render import Renderer
    from align.rollout import Sampling

    path = str(tiny_llama())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompt = Renderer(tokenizer, 1024).prompt_ids([{"role": "user", "content": "Review the cafe."}])
    engine = pm.get("rollout engine", "one_by_one")
    session = engine.start(model, path, tokenizer, engine.Config())
    state = torch.random.get_rng_state()
    ours = session.generate([prompt], Sampling(max_new_tokens=8, greedy=True))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    hf = pm.get("rollout engine", "hf")
    assert ours == hf.start(model, path, tokenizer, hf.Config()).generate([prompt], Sampling(8, greedy=True))
    sampled = session.generate([prompt, prompt], Sampling(max_new_tokens=8, seed=3))
    assert sampled == session.generate([prompt, prompt], Sampling(max_new_tokens=8, seed=3))  # seeded
    assert all(0 < len(r) <= 8 for r in sampled)


def test_the_evaluator_counts_distinct_words_and_pairs(pm):
    from align.evaluation import Metric

    class Model:
        texts = ["the room was lovely", "the room was dull"]

    rows = pm.get("evaluator", "distinct_n").evaluate(None, Model())
    assert all(isinstance(row, Metric) for row in rows)
    assert {row.name: (row.value, row.n, row.headline) for row in rows} == {
        "distinct_1": (5 / 8, 8, False),
        "distinct_2": (4 / 6, 6, True),
    }


# ---------------------------------------------------------------------------------------------------
# The recipes, as the guide runs them
# ---------------------------------------------------------------------------------------------------


def run_recipe(guide: Path, recipe: str) -> dict:
    name = Path(recipe).stem
    result = align(f"align run {recipe} --run-dir runs/{name} --plugins-dir plugins", guide)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((guide / "runs" / name / "summary.json").read_text())["stages"]


@pytest.mark.slow
def test_the_trl_stage_trains_and_publishes_a_policy(guide):
    from transformers import AutoModelForCausalLM

    stages = run_recipe(guide, "cpo.yaml")
    assert stages["cpo"]["status"] == "done"
    metrics = stages["cpo"]["metrics"]
    assert metrics["steps"] == 4 and 0 <= metrics["eval_reward_accuracy"] <= 1 and metrics["eval_nll_loss"] > 0
    output = guide / "runs" / "cpo" / "cpo"
    assert json.loads((output / "align-manifest.json").read_text())["plugin"] == "cpo"
    AutoModelForCausalLM.from_pretrained(output)


@pytest.fixture(scope="module")
def pruned(guide: Path) -> dict:
    return run_recipe(guide, "prune.yaml")


@pytest.mark.slow
def test_the_stage_from_scratch_finds_its_policy_and_prunes_it(pruned, guide):
    from transformers import AutoModelForCausalLM

    assert [pruned[s]["status"] for s in ("sft", "prune")] == ["done", "done"]
    output = guide / "runs" / "prune" / "prune"
    manifest = json.loads((output / "align-manifest.json").read_text())
    assert manifest["inputs"]["policy"]["producer"] == "sft"  # found by capability, not named
    weight = AutoModelForCausalLM.from_pretrained(output).state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.3, abs=0.001)
    assert pruned["prune"]["metrics"]["sparsity"] == pytest.approx(0.3, abs=0.001)


@pytest.mark.slow
def test_the_evaluator_and_the_engine_report_in_align_eval(pruned, guide):
    (command,) = [b.text for b in GUIDE_BLOCKS if b.language == "sh" and "align eval" in b.text]
    result = align(command.replace("\\\n", " "), guide)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((guide / "runs" / "prune-eval" / "results.json").read_text())
    assert results["settings"]["engine"] == "one_by_one"
    metrics = results["models"]["pruned"]["metrics"]
    assert metrics["distinct_2"]["evaluator"] == "distinct_n" and metrics["distinct_2"]["headline"]
    assert 0 < metrics["distinct_1"]["value"] <= 1 and metrics["distinct_1"]["label"] == "distinct-1"
    assert metrics["distinct_words"]["evaluator"] == "reward_functions"
    assert {"kl", "response_length", "ended_share"} <= set(metrics)


@pytest.mark.slow
def test_the_stage_on_the_data_kind_trains_on_conversations_and_pairs(guide):
    stages = run_recipe(guide, "imitate.yaml")
    assert stages["imitate"]["status"] == "done" and stages["imitate"]["metrics"]["steps"] == 2
    report = json.loads((guide / "runs" / "imitate" / "logs" / "imitate.data.json").read_text())
    assert {r["dataset"]: r["kept"] for r in report["rendered"]} == {"demo_sft": 256, "demo_pref": 256}


def test_the_scoring_recipe_loads_and_a_misspelt_rule_is_refused(guide, pm):
    from align import AlignError
    from align.recipe import load_recipe

    recipe = load_recipe(guide / "score.yaml", [], pm)  # what `align config` and `align run` check first
    assert recipe.stages["sft"].config.score.reward_function == "distinct_words"
    with pytest.raises(AlignError, match="unknown reward function 'distinct_word' .did you mean 'distinct_words'"):
        load_recipe(guide / "score.yaml", ["stages.sft.score.reward_function=distinct_word"], pm)


def test_the_rank_estimator_orders_each_group_and_ignores_the_reward_scale(pm):
    import torch

    from align.rl.advantages import AdvantageInputs

    estimator = pm.get("advantage estimator", "group_rank")
    scores = torch.tensor([1.0, 5.0, 100.0, 3.0, 3.0, 0.0])
    mask = torch.ones(6, 2)
    inputs = AdvantageInputs(torch.zeros(6, 2), mask, torch.tensor([0, 0, 0, 1, 1, 1]), None, 1.0, 1.0)
    inputs.token_rewards[:, -1] = scores
    advantages, returns = estimator.estimate(inputs, None)
    assert returns is None
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-0.5, 0.0, 0.5, 0.25, 0.25, -0.5]))


@pytest.mark.slow
def test_the_dapo_stage_trains_with_the_rank_estimator(guide):
    result = align("align run rank.yaml --run-dir runs/rank --plugins-dir plugins", guide)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (guide / "runs/rank/logs/dapo.metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] is not None]
    assert len(steps) == 4 and all("uniform_group_share" in r for r in steps)  # DAPO's dynamic sampling
    assert (guide / "runs/rank/dapo/model.safetensors").exists()
    result = align("align config rank.yaml stages.dapo.num_generations=1 --plugins-dir plugins", guide)
    assert result.returncode == 2 and "'stages.dapo.num_generations' must be at least 2" in result.stderr
