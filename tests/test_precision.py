"""Precision on GPUs, checked on the CPU: `--precision` resolution and Trainer settings (GPUs faked), bf16
autocast training on the CPU, a step skipped by fp16 loss scaling feeding no allocator statistics (loss scaling
emulated on the CPU by tests/hooked_cli.py), and one GPU per process without torchrun (device count faked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adalora_cli import checkpoints, devices, files, rundir
from adalora_cli.config import RunConfig
from adalora_cli.errors import UserError
from conftest import ON_CPU, train_tiny

HOOKED_CLI = Path(__file__).with_name("hooked_cli.py")
ROOT = Path(__file__).resolve().parents[1]


def fake_gpu(monkeypatch, count=1, bf16=True, capability=(8, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_precision_follows_the_device(monkeypatch):
    no_gpu(monkeypatch)
    assert devices.resolve_precision("auto") == devices.Precision("fp32", tf32=False)
    fake_gpu(monkeypatch, bf16=True)  # an A100
    assert devices.resolve_precision("auto") == devices.Precision("bf16", tf32=True)
    assert devices.resolve_precision("fp32") == devices.Precision("fp32", tf32=True)
    assert devices.resolve_precision("auto").trainer_settings({}) == {"bf16": True, "fp16": False}
    on_cpu = RunConfig(task="sst2", trainer={"use_cpu": True})  # trains on the CPU beside the GPU: as without one
    assert on_cpu.compute_precision() == devices.Precision("fp32", tf32=False)
    fake_gpu(monkeypatch, bf16=False, capability=(7, 0))  # a V100: fp16 with loss scaling, no TF32
    assert devices.resolve_precision("auto") == devices.Precision("fp16", tf32=False)
    assert devices.resolve_precision("auto").trainer_settings({}) == {"bf16": False, "fp16": True}
    with pytest.raises(UserError, match="has no bfloat16; use --precision fp16"):
        devices.resolve_precision("bf16")


def test_precision_errors_without_a_gpu(monkeypatch):
    no_gpu(monkeypatch)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        devices.resolve_precision("fp16")
    with pytest.raises(UserError, match="trainer.bf16 is set by --precision"):
        devices.resolve_precision("fp32").trainer_settings({"bf16": True})


def test_tf32_is_set_for_the_command_and_restored_after():
    """TF32 is the process-wide float32 matmul precision: a command sets its precision's choice and puts back what
    was there, so that a later command (in the same process, as in a notebook) starts from the same state."""
    torch.set_float32_matmul_precision("highest")
    with devices.Precision("bf16", tf32=True).applied():
        assert torch.get_float32_matmul_precision() == "high"
        with devices.Precision("fp32", tf32=False).applied():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"


def test_bf16_autocast_trains_on_the_cpu(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    train_tiny("adalora", "--task", "sst2", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out,
               "--max-steps", "4", "--batch-size", "8", "--max-train-samples", "32", "--max-eval-samples", "16",
               "--max-seq-length", "32", "--precision", "bf16", "--set", "adalora.t_init=1", "--set", "adalora.t_final=1")
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert metrics["precision"] == "bf16"
    assert {t.dtype for t in files.load_tensors(out / rundir.ADAPTER).values()} == {torch.float32}


def test_every_command_computes_in_the_same_precision(tiny_bert_dir, glue_dir, tmp_path, monkeypatch):
    """Training, evaluation during and after training, `adalora eval` and `adalora predict` run every forward pass
    under the same float32 matmul precision (TF32 here, as on an Ampere or newer GPU) and the same autocast dtype.
    (Before, TF32 was switched on by the Trainer's arguments only, so on such GPUs `adalora eval` and `predict`
    computed in another precision than the training run's metrics.json.) Each command restores the setting it found."""
    from typer.testing import CliRunner

    from adalora_cli import models
    from adalora_cli.cli import app

    monkeypatch.setattr(devices, "tf32_available", lambda: True, raising=False)
    seen = []

    def record(module, args):
        device = next(module.parameters()).device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        seen.append((module.training, torch.get_float32_matmul_precision(), dtype))

    load_model = models.load_model

    def recording_load_model(*args, **kwargs):
        model, head = load_model(*args, **kwargs)
        model.classifier.register_forward_pre_hook(record)  # inside the forward: the Trainer's autocast wraps it
        return model, head

    monkeypatch.setattr(models, "load_model", recording_load_model)
    torch.set_float32_matmul_precision("highest")
    out, rows = tmp_path / "run", tmp_path / "rows.csv"
    train_tiny("lora", "--task", "sst2", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out,
               "--max-steps", "4", "--batch-size", "8", "--max-train-samples", "32", "--max-eval-samples", "16",
               "--max-seq-length", "32", "--precision", "bf16", "--eval-every", "2")
    trained = list(seen)
    assert torch.get_float32_matmul_precision() == "highest"
    runner = CliRunner()
    assert runner.invoke(app, ["eval", str(out)]).exit_code == 0
    assert torch.get_float32_matmul_precision() == "highest"
    rows.write_text("sentence\na gripping and funny film\nдосадно и скучно\n", encoding="utf-8")
    result = runner.invoke(app, ["predict", str(out), "--input", str(rows), "--output", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.stderr
    assert torch.get_float32_matmul_precision() == "highest"

    training = [s for s in trained if s[0]]
    evaluating = [s for s in trained if not s[0]]
    later = seen[len(trained):]
    assert len(training) == 4 * 1 and evaluating and later  # 4 steps of one micro-batch; 3 evaluations; eval, predict
    assert set(training) == {(True, "high", torch.bfloat16)}
    assert set(evaluating + later) == {(False, "high", torch.bfloat16)}


def run_hooked(args, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(HOOKED_CLI), *map(str, args)], capture_output=True, text=True,
                          env=environment)


def train_args(model, glue_dir, out, method, steps=12):
    return ["train", "--task", "sst2", "--method", method, "--model", model, "--data-dir", glue_dir,
            "--output-dir", out, "--budget", "4k", "--max-steps", str(steps), "--batch-size", "8",
            "--max-train-samples", "64", "--max-eval-samples", "16", "--max-seq-length", "32",
            "--set", "save_steps=12", "--set", "adalora.t_init=6", "--set", "adalora.t_final=3",
            "--set", "prilora.prune_interval=3", *ON_CPU]  # fp16 loss scaling is emulated on the CPU


@pytest.mark.parametrize("method", ["adalora", "prilora"])  # the allocators that keep statistics
def test_a_step_skipped_by_fp16_loss_scaling_feeds_no_allocator_statistics(tiny_bert_dir, glue_dir, tmp_path, method):
    """An inf gradient in optimizer step 4: the loss scaler skips it, and the allocator ignores it. The adapter and
    the allocator's state after step 4 are bit-identical to those after step 3, as if step 4's update never
    happened; the run goes on and ends with finite statistics (before, AdaLoRA's EMAs stayed NaN for good)."""
    out, trace = tmp_path / "run", tmp_path / "trace"
    proc = run_hooked(train_args(tiny_bert_dir, glue_dir, out, method), ADALORA_TEST_CPU_LOSS_SCALING="1",
                      ADALORA_TEST_INF_GRAD_AT="4", ADALORA_TEST_TRACE=str(trace))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((trace / "rank0.json").read_text())["steps"]
    assert [s["step"] for s in steps] == list(range(12))
    assert steps[3]["adapter"] == steps[2]["adapter"] and steps[3]["allocator"] == steps[2]["allocator"]
    assert steps[4]["adapter"] != steps[3]["adapter"]  # the next step trains again
    state = files.load_tensors(checkpoints.last_complete_checkpoint(out, True) / checkpoints.ALLOCATOR_TENSORS)
    weights = files.load_tensors(out / rundir.ADAPTER)
    for name, tensor in {**state, **weights}.items():
        assert torch.isfinite(tensor).all(), name
    assert (out / rundir.METRICS).is_file()


def test_many_skipped_steps_in_a_row_stop_the_run(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_hooked(train_args(tiny_bert_dir, glue_dir, out, "lora", steps=40), ADALORA_TEST_CPU_LOSS_SCALING="1",
                      ADALORA_TEST_INF_GRAD_AT="3-40")
    assert proc.returncode == 1, proc.stderr[-3000:]
    *_, note, error = proc.stderr.strip().splitlines()
    assert error == (
        "adalora: error: fp16 loss scaling skipped 25 optimizer steps in a row (steps 3-27): the gradients are not "
        "finite at any scale; train with --precision bf16 or fp32, or lower --lr")
    assert note == (  # a failed run names its last checkpoint (saved every 12 steps)
        f"adalora: training failed after optimizer step 26 of 40; the last complete checkpoint is "
        f"{out / rundir.CHECKPOINTS / 'checkpoint-24'}: once the cause is fixed, continue from it with: adalora train "
        f"--output-dir {out} --resume")
    assert not (out / rundir.METRICS).exists()


FAKE_GPUS = """
import logging, sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 4
torch.cuda.set_device = lambda device: None
torch.cuda.is_bf16_supported = lambda *a, **k: False
torch.cuda.get_device_capability = lambda *a, **k: (7, 0)  # four V100s
logging.basicConfig(format="%(message)s")
from adalora_cli.config import RunConfig
from adalora_cli.devices import Precision
from adalora_cli.pipeline import training_arguments
args = training_arguments(RunConfig(task="sst2", batch_size=8), sys.argv[1], 1e-3, Precision("fp16"), True)
print(args.n_gpu, args.train_batch_size, args.fp16)
"""


def test_several_gpus_without_torchrun_train_on_one(tmp_path):
    """The Trainer would wrap the model in nn.DataParallel (the logged loss becomes a vector, PRILoRA's hook runs on
    replicas): the process trains on one GPU and says how to use them all."""
    proc = subprocess.run([sys.executable, "-c", FAKE_GPUS, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "8", "True"]  # one GPU: no DataParallel, batch not multiplied
    assert "sees 4 GPUs but was not started by torchrun: training on one GPU" in proc.stderr
    assert "torchrun --nproc_per_node 4 -m adalora_cli train" in proc.stderr
