"""Evaluation during training: `--eval-every` logs each evaluation (train_log.json, the progress output, the
learning curve); `--keep-best` keeps the best adapter among evaluations at the final budget; `--early-stopping`
stops after evaluations without improvement; all of it survives `--resume`; tracking to TensorBoard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import files, rundir
from adalora_cli.cli import app
from conftest import ON_CPU

runner = CliRunner()
HOOKED_CLI = Path(__file__).with_name("hooked_cli.py")
ROOT = Path(__file__).resolve().parents[1]


def args(model, glue_dir, out, method, *extra):
    return ["train", "--task", "sst2", "--method", method, "--model", model, "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--budget", "4k", "--max-steps", "12", "--batch-size", "8",
            "--max-train-samples", "96", "--max-eval-samples", "48", "--max-seq-length", "32", "--seed", "1",
            "--set", "adalora.t_init=2", "--set", "adalora.t_final=4", "--set", "adalora.delta_t=1",
            "--set", "logging_steps=2", *map(str, extra)]


def train(*command):
    result = runner.invoke(app, list(command))
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


def evaluations(out: Path) -> list[dict]:
    return [e for e in json.loads((out / rundir.TRAIN_LOG).read_text()) if "eval_accuracy" in e]


def test_keep_best_chooses_among_evaluations_at_the_final_budget(tiny_bert_dir, glue_dir, tmp_path):
    """AdaLoRA, 12 steps, final phase from step 9: the evaluations at steps 2-8 hold more than the budget and are
    shown but never chosen; the adapter kept is the best of steps 10 and 12, and `eval` holds its metrics."""
    out = tmp_path / "run"
    result = train(*args(tiny_bert_dir, glue_dir, out, "adalora", "--eval-every", 2, "--keep-best"))
    logged = evaluations(out)
    assert [e["step"] for e in logged] == [2, 4, 6, 8, 10, 12]
    assert [e["eval_at_final_budget"] for e in logged] == [False] * 4 + [True] * 2
    shown = [line for line in result.stderr.splitlines() if line.startswith("adalora: evaluation at step 2/12 ")]
    assert len(shown) == 1
    assert shown[0].endswith("(before the final budget: not used by --keep-best or --early-stopping)")
    metrics = json.loads((out / rundir.METRICS).read_text())
    eligible = {e["step"]: e["eval_accuracy"] for e in logged if e["eval_at_final_budget"]}
    best_step = max(eligible, key=lambda s: (eligible[s], -s))  # the first of equals, as the Trainer keeps it
    assert metrics["best"] == {"step": best_step, "metric": "accuracy", "value": eligible[best_step]}
    assert metrics["eval"]["accuracy"] == pytest.approx(eligible[best_step], abs=1e-6)  # the saved adapter's
    assert metrics["adapter_params"] <= 4000
    assert runner.invoke(app, ["eval", str(out)]).exit_code == 0
    assert json.loads((out / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], abs=1e-6)
    assert (out / "learning_curve.png").stat().st_size > 10_000


def test_early_stopping_counts_only_evaluations_at_the_final_budget(tiny_bert_dir, glue_dir, tmp_path):
    """With a learning rate too small to change anything, every evaluation scores the same: the run stops at the
    first evaluation that fails to improve on an earlier one at the final budget (for AdaLoRA: steps 10, then 11)."""
    lora, adalora = tmp_path / "lora", tmp_path / "adalora"
    train(*args(tiny_bert_dir, glue_dir, lora, "lora", "--eval-every", 1, "--early-stopping", 1, "--lr", 1e-12))
    assert json.loads((lora / rundir.METRICS).read_text())["steps"] == 2
    train(*args(tiny_bert_dir, glue_dir, adalora, "adalora", "--eval-every", 1, "--early-stopping", 1, "--lr", 1e-12))
    logged = evaluations(adalora)
    first_final = next(e["step"] for e in logged if e["eval_at_final_budget"])
    assert json.loads((adalora / rundir.METRICS).read_text())["steps"] == first_final + 1


def run_hooked(command, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(HOOKED_CLI), *map(str, command)], capture_output=True, text=True,
                          env=environment)


def test_keep_best_and_early_stopping_survive_resume(tiny_bert_dir, glue_dir, tmp_path):
    extra = ("--eval-every", 2, "--keep-best", "--early-stopping", 2, *ON_CPU)  # compared bit for bit
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run_hooked(args(tiny_bert_dir, glue_dir, reference, "adalora", *extra)).returncode == 0
    killed = run_hooked(args(tiny_bert_dir, glue_dir, resumed, "adalora", *extra), ADALORA_TEST_KILL_AFTER_SAVE="10")
    assert killed.returncode != 0 and not (resumed / rundir.METRICS).exists()
    again = run_hooked(["train", "--output-dir", resumed, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    ours, theirs = (json.loads((d / rundir.METRICS).read_text()) for d in (resumed, reference))
    assert ours["best"] == theirs["best"] and ours["steps"] == theirs["steps"]
    assert ours["eval"] == pytest.approx(theirs["eval"], abs=1e-6)
    a, b = files.load_tensors(resumed / rundir.ADAPTER), files.load_tensors(reference / rundir.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_gets_the_scalars_and_pictures(tiny_bert_dir, glue_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(*args(tiny_bert_dir, glue_dir, out, "adalora", "--eval-every", 4, "--report-to", "tensorboard"))
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/task_loss", "train/regulariser", "train/budget", "train/adapter_params",
                "eval/accuracy"):
        assert tag in scalars, (tag, sorted(scalars))
    assert {"rank_allocation", "learning_curve"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Scalars("eval/accuracy")] == [4, 8, 12]


def test_a_missing_tracker_is_one_line(tiny_bert_dir, glue_dir, tmp_path):
    code = "import sys; sys.modules['wandb'] = None; from adalora_cli.cli import app; app(prog_name='adalora')"
    proc = subprocess.run([sys.executable, "-c", code, *args(tiny_bert_dir, glue_dir, tmp_path / "run", "lora",
                                                             "--report-to", "wandb")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ('adalora: error: --report-to wandb needs the wandb package; run: '
                                   'pip install "adalora-cli[wandb]"')
    assert not (tmp_path / "run").exists()
