"""What a person reads: the training log (as in a log file), the summary at the end of `adalora train`, the help at
80 columns, the `tasks` and `methods` tables, and export's one line."""

from __future__ import annotations

import io
import logging
import re

import pytest
import typer
from typer.testing import CliRunner

from adalora_cli import cli
from adalora_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tiny_bert_dir, glue_dir, tmp_path_factory):
    """One tiny LoRA run on SST-2 with evaluation every 2 steps and early stopping, and its output."""
    out = tmp_path_factory.mktemp("output") / "run"
    result = runner.invoke(app, ["train", "--task", "sst2", "--method", "lora", "--model", tiny_bert_dir,
                                 "--data-dir", str(glue_dir), "--output-dir", str(out), "--budget", "4k",
                                 "--max-steps", "6", "--batch-size", "8", "--max-train-samples", "64",
                                 "--max-eval-samples", "32", "--max-seq-length", "32", "--eval-every", "2",
                                 "--early-stopping", "5", "--set", "logging_steps=2"])
    assert result.exit_code == 0, result.stderr + result.stdout
    return out, result


def test_train_ends_with_one_summary(run):
    out, result = run
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == [
        "run", "result", "method", "classes", "files", "next"]
    assert lines[0].split() == ["run", str(out)]
    assert re.fullmatch(r"result +accuracy 0\.\d{4} on validation \(32 rows\), after 6 optimizer steps in \d+ s",
                        lines[1]), lines[1]
    assert lines[2].split(None, 1) == ["method", "lora, 3,584 adapter parameters (budget 4.0k)"]  # rank 4 x 896
    assert lines[3].split(None, 1) == ["classes", "negative, positive"]
    assert [line.strip() for line in lines[-3:]] == [
        f"next    adalora eval {out}", f"adalora predict {out} --input FILE",
        f"adalora export-adapter {out} --format peft --out DIR"]
    column = lines[0].index(str(out))  # every value starts in the same column
    assert all(line[column - 1] == " " and line[column] != " " for line in lines)


def test_the_training_log_reads_well_in_a_file(run):
    _, result = run
    log = result.stderr
    assert "\x1b[" not in log and "\r" not in log and "Writing model shards" not in log  # no bars in a log
    assert all(line.startswith("adalora: ") for line in log.splitlines()), log
    steps = re.findall(r"^adalora: step (\d+)/6 \(epoch [\d.]+\): loss [\d.]+, grad_norm [\d.]+", log, re.M)
    assert steps == ["2", "4", "6"], log
    evaluations = re.findall(r"^adalora: evaluation at step (\d+)/6 \(epoch [\d.]+\): accuracy 0\.\d+$", log, re.M)
    assert evaluations == ["2", "4", "6"], log
    assert "'" not in log.split("trainable parameters")[1]  # numbers as numbers, not quoted strings


def test_a_message_never_lands_on_the_progress_bar_line(monkeypatch):
    """On a terminal the bar is redrawn in place; a log line written while it shows must start a line of its own."""
    from tqdm import tqdm

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logger = logging.getLogger("test-output-bar")
    logger.addHandler(cli._StderrHandler())
    logger.propagate = False
    bar = tqdm(total=10, file=stream, dynamic_ncols=False, ncols=60, mininterval=0)
    bar.update(3)
    logger.warning("early stopping at step 3")
    bar.close()
    before = stream.getvalue().split("early stopping at step 3")[0]
    assert "%|" in before  # the bar was drawn
    assert re.split(r"[\r\n]", before)[-1] == "", repr(before[-80:])


def option_names(command: str) -> list[str]:
    click_command = typer.main.get_command(app).commands[command]
    return [name for param in click_command.params for name in param.opts + param.secondary_opts]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "export-adapter", "sweep"])
def test_help_at_80_columns_shows_every_option_name_whole(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    text = result.stdout
    for name in option_names(command):
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} is not shown whole"
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text


def test_train_help_groups_its_options():
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).stdout
    sections = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ")]
    assert sections[-3:] == ["Options", "Data", "Evaluation during training"]
    assert "[default: adalora]" in text and "(adalora)" not in text


@pytest.mark.parametrize("command", ["tasks", "methods"])
def test_tables_are_aligned(command):
    lines = runner.invoke(app, [command]).stdout.splitlines()
    starts = {len(line) - len(line.split(None, 1)[1]) for line in lines}
    assert len(starts) == 1, lines


def test_export_says_once_what_it_wrote(run, tmp_path):
    out, _ = run
    result = runner.invoke(app, ["export-adapter", str(out), "--format", "merged", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [f"wrote the merged export of {out} to {tmp_path / 'm'}"]
    assert result.stderr == ""
