"""The Hugging Face Trainer, extended only where adapters need it: an extra loss term, and an allocator
driven once per optimizer step by a callback. All method logic stays in the method's file."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

from adalora_cli.methods.base import Allocator


class AllocationCallback(TrainerCallback):
    """Runs the method's allocator after every optimizer step (never per micro-batch).

    `on_optimizer_step` fires after `optimizer.step()` and before `zero_grad()`, so the allocator sees
    the gradients of the step just taken (all-reduced under DDP); `state.global_step` is then the
    0-based index of that step. The allocator is built at train begin, when the Trainer knows the total
    number of optimizer steps, so the user never has to state it.
    """

    def __init__(self, build: Callable[[int], Allocator]):
        self.build = build
        self.allocator: Allocator | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.allocator is None:
            self.allocator = self.build(state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.allocator.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.allocator.finalize()


class AdapterTrainer(Trainer):
    """A Trainer that adds the method's regulariser to the loss and logs it beside the task loss,
    together with the allocator's budget and kept adapter parameters."""

    def __init__(self, *args, regulariser: Callable[[], torch.Tensor] | None = None,
                 allocation: AllocationCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.regulariser = regulariser
        self.allocation = allocation
        if allocation is not None:
            self.add_callback(allocation)
        self._sums = {"task_loss": 0.0, "regulariser": 0.0}
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        self._sums["task_loss"] += loss.detach()
        self._count += 1
        if self.regulariser is not None:
            regulariser = self.regulariser()
            self._sums["regulariser"] += regulariser.detach()
            loss = loss + regulariser
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._count:
            logs["task_loss"] = round(float(self._sums["task_loss"]) / self._count, 4)
            if self.regulariser is not None:
                logs["regulariser"] = round(float(self._sums["regulariser"]) / self._count, 4)
            self._sums = {"task_loss": 0.0, "regulariser": 0.0}
            self._count = 0
        if self.allocation is not None and self.allocation.allocator is not None:
            logs.update(self.allocation.allocator.log_values())
        super().log(logs, start_time)
