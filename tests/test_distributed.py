"""Two CPU processes on the gloo backend (torchrun), through the real command line.

- Every process takes the same decisions: after every optimizer step the adapter tensors, AdaLoRA's masks,
  PRILoRA's pruned entries and input statistics, DyLoRA's drawn rank and every allocator state are
  bit-identical on both processes (tests/hooked_cli.py records a digest of them per step and process).
- The run directory is written once, by the main process: the other one writes none of its files.
- AdaLoRA on 2 processes x 4 examples equals 1 process x 8 (same examples per step): the importance
  statistics of the final checkpoint agree to float rounding, and so do the kept triplets.
- --gradient-checkpointing works under DDP (non-reentrant checkpointing).
- DeepSpeed ZeRO stages that would hide or undo what an allocator reads or edits are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import checkpoints, rundir
from adalora_cli.cli import app
from adalora_cli.methods import get_method
from conftest import ON_CPU

HOOKED_CLI = Path(__file__).with_name("hooked_cli.py")
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
RUN_FILES = {rundir.CONFIG, rundir.ADAPTER, rundir.HEAD, rundir.ADAPTER_CONFIG, rundir.TOKENIZER,
             rundir.RANK_PATTERN, rundir.RANK_HISTORY, rundir.TRAIN_LOG, rundir.METRICS, "rank_allocation.png",
             "learning_curve.png"}


def train_args(model, glue_dir, out, method, batch_size, *extra):
    return ["train", "--task", "sst2", "--method", method, "--model", model, "--data-dir", glue_dir,
            "--output-dir", out, "--budget", "4k", "--max-steps", "10", "--batch-size", batch_size,
            "--max-train-samples", "96", "--max-eval-samples", "32", "--max-seq-length", "32",
            "--set", "save_steps=5", "--set", "adalora.t_init=2", "--set", "adalora.t_final=3",
            "--set", "adalora.delta_t=1", "--set", "prilora.prune_interval=2", *ON_CPU, *extra]  # gloo on CPUs


def torchrun(args, trace: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "ADALORA_TEST_TRACE": str(trace), "CUDA_VISIBLE_DEVICES": ""}  # two CPU processes, also beside a GPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HOOKED_CLI), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, [json.loads((trace / f"rank{r}.json").read_text()) for r in (0, 1)]


def check_same_decisions_and_one_writer(proc, traces, out: Path, steps: int, run_files=RUN_FILES):
    main, other = traces
    assert len(main["steps"]) == steps and main["steps"] == other["steps"]  # bit-identical, step by step
    assert main["rank_pattern"] and main["rank_pattern"] == other["rank_pattern"]
    assert other["writes"] == []  # the second process writes nothing of the run directory
    written = [Path(p) for p in main["writes"]]
    assert len(written) == len(set(written)), "a run-directory file was written twice"
    assert {p.name for p in written if p.parent == out.resolve()} == run_files
    assert json.loads((out / rundir.RANK_PATTERN).read_text()) == main["rank_pattern"]
    assert [line.split()[0] for line in proc.stdout.splitlines()].count("run") == 1  # one summary: the main process's
    assert json.loads((out / rundir.METRICS).read_text())["steps"] == steps


def test_adalora_on_two_processes_with_gradient_checkpointing(tiny_bert_no_dropout_dir, glue_dir, tmp_path):
    model = tiny_bert_no_dropout_dir  # no dropout: the single-process run below computes the same gradients
    out = tmp_path / "ddp"
    proc, traces = torchrun(train_args(model, glue_dir, out, "adalora", 4, "--gradient-checkpointing"),
                            tmp_path / "trace")
    check_same_decisions_and_one_writer(proc, traces, out, 10)
    assert "evaluating on validation" in proc.stderr and proc.stderr.count("evaluating on validation") == 1

    single = tmp_path / "single"  # the same examples per step, in one process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = runner.invoke(app, train_args(model, glue_dir, single, "adalora", 8))
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.stderr
    two, one = (checkpoints.load_allocator_state(d / rundir.CHECKPOINTS / "checkpoint-10")[0] for d in (out, single))
    for a, b in zip(two["ipt"] + two["unc"], one["ipt"] + one["unc"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), "DDP importance differs"
    assert json.loads((out / rundir.RANK_PATTERN).read_text()) == json.loads((single / rundir.RANK_PATTERN).read_text())
    assert [torch.equal(a, b) for a, b in zip(two["kept"], one["kept"])] == [True] * len(one["kept"])


@pytest.mark.parametrize("method, extra", [
    ("prilora", ["--gradient-accumulation-steps", "2"]),  # input statistics summed over micro-batches and processes
    ("dylora", ["--eval-every", "2", "--keep-best"]),  # the same rank drawn, the same best chosen on both processes
    ("eva", []),  # the same data pass on both processes: the same ranks and initial A
])
def test_other_adaptive_methods_on_two_processes(tiny_bert_dir, glue_dir, tmp_path, method, extra):
    out = tmp_path / method
    proc, traces = torchrun(train_args(tiny_bert_dir, glue_dir, out, method, 4, *extra), tmp_path / "trace")
    adaptive = get_method(method).make_allocator is not None  # eva: no rank history or allocation picture
    check_same_decisions_and_one_writer(proc, traces, out, 10,
                                        RUN_FILES if adaptive else RUN_FILES - {"rank_history.json",
                                                                                "rank_allocation.png"})
    if "--keep-best" in extra:
        evaluations = [e for e in json.loads((out / rundir.TRAIN_LOG).read_text()) if "eval_accuracy" in e]
        assert [e["step"] for e in evaluations] == [2, 4, 6, 8, 10]
        assert json.loads((out / rundir.METRICS).read_text())["best"]["step"] in (2, 4, 6, 8, 10)


@pytest.mark.parametrize("method, stage, fragment", [
    ("adalora", 3, "ZeRO-3 partitions the weights"),
    ("lora", 3, "ZeRO-3 partitions the weights"),
    ("adalora", 2, "ZeRO-2 is not supported by adalora"),
    ("adalora", 1, "ZeRO-1 is not supported by adalora"),
    ("prilora", 2, "ZeRO-2 is not supported by prilora"),
])
@pytest.mark.parametrize("given_as", ["file", "inline", "accelerate"])
def test_deepspeed_zero_stages_that_break_a_method_are_refused(tiny_bert_dir, glue_dir, tmp_path, monkeypatch,
                                                               method, stage, fragment, given_as):
    extra = []
    if given_as == "file":
        config = tmp_path / "ds.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        extra = ["--set", f"trainer.deepspeed={config}"]
    elif given_as == "inline":
        extra = ["--set", f"trainer.deepspeed={{zero_optimization: {{stage: {stage}}}}}"]
    else:  # accelerate launch --use_deepspeed --zero_stage N
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(tiny_bert_dir, glue_dir, out, method, 4, *extra))
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_deepspeed_where_allowed_needs_deepspeed_installed(tiny_bert_dir, glue_dir, tmp_path):
    try:
        import deepspeed  # noqa: F401
        pytest.skip("DeepSpeed is installed here")
    except ImportError:
        pass
    extra = ["--set", "trainer.deepspeed={zero_optimization: {stage: 2}}"]
    result = runner.invoke(app, train_args(tiny_bert_dir, glue_dir, tmp_path / "run", "lora", 4, *extra))
    assert result.exit_code == 2 and "DeepSpeed is not installed; pip install deepspeed" in result.stderr
