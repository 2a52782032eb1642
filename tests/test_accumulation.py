"""Gradient accumulation: AdaLoRA with micro-batches of 8 x 4 accumulation steps and with batches of 32 x 1, on the
same data and seed, allocates at the same optimizer steps, with the same budgets, and keeps the same triplets.

Both runs see the same 32 examples at every optimizer step (the Trainer's sampler draws one order; 8 x 4 takes
it in four slices). With dropout off, the accumulated gradient is the same mean over 32 examples computed in
another order, so the importance scores agree to float rounding (about 1e-7 relative), not bit for bit: the
kept sets are compared exactly, and so that the comparison is meaningful the test also checks that the
scores agree to 1e-5 and that the ranking they induce is the same at every step, i.e. no two triplets are
closer than the rounding noise. (Scores that differed by a constant factor would also rank alike: the
score check is what catches a loss scaled by the number of micro-batches.)
"""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from adalora_cli import rundir, training
from adalora_cli.cli import app
from conftest import ON_CPU

runner = CliRunner()
ON_OPTIMIZER_STEP = training.AllocationCallback.on_optimizer_step


def train(model, glue_dir, out, batch_size, accumulation, monkeypatch):
    steps = []

    def record(self, args, state, control, **kwargs):
        ON_OPTIMIZER_STEP(self, args, state, control, **kwargs)
        allocator = self.allocator
        steps.append({"step": state.global_step, "budget": allocator.budget,
                      "kept": torch.cat([layer.kept for layer in allocator.layers]).clone(),
                      "scores": allocator.triplet_scores().clone()})

    monkeypatch.setattr(training.AllocationCallback, "on_optimizer_step", record)
    args = ["train", "--task", "sst2", "--method", "adalora", "--model", model, "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--budget", "4k", "--max-steps", "24", "--batch-size", str(batch_size),
            "--gradient-accumulation-steps", str(accumulation), "--max-train-samples", "768",
            "--max-eval-samples", "64", "--max-seq-length", "32", "--lr", "5e-3", "--set", "save_steps=1000",
            "--set", "adalora.t_init=4", "--set", "adalora.t_final=8", "--set", "adalora.delta_t=2",
            *ON_CPU]  # compared to the CPU's float32 rounding
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return steps, json.loads((out / rundir.RANK_HISTORY).read_text())


def test_accumulated_and_whole_batches_allocate_alike(tiny_bert_no_dropout_dir, glue_dir, tmp_path, monkeypatch):
    accumulated, history_a = train(tiny_bert_no_dropout_dir, glue_dir, tmp_path / "8x4", 8, 4, monkeypatch)
    whole, history_w = train(tiny_bert_no_dropout_dir, glue_dir, tmp_path / "32x1", 32, 1, monkeypatch)

    assert [s["step"] for s in accumulated] == [s["step"] for s in whole] == list(range(24))  # optimizer steps
    assert history_a == history_w  # allocation steps, budgets, kept parameters and total ranks
    assert len({h["budget"] for h in history_a}) > 3  # several allocations happened
    for a, w in zip(accumulated, whole):
        assert a["budget"] == w["budget"]
        assert torch.equal(a["kept"], w["kept"]), f"kept triplets differ at step {a['step']}"
        assert torch.allclose(a["scores"], w["scores"], rtol=1e-5, atol=0), f"scores differ at step {a['step']}"
        assert torch.equal(torch.sort(a["scores"], stable=True).indices, torch.sort(w["scores"], stable=True).indices)
    assert int(whole[-1]["kept"].sum()) < whole[-1]["kept"].numel()  # pruning really happened
