"""User errors end in one line on stderr with exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from adalora_cli.cli import app

runner = CliRunner()


def run_cli(args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, fragment, created=None):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalora: error:"), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if created is not None:
        assert not created.exists(), f"{created} was written"


def train_args(glue_dir, out, **overrides):
    options = {"--task": "sst2", "--method": "adalora", "--budget": "0.3M", "--model": "minilm-l6",
               "--data-dir": glue_dir, "--output-dir": out, "--max-steps": 2}
    options.update(overrides)
    args = ["train"]
    for key, value in options.items():
        if value is not None:
            args += [key, value]
    return args


@pytest.mark.parametrize("overrides, fragment", [
    ({"--task": "nope"}, "unknown task 'nope'"),
    ({"--method": "nope"}, "unknown method 'nope'"),
    ({"--budget": "0.3X"}, "not a parameter count"),
    ({"--budget": "-5"}, "not a parameter count"),
    ({"--budget": "0"}, "must be a positive parameter count"),
    ({"--budget": "20k"}, "below one rank per adapted matrix"),
    ({"--method": "lora", "--budget": "1k"}, "below one rank per adapted matrix"),
    ({"--data-dir": "/nonexistent/glue"}, "data directory /nonexistent/glue does not exist"),
    ({"--task": "qqp"}, "train file"),
    ({"--model": "/nonexistent/model"}, "cannot load model"),
    ({"--batch-size": "0"}, "batch_size must be at least 1"),
])
def test_train_user_errors(glue_dir, tmp_path, overrides, fragment):
    out = tmp_path / "run"
    assert_clean_failure(run_cli(train_args(glue_dir, out, **overrides)), fragment, created=out)


def test_non_empty_output_dir_needs_overwrite(glue_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(run_cli(train_args(glue_dir, out)), "pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_dev_file(glue_dir, tmp_path):
    task_dir = tmp_path / "SST-2"
    task_dir.mkdir()
    (task_dir / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    out = tmp_path / "run"
    assert_clean_failure(run_cli(train_args(tmp_path, out)), "validation file", created=out)


def test_eval_on_a_folder_that_is_not_a_run(tmp_path):
    assert_clean_failure(run_cli(["eval", tmp_path]), "is not a run directory")
    assert_clean_failure(run_cli(["eval", tmp_path / "missing"]), "does not exist")


def test_help_lists_commands_and_imports_no_torch():
    code = "import sys; from adalora_cli.cli import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = run_cli(["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "methods", "tasks"):
        assert command in result.stdout


def test_real_process_prints_one_line_and_exits_2(glue_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adalora_cli", "train", "--task", "sst2", "--budget", "0.3X",
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["adalora: error: budget '0.3X' is not a parameter count; "
                                                "write e.g. 300000, 300k or 0.3M"]
