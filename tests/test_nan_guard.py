"""A NaN or infinite loss stops the run before that optimizer step is applied: one line naming the step and the
last good checkpoint, exit code 1, no checkpoint after the bad step, no metrics.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from adalora_cli import files, rundir
from adalora_cli.inject import find_targets, inject_adapters, mark_trainable
from adalora_cli.methods import get_method
from adalora_cli.training import AdapterTrainer, NonFiniteLoss
from conftest import ON_CPU, tiny_model
from test_training import synthetic_rows

HOOKED_CLI = Path(__file__).with_name("hooked_cli.py")
ROOT = Path(__file__).resolve().parents[1]


def test_nan_loss_through_the_cli(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--task", "sst2", "--method", "adalora", "--model", tiny_bert_dir, "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--budget", "4k", "--max-steps", "12", "--batch-size", "8",
            "--max-train-samples", "64", "--max-eval-samples", "16", "--max-seq-length", "32", "--set", "save_steps=2",
            *ON_CPU]  # the guard of runs without loss scaling (auto on an older GPU would be fp16)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ADALORA_TEST_NAN_AT_STEP": "7"}
    proc = subprocess.run([sys.executable, str(HOOKED_CLI), *args], capture_output=True, text=True, env=env)

    assert proc.returncode == 1, proc.stderr[-3000:]
    last = out / rundir.CHECKPOINTS / "checkpoint-6"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"adalora: error: loss became nan at optimizer step 7; the last good checkpoint is {last}; lower --lr "
        "(or --set max_grad_norm=...), check the data, and train again with --overwrite")
    assert proc.stderr.count("adalora: error:") == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert not (out / rundir.METRICS).exists() and not (out / rundir.ADAPTER).exists()
    assert sorted(p.name for p in (out / rundir.CHECKPOINTS).iterdir()) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    weights = files.load_tensors(last / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())  # saved before the poison: intact


class _PoisonLoss(AdapterTrainer):
    """Makes the loss of one micro-batch infinite."""

    def __init__(self, *args, bad_micro_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_micro_batch, self.micro_batches = bad_micro_batch, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.micro_batches += 1
        return loss + math.inf if self.micro_batches == self.bad_micro_batch else loss


class _Steps(TrainerCallback):
    def __init__(self):
        self.applied = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.applied.append(state.global_step + 1)


@pytest.mark.parametrize("bad_micro_batch, step", [(5, 3), (6, 3), (1, 1)])
def test_the_step_named_counts_optimizer_steps_and_is_never_applied(tmp_path, bad_micro_batch, step):
    model = tiny_model("bert")
    method = get_method("lora")
    cfg = method.config_cls(r=2)
    layers = inject_adapters(model, method, cfg, method.plan(find_targets(model, "bert"), None, cfg))
    mark_trainable(model, method, {n for n, _ in model.named_parameters() if n.startswith("classifier")})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=6, save_strategy="no", report_to="none", disable_tqdm=True,
                             dataloader_pin_memory=False)
    steps = _Steps()
    trainer = _PoisonLoss(model=model, args=args, train_dataset=synthetic_rows(), bad_micro_batch=bad_micro_batch,
                          callbacks=[steps])
    with pytest.raises(NonFiniteLoss) as raised:
        trainer.train()
    assert layers and (raised.value.step, raised.value.value) == (step, math.inf)
    assert str(raised.value) == f"loss became inf at optimizer step {step}"
    assert steps.applied == list(range(1, step))  # the bad step never reached the optimizer
