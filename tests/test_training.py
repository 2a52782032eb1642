"""The Trainer integration: one allocation per optimizer step (not per micro-batch), total steps taken from
the Trainer, and the regulariser and budget logged beside the task loss."""

import torch
from datasets import Dataset
from transformers import TrainingArguments

from adalora_cli.inject import find_targets, inject_adapters, mark_trainable
from adalora_cli.methods import get_method
from adalora_cli.training import AdapterTrainer, AllocationCallback
from conftest import tiny_model


def synthetic_rows(n=16, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                              "labels": torch.randint(0, 2, (n,), generator=g).tolist()})


def test_one_allocation_per_optimizer_step_under_gradient_accumulation(tmp_path):
    model = tiny_model("bert")
    method = get_method("adalora")
    cfg = method.config_cls(t_init=1, t_final=2, delta_t=1)
    targets = find_targets(model, "bert")
    plan = method.plan(targets, 2 * sum(t.d_in + t.d_out + 1 for t in targets), cfg)
    layers = inject_adapters(model, method, cfg, plan)
    mark_trainable(model, method, {n for n, _ in model.named_parameters() if n.startswith("classifier")})

    seen = {"total": None, "steps": [], "micro_batches": 0}

    def build(total_steps):
        seen["total"] = total_steps
        allocator = method.make_allocator(layers, cfg, plan, total_steps)
        original = allocator.step
        allocator.step = lambda t: (seen["steps"].append(t), original(t))[1]
        return allocator

    regulariser = method.regulariser(list(layers.values()), cfg)

    def counting_regulariser():
        seen["micro_batches"] += 1
        return regulariser()

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=6, logging_steps=2, save_strategy="no", report_to="none",
                             learning_rate=1e-2, disable_tqdm=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=synthetic_rows(),
                             regulariser=counting_regulariser, allocation=AllocationCallback(build))
    trainer.train()
    assert seen["total"] == 6
    assert seen["steps"] == [0, 1, 2, 3, 4, 5]  # 0-based optimizer steps, once each
    assert seen["micro_batches"] == 12
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"task_loss", "regulariser", "budget", "adapter_params"} <= set(e) for e in logged)
    assert logged[-1]["adapter_params"] <= logged[-1]["budget"] == plan.budget
