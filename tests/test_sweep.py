"""`adalora sweep`: a real tiny sweep (outputs, resume, a changed option, a failing cell), the plan+lora commands and
the resume decisions against a fake runner, bad inputs, and the tasks' headline score."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adalora_cli import sweep as sweeping
from adalora_cli.cli import app
from adalora_cli.sweep import PLAN_LORA, Cell, Sweep, run_sweep, same_settings
from adalora_cli.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


# -- the headline score a task reports ---------------------------------------------------------------------------

def test_glue_headline_is_the_mean_of_the_glue_metrics_times_100():
    assert get_task("mrpc").headline({"accuracy": 0.75, "f1": 0.85, "loss": 3.0}) == pytest.approx(80.0)
    assert get_task("stsb").headline({"pearson": 0.5, "spearmanr": 0.7}) == pytest.approx(60.0)
    assert get_task("mnli").headline({"accuracy": 0.8, "accuracy_mm": 0.6}) == pytest.approx(80.0)  # matched
    assert get_task("mrpc").headline_name == "mean of accuracy and f1 x 100"


def test_other_tasks_headline_is_their_main_metric():
    task = get_task("squad")
    assert task.headline({"exact_match": 61.0, "f1": 70.5}) == 61.0 and task.headline_name == "exact_match"


# -- a fake runner: what the commands would write ------------------------------------------------------------------

class FakeRunner:
    """Stands in for `python -m adalora_cli`: records every command; `train` writes config.yaml (the settings the
    sweep expects, as a run resolves them) and metrics.json, `plan` its plan file; `fail` names cells that exit 2."""

    def __init__(self, sweep: Sweep, fail=()):
        self.sweep, self.fail, self.calls = sweep, set(fail), []

    def __call__(self, argv, log, env):
        self.calls.append(argv)
        value = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        log.write_text(log.read_text() if log.exists() else "")
        if argv[0] == "plan":
            Path(value["--out"]).write_text(json.dumps({"kind": "adalora-cli rank plan", "version": 1}))
            return 0
        method = PLAN_LORA if "--rank-plan" in argv else value["--method"]
        cell = Cell(value["--task"], method, value["--budget"], int(value["--seed"]))
        if cell.name in self.fail:
            with open(log, "a") as f:
                f.write("adalora: error: budget 1 is below one rank per adapted matrix\n")
            return 2
        folder = Path(value["--output-dir"])
        folder.mkdir(parents=True, exist_ok=True)
        settings = sweeping.settings_of(self.sweep, cell)
        settings["lr"] = 5e-4  # resolved by the run
        (folder / "config.yaml").write_text(yaml.safe_dump(settings))
        params = int(value["--budget"].rstrip("k")) * 900
        (folder / "metrics.json").write_text(json.dumps({"adapter_params": params, "model": "m",
                                                         "eval": {"accuracy": 0.5 + params / 1e5, "f1": 0.5}}))
        return 0

    def trained(self):
        return [argv for argv in self.calls if argv[0] == "train"]


def fake_sweep(tmp_path, glue_dir, methods=("lora", PLAN_LORA), budgets=("2k", "4k"), **options):
    return Sweep(["mrpc"], list(methods), list(budgets), [0, 1], tmp_path / "out", workers=2,
                 options={"model": "minilm-l6", "data_dir": str(glue_dir), "max_steps": 3, **options},
                 plan_arguments=["--plan-fraction", "0.2"])


def test_plan_lora_plans_then_trains_lora_with_the_plan_and_a_second_sweep_runs_nothing(tmp_path, glue_dir):
    sweep = fake_sweep(tmp_path, glue_dir)
    runner = FakeRunner(sweep)
    results = run_sweep(sweep, runner, echo=lambda line: None)
    assert len(results) == 8 and {r["status"] for r in results} == {"finished"}
    cell = Cell("mrpc", PLAN_LORA, "4k", 1)
    plan_file = str(sweep.out / "plans" / f"{cell.name}.json")
    calls = [argv for argv in runner.calls if "--seed" in argv and argv[argv.index("--seed") + 1] == "1"
             and "4k" in argv and ("--rank-plan" in argv or argv[0] == "plan")]
    assert [argv[0] for argv in calls] == ["plan", "train"]
    plan, train = calls
    assert plan[-3:] == ["--out", plan_file, "--overwrite"] and "--plan-fraction" in plan and "--method" not in plan
    assert train[train.index("--method") + 1] == "lora" and train[train.index("--rank-plan") + 1] == plan_file
    assert train[-1] == "--overwrite" and train[train.index("--output-dir") + 1] == str(sweep.out / cell.name)
    for argv in (plan, train):  # the user's options reach both commands
        assert argv[argv.index("--max-steps") + 1] == "3" and argv[argv.index("--model") + 1] == "minilm-l6"
    lora = [argv for argv in runner.trained() if "--rank-plan" not in argv]
    assert len(lora) == 4 and all(argv[argv.index("--method") + 1] == "lora" for argv in lora)
    # mean of accuracy and F1 x 100, from metrics.json
    assert results[0]["score"] == pytest.approx(100 * (0.5 + 1800 / 1e5 + 0.5) / 2)

    again = FakeRunner(sweep)
    lines = []
    results = run_sweep(sweep, again, echo=lines.append)
    assert again.calls == [] and {r["ran"] for r in results} == {"skipped"}
    assert "8 of 8 cells finished before: skipped" in lines


def test_a_changed_option_reruns_and_an_unfinished_cell_resumes(tmp_path, glue_dir):
    sweep = fake_sweep(tmp_path, glue_dir)
    run_sweep(sweep, FakeRunner(sweep), echo=lambda line: None)
    unfinished = Cell("mrpc", PLAN_LORA, "2k", 0)
    (sweep.folder(unfinished) / "metrics.json").unlink()
    (sweep.folder(unfinished) / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    runner, lines = FakeRunner(sweep), []
    run_sweep(sweep, runner, echo=lines.append)
    assert runner.calls == [[*sweeping.commands(sweep, unfinished, "--resume")[0]]]
    assert runner.calls[0][0] == "train" and runner.calls[0][-1] == "--resume"  # the plan is kept
    assert f"{unfinished.name}: unfinished, training with --resume" in lines

    changed = fake_sweep(tmp_path, glue_dir, max_steps=4)
    runner = FakeRunner(changed)
    run_sweep(changed, runner, echo=lines.append)
    assert len(runner.trained()) == 8 and all(argv[-1] == "--overwrite" for argv in runner.trained())
    assert sum(argv[0] == "plan" for argv in runner.calls) == 4
    assert f"{Cell('mrpc', 'lora', '2k', 0).name}: settings changed, training with --overwrite" in lines

    dropped = fake_sweep(tmp_path, glue_dir, max_steps=4, lr=1e-3)  # an option given, then left out again
    run_sweep(dropped, FakeRunner(dropped), echo=lambda line: None)
    runner = FakeRunner(changed)
    run_sweep(changed, runner, echo=lines.append)
    assert len(runner.trained()) == 8


def test_a_failed_cell_is_reported_and_the_others_finish(tmp_path, glue_dir):
    sweep = fake_sweep(tmp_path, glue_dir, methods=("lora",))
    bad = Cell("mrpc", "lora", "2k", 1)
    lines = []
    results = run_sweep(sweep, FakeRunner(sweep, fail=[bad.name]), echo=lines.append)
    status = {Cell(r["task"], r["method"], r["budget"], r["seed"]).name: r["status"] for r in results}
    assert status.pop(bad.name) == "failed" and set(status.values()) == {"finished"}
    failed = next(r for r in results if r["status"] == "failed")
    assert failed["exit_code"] == 2 and "below one rank" in failed["error"]
    assert Path(failed["log"]).is_file() and any("FAILED (exit 2" in line for line in lines)
    table = (sweep.out / "sweep.md").read_text()
    assert "1 of 2 failed" in table and f"- {bad.name}: adalora: error: budget 1 is below" in table
    saved = {c["seed"]: c for c in json.loads((sweep.out / "sweep.json").read_text())["cells"] if c["budget"] == "2k"}
    assert saved[1]["status"] == "failed" and "score" not in saved[1] and saved[0]["status"] == "finished"


def test_same_settings_leaves_resolved_values_to_the_run_and_compares_paths(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    assert same_settings({"lr": None, "seed": 1, "adalora": {"t_init": 3}}, {"lr": 5e-4, "seed": 1,
                                                                              "adalora": {"t_init": 3, "x": 1}})
    assert not same_settings({"seed": 1}, {"seed": 2})
    assert not same_settings({"adalora": {"t_init": 3}}, {"adalora": {"t_init": 4}})
    assert same_settings({"data_dir": str(folder)}, {"data_dir": str(folder / ".." / "data")})
    assert not same_settings({"data_dir": str(folder)}, {"data_dir": str(tmp_path)})
    assert same_settings({"epochs": 3}, {"epochs": 3.0}) and not same_settings({"keep_best": False}, {"keep_best": 0})


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "lora", "bogus", "--budgets", "4k"], "unknown method 'bogus' in --methods"),
    (["--methods", "lora", "--budgets", "4k", "0.3X"], "budget '0.3X' is not a parameter count"),
    (["--methods", "lora", "lora", "--budgets", "4k"], "--methods names lora twice"),
    (["--methods", "lora", "--budgets", "4k", "--max-steps", "0"], "max_steps must be at least 1"),
    (["--methods", "lora", "--budgets", "4k", "--workers", "0"], "--workers must be at least 1"),
])
def test_bad_sweep_inputs_fail_in_one_line_before_any_run(tmp_path, glue_dir, args, fragment):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", "--tasks", "sst2", "mrpc", "--out", str(out), "--model", "minilm-l6",
                                      "--data-dir", str(glue_dir), *args])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalora: error:") and fragment in lines[0], result.stderr
    assert not out.exists()


def test_no_tasks_is_refused_before_any_run(tmp_path):
    with pytest.raises(sweeping.UserError, match="no tasks given; pass --tasks"):
        run_sweep(Sweep([], ["lora"], ["4k"], [0], tmp_path / "out"), FakeRunner(None))
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["sweep", "--methods", "lora", "--budgets", "4k", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Missing option '--tasks'" in result.stderr


# -- a real tiny sweep ------------------------------------------------------------------------------------------------

def sweep_command(out, model, glue_dir, *extra):
    return [sys.executable, "-m", "adalora_cli", "sweep", "--tasks", "sst2", "--out", str(out), "--model", model,
            "--data-dir", str(glue_dir), "--batch-size", "4", "--max-seq-length", "32", "--max-train-samples", "16",
            "--max-eval-samples", "16", "--set", "save_steps=100", "--precision", "fp32", *extra]


def run(command):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.slow
def test_real_tiny_sweep_writes_its_outputs_skips_finished_runs_and_reruns_a_changed_one(tmp_path, glue_dir,
                                                                                         tiny_bert_dir):
    out = tmp_path / "sweep"
    grid = ["--methods", "lora", "adalora", "plan+lora", "--budgets", "4k", "8k", "--seeds", "0", "--workers", "2",
            "--plan-steps", "2"]
    proc = run(sweep_command(out, tiny_bert_dir, glue_dir, *grid, "--max-steps", "2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert sorted((c["method"], c["budget"]) for c in cells) == [("adalora", "4k"), ("adalora", "8k"),
                                                                  ("lora", "4k"), ("lora", "8k"),
                                                                  ("plan+lora", "4k"), ("plan+lora", "8k")]
    for c in cells:
        assert c["status"] == "finished" and c["ran"] == "trained" and 0 < c["params"] <= c["budget_params"]
        assert 0 <= c["score"] <= 100 and c["score"] == pytest.approx(100 * c["metrics"]["accuracy"], abs=1e-3)
    params = {(c["method"], c["budget"]): c["params"] for c in cells}
    assert params["lora", "4k"] < params["lora", "8k"] and params["adalora", "4k"] < params["adalora", "8k"]
    table = (out / "sweep.md").read_text()
    assert "| method | 4k | 8k |" in table and "| lora | " in table and "| adalora | " in table
    assert "## sst2: accuracy x 100" in table
    from matplotlib.image import imread

    picture = imread(out / "sweep.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 500
    assert proc.stdout.count(" left") == 6 and "0 left" in proc.stdout
    for budget in ("4k", "8k"):  # plan+lora: plain LoRA with exactly the ranks of the cell's plan
        planned = json.loads((out / "plans" / f"sst2-plan+lora-{budget}-s0.json").read_text())
        trained = json.loads((out / f"sst2-plan+lora-{budget}-s0" / "rank_pattern.json").read_text())
        assert trained == {t["name"]: t["rank"] for t in planned["targets"] if t["rank"]}

    metrics = {c["folder"]: Path(c["folder"], "metrics.json").stat().st_mtime_ns for c in cells}
    proc = run(sweep_command(out, tiny_bert_dir, glue_dir, *grid, "--max-steps", "2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 of 6 cells finished before: skipped" in proc.stdout and " left" not in proc.stdout
    assert {f: Path(f, "metrics.json").stat().st_mtime_ns for f in metrics} == metrics
    again = json.loads((out / "sweep.json").read_text())["cells"]
    assert [c["score"] for c in again] == [c["score"] for c in cells] and {c["ran"] for c in again} == {"skipped"}

    proc = run(sweep_command(out, tiny_bert_dir, glue_dir, "--methods", "lora", "--budgets", "4k", "--max-steps", "3"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sst2-lora-4k-s0: settings changed, training with --overwrite" in proc.stdout
    assert json.loads((out / "sst2-lora-4k-s0" / "metrics.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_real_sweep_reports_a_cell_the_train_command_refuses_and_finishes_the_others(tmp_path, glue_dir,
                                                                                     tiny_bert_dir):
    out = tmp_path / "sweep"
    proc = run(sweep_command(out, tiny_bert_dir, glue_dir, "--methods", "lora", "--budgets", "500", "4k",
                             "--max-steps", "2", "--workers", "2"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cells = {c["budget"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert cells["4k"]["status"] == "finished" and cells["500"]["status"] == "failed"
    assert cells["500"]["exit_code"] == 2 and "below one rank per adapted matrix" in cells["500"]["error"]
    assert "below one rank" in Path(cells["500"]["log"]).read_text()
    assert "| lora | failed | " in (out / "sweep.md").read_text()
    assert "(2 cells, 1 failed)" in proc.stdout


def test_the_command_line_takes_lists_as_words_or_repeated_options_and_passes_train_options_on(
        tmp_path, glue_dir, monkeypatch):
    out = tmp_path / "out"
    grid = Sweep(["sst2", "mrpc"], ["lora", PLAN_LORA], ["2k", "4k"], [0, 3], out,
                 options={"model": "minilm-l6", "data_dir": str(glue_dir), "max_steps": 3, "keep_best": False})
    fake = FakeRunner(grid)
    monkeypatch.setattr(sweeping, "run_adalora", fake)
    result = CliRunner().invoke(app, ["sweep", "--tasks", "sst2", "--tasks", "mrpc", "--methods", "lora", PLAN_LORA,
                                      "--budgets", "2k", "4k", "--seeds", "0", "3", "--out", str(out), "--model",
                                      "minilm-l6", "--data-dir", str(glue_dir), "--max-steps", "3", "--no-keep-best",
                                      "--plan-steps", "5", "--workers", "3"])
    assert result.exit_code == 0, result.stdout + result.stderr
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert [(c["task"], c["method"], c["budget"], c["seed"]) for c in cells] == \
        [(c.task, c.method, c.budget, c.seed) for c in grid.cells()] and len(cells) == 16
    train = fake.trained()[0]
    assert train[train.index("--max-steps") + 1] == "3" and "--no-keep-best" in train
    plans = [argv for argv in fake.calls if argv[0] == "plan"]
    assert len(plans) == 8 and all(argv[argv.index("--plan-steps") + 1] == "5" for argv in plans)
    assert "(16 cells, 0 failed)" in result.stdout


def test_workers_split_the_cpu_threads():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert sweeping.worker_environment(1)["OMP_NUM_THREADS"] == str(cores)
    assert sweeping.worker_environment(cores * 2)["OMP_NUM_THREADS"] == "1"
    assert sweeping.worker_environment(2)["MKL_NUM_THREADS"] == str(max(1, cores // 2))


def test_the_table_shows_a_spread_only_over_several_seeds():
    def cell(seed, score):
        return {"task": "sst2", "method": "lora", "budget": "4k", "seed": seed, "status": "finished",
                "score": score, "params": 4000}

    one = sweeping.markdown([cell(0, 80.0)], ["sst2"], ["lora"], ["4k"])
    two = sweeping.markdown([cell(0, 80.0), cell(1, 82.0)], ["sst2"], ["lora"], ["4k"])
    assert "| lora | 80.0 (4.0k) |" in one and "+-" not in one.split("## sst2")[1]
    assert "| lora | 81.0 +- 1.4 (4.0k) |" in two
