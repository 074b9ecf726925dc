"""What a user sees while a run works: a few readable lines and one progress bar per stage on the terminal,
and everything else (libraries' bars and warnings, every logged row of metrics) in logs/run.log."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import align
from align import console as console_module
from align.console import Console
from align.errors import AlignError
from align.progress import Progress, format_duration, headline
from conftest import REPO, run_align

#: Carriage returns and escape sequences: what a log must not hold.
CONTROL = re.compile(r"[\r\x1b]")

#: What libraries print during the quickstart, which the user need not see.
NOISE = (
    "Loading weights",
    "Writing model shards",
    "Setting accelerator to CPU",
    "Removed shared tensor",
    "Could not find a config file",
    "{'loss'",
    "{'train_runtime'",
)


# ------------------------------------------------------------------------------------- the quickstart
def test_the_quickstart_prints_a_few_plain_readable_lines(quickstart):
    text = (quickstart.parent / "terminal.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 40, text  # 97 before align captured what libraries print
    assert max(len(line) for line in lines) <= 160, text
    assert not CONTROL.search(text), "a log that is no terminal gets plain lines"
    for noise in NOISE:
        assert noise not in text, noise


def test_each_stage_headline_shows_its_key_metrics(quickstart):
    text = (quickstart.parent / "terminal.txt").read_text(encoding="utf-8")
    headlines = dict(re.findall(r"\[\d/5\] (\w+): done in [\d.]+ s \((.*)\)", text))
    assert set(headlines) == {"sft", "rm", "ppo", "dpo", "eval"}, text
    number = r"-?[\d.]+(?:e-?\d+)?"
    assert re.match(rf"loss {number} → {number}, task_score {number}$", headlines["sft"]), headlines["sft"]
    assert re.match(rf"loss {number} → {number}, held-out accuracy {number}$", headlines["rm"]), headlines["rm"]
    assert re.match(
        rf"loss {number} → {number}, held-out reward_accuracy {number}, task_score {number}$", headlines["dpo"]
    ), headlines["dpo"]
    assert re.match(rf"reward {number} → {number}, task_score {number} → {number}$", headlines["ppo"]), headlines["ppo"]
    assert re.match(rf"ppo_win_rate {number}, dpo_win_rate {number}, sft_win_rate {number}$", headlines["eval"])


def test_the_run_log_keeps_what_the_terminal_leaves_out(quickstart):
    log = (quickstart / "logs" / "run.log").read_text(encoding="utf-8")
    for noise in NOISE[:4]:
        assert noise in log, noise
    assert re.search(r" OUTPUT: Loading weights: 100%", log), "a library's bar: its last state, one line"
    assert not CONTROL.search(log)
    # Every logged row of metrics, readable: TRL's and the RL loop's alike.
    assert re.search(r"DEBUG align\.sft:   sft step 25: loss [\d.]+, grad_norm", log)
    assert re.search(r"DEBUG align\.dpo:   dpo step 10: loss [\d.]+, .*rewards/accuracies [\d.]+", log)
    assert re.search(r"DEBUG align\.ppo:   ppo step 5: reward -?[\d.]+, .*kl -?[\d.]+", log)
    assert re.search(r"INFO align: \[3/5\] ppo: done in", log)


# ---------------------------------------------------------------------------------- on a terminal
RECIPE = """\
model: tiny-llama
stages:
  sft:
    data: demo_sft
    max_steps: 30
    batch_size: 16
    learning_rate: 1.0e-3
    logging_steps: 10
  rm:
    data: demo_pref
    max_steps: 8
    batch_size: 16
    learning_rate: 1.0e-3
    logging_steps: 4
  ppo:
    data: demo_prompts
    steps: 4
    batch_size: 16
    mini_batch_size: 16
    max_new_tokens: 12
    logging_steps: 2
  eval:
    reference: sft
    prompts: demo_prompts_test
    samples: 32
    max_new_tokens: 12
"""


def on_a_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """Run ``align`` with a pseudo-terminal for its output, as a user's shell would; returns what it wrote."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "align.cli", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the last writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return process.wait(timeout=600), b"".join(chunks).decode("utf-8", errors="replace")


def screen(text: str) -> list[str]:
    """The lines a terminal shows once ``text`` was written: a carriage return goes back to the start of
    the line, ``ESC[K`` erases the rest of it."""
    shown = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line: list[str] = []
        column = 0
        for token in re.split(r"(\r|\x1b\[[0-9;?]*[A-Za-z])", raw):
            if token == "\r":
                column = 0
            elif token.startswith("\x1b["):
                if token.endswith("K"):
                    del line[column:]
            else:
                for character in token:
                    line[column : column + 1] = [character]
                    column += 1
        shown.append("".join(line).rstrip())
    return [line for line in shown if line]


@pytest.mark.slow
def test_on_a_terminal_every_stage_draws_one_bar_and_leaves_its_headline(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    status, text = on_a_terminal("run", "recipe.yaml", cwd=tmp_path)
    assert status == 0, text
    bar = r"[█·]{20} "
    assert re.search(rf"\rsft {bar}\d+/30 steps  \d:\d\d<\d:\d\d  loss [\d.]+", text), text
    assert re.search(rf"\rrm {bar}\d+/8 steps  \d:\d\d<\d:\d\d  loss [\d.]+, accuracy [\d.]+", text), text
    assert re.search(rf"\rppo {bar}\d/4 steps  \d:\d\d<\d:\d\d  reward -?[\d.]+, kl -?[\d.e-]+", text), text
    # Generation too: the reference (sft, also a policy) and ppo, 32 prompts each.
    assert re.search(rf"\reval generating {bar}\d+/64 responses", text), text
    shown = screen(text)
    assert not any(re.search(r"[█·]{20}", line) for line in shown), "a finished bar is erased"
    assert len(shown) <= 20, "\n".join(shown)
    assert [line.split(":")[0] for line in shown if re.match(r"\[\d/4\] \w+: done", line)] == [
        "[1/4] sft",
        "[2/4] rm",
        "[3/4] ppo",
        "[4/4] eval",
    ]
    for noise in NOISE:
        assert noise not in text, noise


@pytest.mark.slow
def test_verbose_shows_what_libraries_print_and_every_row_of_metrics(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE.split("  rm:")[0], encoding="utf-8")
    result = run_align("run", "recipe.yaml", "-v", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Loading weights" in result.stderr
    assert re.search(r"  sft step 10: loss [\d.]+, grad_norm", result.stderr)
    quiet = run_align("run", "recipe.yaml", "--force", "sft", cwd=tmp_path)
    assert "Loading weights" not in quiet.stderr and "sft step 10" not in quiet.stderr


# ------------------------------------------------------------------------------------ the capture
CAPTURED = """\
import logging, os, subprocess, sys
from pathlib import Path
from align.console import capture

with capture(Path(sys.argv[1]), show=sys.argv[2] == "show", verbose=sys.argv[3] == "verbose", label=sys.argv[4]):
    print("a library prints")
    os.write(2, b"a C extension's bar 10%\\r a C extension's bar 100%\\r\\n")
    subprocess.run([sys.executable, "-c", "print('a worker process prints')"], check=True)
    logging.getLogger("align").info("align speaks")
    logging.getLogger("align").debug("align's detail")
    logging.getLogger("transformers").warning("a library warns")
print("after the run")
"""


def captured(tmp_path: Path, show: str = "show", verbose: str = "quiet", label: str = "") -> tuple[str, str]:
    log = tmp_path / "run.log"
    result = subprocess.run(
        [sys.executable, "-c", CAPTURED, str(log), show, verbose, label],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr + result.stdout, log.read_text(encoding="utf-8")  # align speaks on stderr


def test_capture_keeps_everything_in_the_log_and_shows_align_only(tmp_path):
    terminal, log = captured(tmp_path)
    assert terminal.splitlines() == ["align speaks", "after the run"]
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} OUTPUT: a library prints$", log, re.M)
    assert "OUTPUT:  a C extension's bar 100%\n" in log and "10%" not in log
    assert "OUTPUT: a worker process prints" in log
    assert "OUTPUT: a library warns" in log
    assert "INFO align: align speaks" in log and "DEBUG align: align's detail" in log
    assert "after the run" not in log


def test_verbose_capture_shows_everything(tmp_path):
    terminal, _ = captured(tmp_path, verbose="verbose")
    for line in ("a library prints", "a worker process prints", "a library warns", "align's detail", "align speaks"):
        assert line in terminal


def test_another_process_only_adds_its_output_to_the_log_with_its_rank(tmp_path):
    terminal, log = captured(tmp_path, show="hide", label="rank 1")
    assert terminal.splitlines() == ["after the run"]
    assert "OUTPUT rank 1: a library prints" in log
    assert "align speaks" not in log  # the main process keeps the books


# ---------------------------------------------------------------------------------- the bar itself
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr("align.progress.time.perf_counter", fake)
    return fake


def a_console(monkeypatch, terminal: bool) -> io.StringIO:
    out = io.StringIO()
    shown = Console(out)
    shown.is_terminal = terminal
    monkeypatch.setattr(console_module, "_active", shown)
    return out


def test_in_a_log_a_bar_is_a_plain_line_at_each_quarter_and_each_minute(monkeypatch, clock):
    out = a_console(monkeypatch, terminal=False)
    bar = Progress("ppo", 100)
    clock.now = 5
    bar.update(30, numbers={"reward": 0.5})
    assert out.getvalue() == "", "nothing in the first seconds: the headline comes soon enough"
    clock.now = 12
    bar.update(31)
    assert out.getvalue() == "  ppo: 31/100 steps (31%), 0:12, about 0:27 left: reward 0.5\n"
    clock.now = 13
    bar.update(40, numbers={"reward": 0.75, "kl": 0.01})
    assert out.getvalue().count("\n") == 1
    clock.now = 80
    bar.update(45)
    assert out.getvalue().splitlines()[-1] == "  ppo: 45/100 steps (45%), 1:20, about 1:38 left: reward 0.75, kl 0.01"
    clock.now = 90
    bar.update(100)
    bar.close()
    assert out.getvalue().count("\n") == 2, "no line at the end: the stage's headline follows"
    assert not CONTROL.search(out.getvalue())


def test_in_a_log_two_plain_lines_are_at_least_ten_seconds_apart(monkeypatch, clock):
    out = a_console(monkeypatch, terminal=False)
    bar = Progress("sft", 150)
    clock.now = 10
    bar.update(110)  # the first line, on the third quarter
    clock.now = 10.3
    bar.update(113)  # the fourth quarter starts, but a line was just written
    clock.now = 21
    bar.update(140)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "  sft: 110/150 steps",
        "  sft: 140/150 steps",
    ]


def test_on_a_terminal_a_bar_is_redrawn_in_place_and_lines_go_above_it(monkeypatch, clock):
    out = a_console(monkeypatch, terminal=True)
    resumed = Progress("grpo", 10, done=4)
    clock.now = 3
    resumed.update(7)
    assert out.getvalue().endswith("\rgrpo ██████████████······ 7/10 steps  0:03<0:03\x1b[K")
    console_module.active().line("  data x: read 3 rows")  # type: ignore[union-attr]
    assert out.getvalue().endswith("\r\x1b[K  data x: read 3 rows\ngrpo ██████████████······ 7/10 steps  0:03<0:03")
    resumed.close()
    assert out.getvalue().endswith("\r\x1b[K")
    assert screen(out.getvalue()) == ["  data x: read 3 rows"]


def test_without_a_console_a_bar_does_nothing(clock):
    bar = Progress("sft", 3)  # no run in progress: a stage used as a library prints nothing
    bar.update(advance=2, numbers={"loss": 1.0})
    bar.close()
    assert bar.done == 2


def test_durations_read_as_clocks():
    assert [format_duration(s) for s in (0, 7.4, 750, 3723)] == ["0:00", "0:07", "12:30", "1:02:03"]


def test_a_headline_shows_changes_held_out_values_and_one_value_per_policy():
    metrics = {
        "train_loss": 1.8,
        "steps": 150,
        "first_loss": 4.8463,
        "last_loss": 0.7692,
        "train_accuracy": 0.9,
        "eval_accuracy": 1.0,
        "task_score_before": -0.034,
        "task_score": 0.8,
    }
    assert headline(metrics, ("loss", "accuracy", "task_score")) == (
        "loss 4.846 → 0.7692, held-out accuracy 1, task_score -0.034 → 0.8"
    )
    assert headline({"reward_first": 0.5, "reward_last": 2.0, "steps": 3}, ("reward", "kl")) == "reward 0.5 → 2"
    assert headline({"ppo_win_rate": 0.86, "dpo_win_rate": 0.75, "ppo_kl": 3.0}, ("win_rate",)) == (
        "ppo_win_rate 0.86, dpo_win_rate 0.75"
    )
    # A stage that names none, or none that it reports: task_score first, then the first few.
    assert headline({"a": 1, "b": 2, "task_score": 0.5}, ()) == "task_score 0.5, a 1, b 2"
    assert headline({"a": 1}, ("loss",)) == "a 1"


# ------------------------------------------------------------------------------------- the Python API
SFT = {
    "model": "tiny-llama",
    "stages": {"sft": {"data": "demo_sft", "max_steps": 4, "batch_size": 8, "logging_steps": 2}},
}


def test_align_run_runs_a_recipe_given_as_data_and_returns_its_summary(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(REPO)
    summary = align.run(SFT, {"stages.sft.max_steps": 6}, run_dir=tmp_path / "run")
    assert summary.status == "done" and summary.error is None
    assert summary.stages["sft"].status == "done" and summary.stages["sft"].metrics["steps"] == 6
    assert (tmp_path / "run" / "sft" / "align-manifest.json").is_file()
    assert SFT["stages"]["sft"]["max_steps"] == 4, "the caller's recipe is left as it was"
    printed = capfd.readouterr()
    assert "[1/1] sft: done in" in printed.err and "Loading weights" not in printed.err + printed.out
    again = align.run(REPO / "examples" / "sft.yaml", ["stages.sft.max_steps=6"], run_dir=tmp_path / "run2")
    assert again.status == "done"


def test_align_run_refuses_bad_input_with_an_align_error(tmp_path):
    with pytest.raises(AlignError, match="did you mean 'max_steps'"):
        align.run(SFT, {"stages.sft.max_stepz": 3}, run_dir=tmp_path / "run")
    with pytest.raises(AlignError, match="not the string"):
        align.run(SFT, "stages.sft.max_steps=3", run_dir=tmp_path / "run")  # type: ignore[arg-type]
    with pytest.raises(AlignError, match="asks for 2") as refused:
        align.run(SFT, {"backend": {"kind": "ddp", "num_processes": 2}}, run_dir=tmp_path / "run")
    assert "align run" in (refused.value.hint or "")
    assert not (tmp_path / "run").exists(), "refused before anything was written"
