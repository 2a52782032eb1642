"""Exact resume: a run killed (SIGKILL) right after a checkpoint and resumed with `--resume` ends with the same
rank pattern, rank history, metrics and bit-identical adapter and head as the same run never interrupted.

The interrupted run is a real process (tests/hooked_cli.py kills itself after checkpoint-6 when asked), and so
is its resumption; the uninterrupted reference runs in-process. All on the tiny local BERT with its dropout on, so that the resumed run also depends on the restored RNG state. The kill lands in
the middle of the first epoch (8 steps) and of each adaptive schedule, so the resumed run skips batches,
crosses an epoch boundary and keeps allocating.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import checkpoints, files, rundir
from adalora_cli.cli import app
from adalora_cli.methods import get_method
from conftest import ON_CPU

HOOKED_CLI = Path(__file__).with_name("hooked_cli.py")
ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {  # every method's state changes both before and after the kill at step 6 of 12
    "adalora": ["--set", "adalora.t_init=2", "--set", "adalora.t_final=3", "--set", "adalora.delta_t=1"],
    "prilora": ["--set", "prilora.prune_interval=2"],
    "dylora": [],
    "eva": [],  # no allocator: the resumed run repeats the data pass, which must give the same ranks
}


def run_in_process(args):
    """The uninterrupted reference, run in this process with one thread like the subprocesses (same sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.stderr[-3000:]


def run_cli(args, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(HOOKED_CLI), *map(str, args)], capture_output=True, text=True,
                          env=environment)


def train_args(model, glue_dir, out, method):
    return ["train", "--task", "sst2", "--method", method, "--model", model, "--data-dir", glue_dir,
            "--output-dir", out, "--budget", "4k", "--max-steps", "12", "--batch-size", "8",
            "--max-train-samples", "64", "--max-eval-samples", "48", "--max-seq-length", "32", "--seed", "3",
            "--set", "save_steps=3", "--set", "logging_steps=3", *ON_CPU, *SCHEDULES.get(method, [])]


@pytest.mark.parametrize("method", list(SCHEDULES))
def test_killed_then_resumed_run_equals_uninterrupted_run(tiny_bert_dir, glue_dir, tmp_path, method):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_in_process(train_args(tiny_bert_dir, glue_dir, reference, method))

    killed = run_cli(train_args(tiny_bert_dir, glue_dir, resumed, method), ADALORA_TEST_KILL_AFTER_SAVE="6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (resumed / rundir.METRICS).exists()
    assert (resumed / files.LOCK).is_file()  # left by the killed run; its lock died with it
    allocator = get_method(method).make_allocator is not None
    assert checkpoints.last_complete_checkpoint(resumed, allocator).name == "checkpoint-6"
    partial = resumed / rundir.CHECKPOINTS / "checkpoint-9"  # as if the kill had hit the next save halfway
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")

    again = run_cli(["train", "--output-dir", resumed, "--resume"])  # every other setting from config.yaml
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {resumed / rundir.CHECKPOINTS / 'checkpoint-6'}" in again.stderr

    for name in (rundir.RANK_PATTERN, rundir.ADAPTER_CONFIG) + ((rundir.RANK_HISTORY,) if allocator else ()):
        assert json.loads((resumed / name).read_text()) == json.loads((reference / name).read_text()), name
    ours, theirs = (json.loads((d / rundir.METRICS).read_text()) for d in (resumed, reference))
    assert ours["eval"] == pytest.approx(theirs["eval"], abs=1e-6)
    for key in ("steps", "adapter_params", "nonzero_adapter_params", "budget"):
        assert ours[key] == theirs[key], key
    for name in (rundir.ADAPTER, rundir.HEAD):
        a, b = files.load_tensors(resumed / name), files.load_tensors(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logged = [(e["step"], e["grad_norm"]) for e in json.loads((resumed / rundir.TRAIN_LOG).read_text()) if "grad_norm" in e]
    expected = [(e["step"], e["grad_norm"]) for e in json.loads((reference / rundir.TRAIN_LOG).read_text()) if "grad_norm" in e]
    assert logged == expected and len(logged) == 4  # steps 3, 6 (restored from the checkpoint), 9, 12


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same rank pattern, history, metrics and bit-identical adapter and head."""
    for name in (rundir.RANK_PATTERN, rundir.RANK_HISTORY, rundir.ADAPTER_CONFIG):
        assert json.loads((resumed / name).read_text()) == json.loads((reference / name).read_text()), name
    ours, theirs = (json.loads((d / rundir.METRICS).read_text()) for d in (resumed, reference))
    assert ours["eval"] == pytest.approx(theirs["eval"], abs=1e-6)
    for name in (rundir.ADAPTER, rundir.HEAD):
        a, b = files.load_tensors(resumed / name), files.load_tensors(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("method, signal_name, exit_code", [("adalora", "TERM", 143), ("prilora", "INT", 130)])
def test_signal_stops_after_a_checkpoint_and_resume_equals_uninterrupted_run(tiny_bert_dir, glue_dir, tmp_path,
                                                                            method, signal_name, exit_code):
    """SIGTERM (a scheduler, a spot instance) or a first Ctrl-C: the step in progress finishes, a complete
    checkpoint is written, one line names it and the resume command; the resumed run equals the uninterrupted one."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run_in_process(train_args(tiny_bert_dir, glue_dir, reference, method))

    # The signal arrives right after step 4; step 5 is then in progress: it finishes and is checkpointed.
    proc = run_cli(train_args(tiny_bert_dir, glue_dir, stopped, method), ADALORA_TEST_SIGNAL_AT_STEP=f"4:{signal_name}")
    assert proc.returncode == exit_code, proc.stderr[-3000:]
    checkpoint = stopped / rundir.CHECKPOINTS / "checkpoint-5"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"adalora: stopped by SIG{signal_name} after optimizer step 5 of 12; checkpoint {checkpoint} holds the run; "
        f"continue it with: adalora train --output-dir {stopped} --resume")
    assert "Traceback" not in proc.stderr
    assert checkpoints.last_complete_checkpoint(stopped, True) == checkpoint
    assert not (stopped / rundir.METRICS).exists()

    again = run_cli(["train", "--output-dir", stopped, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {checkpoint}" in again.stderr
    assert_same_run(stopped, reference)


def test_a_second_ctrl_c_aborts_at_once(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(train_args(tiny_bert_dir, glue_dir, out, "dylora"), ADALORA_TEST_SIGNAL_AT_STEP="4:INT:2")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "adalora: aborted"
    assert "Traceback" not in proc.stderr
    assert not (out / rundir.METRICS).exists()
    assert checkpoints.last_complete_checkpoint(out, True).name == "checkpoint-3"  # the regular save before it


def test_a_second_run_on_the_same_output_dir_is_refused(tiny_bert_dir, glue_dir, tmp_path):
    """Two `adalora train` on one --output-dir: the second (even with --overwrite) gets one line naming the first,
    exit 2, and changes nothing; the first finishes intact."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.write_text("")
    first = subprocess.Popen(
        [sys.executable, str(HOOKED_CLI), *map(str, train_args(tiny_bert_dir, glue_dir, out, "lora"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ADALORA_TEST_PAUSE_AT_STEP": "4",
             "ADALORA_TEST_GATE": str(gate)})
    try:
        paused = gate.with_suffix(".paused")
        for _ in range(1200):
            if paused.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert paused.exists(), first.communicate()[1][-3000:]
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        second = run_cli([*train_args(tiny_bert_dir, glue_dir, out, "lora"), "--overwrite"])
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"adalora: error: output directory {out} is being written by "
                                                       f"adalora train (pid {first.pid} on "), second.stderr
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    finally:
        gate.unlink(missing_ok=True)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert (out / rundir.METRICS).is_file() and (out / rundir.ADAPTER).is_file()
    # the lock is released at the end: the next run may write the folder
    assert files.RunLock(out).holder() is None


@pytest.mark.parametrize("after_step", [11, 12])  # between the last two optimizer steps, and after the last one
def test_sigterm_at_the_end_of_training_stops_and_resume_finishes_the_run(tiny_bert_dir, glue_dir, tmp_path,
                                                                         after_step):
    """A SIGTERM that lands when every optimizer step is done (or the last is in progress): the last step is
    checkpointed, the process exits 143 with one line saying training is complete and that --resume writes the run
    folder; the resumed run trains no further step and equals the uninterrupted one. (Before, a signal after the
    last step was ignored, and one between the last two steps ended with no word that training was complete.)"""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run_in_process(train_args(tiny_bert_dir, glue_dir, reference, "adalora"))

    proc = run_cli(train_args(tiny_bert_dir, glue_dir, stopped, "adalora"),
                   ADALORA_TEST_SIGNAL_AT_STEP=f"{after_step}:TERM")
    assert proc.returncode == 143, proc.stderr[-3000:]
    checkpoint = stopped / rundir.CHECKPOINTS / "checkpoint-12"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"adalora: stopped by SIGTERM after the last optimizer step (12 of 12): training is complete and checkpoint "
        f"{checkpoint} holds it; write the run folder and evaluate with: adalora train --output-dir {stopped} "
        "--resume")
    assert "Traceback" not in proc.stderr
    assert checkpoints.last_complete_checkpoint(stopped, True) == checkpoint
    assert not (stopped / rundir.METRICS).exists()

    again = run_cli(["train", "--output-dir", stopped, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {checkpoint}" in again.stderr
    assert_same_run(stopped, reference)
    assert json.loads((stopped / rundir.METRICS).read_text())["steps"] == 12
