"""The Hugging Face Trainer, extended only where adapters need it: an extra loss term, an allocator driven
once per optimizer step by a callback (its state saved in every checkpoint and restored on resume), and a
stop on a non-finite loss. All method logic stays in the method's file."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from adalora_cli import checkpoints, distributed
from adalora_cli.errors import TrainingFailed
from adalora_cli.methods.base import Allocator

logger = logging.getLogger("adalora_cli")


class NonFiniteLoss(TrainingFailed):
    """The training loss of an optimizer step was NaN or infinite; raised before that step is applied."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"loss became {value} at optimizer step {step}")


class AllocationCallback(TrainerCallback):
    """Runs the method's allocator after every optimizer step (never per micro-batch).

    `on_optimizer_step` fires after `optimizer.step()` and before `zero_grad()`, so the allocator sees
    the gradients of the step just taken (all-reduced under DDP); `state.global_step` is then the
    0-based index of that step. The allocator is built at train begin, when the Trainer knows the total
    number of optimizer steps, so the user never has to state it.

    Every checkpoint gets the allocator's state (`on_save`, main process only); a run resumed from
    `resume_from` reloads it at train begin, after the Trainer has restored the model and optimizer.
    """

    def __init__(self, build: Callable[[int], Allocator], resume_from: Path | None = None):
        self.build = build
        self.resume_from = resume_from
        self.allocator: Allocator | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.allocator is None:
            self.allocator = self.build(state.max_steps)
            if self.resume_from is not None:
                saved, processes = checkpoints.load_allocator_state(self.resume_from)
                if processes != args.world_size:
                    logger.warning("%s was written by %d process(es), this run has %d: the global batch differs, so "
                                   "the resumed run will not match an uninterrupted one", self.resume_from,
                                   processes, args.world_size)
                self.allocator.load_state_dict(saved)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            checkpoints.save_allocator_state(folder, self.allocator.state_dict(), args.world_size)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.allocator.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.allocator.finalize()


class AdapterTrainer(Trainer):
    """A Trainer that adds the method's regulariser to the loss and logs it beside the task loss,
    together with the allocator's budget and kept adapter parameters, and that stops on a non-finite loss.

    The loss check costs one host sync (and, under DDP, one one-number all-reduce) per optimizer step, not
    per micro-batch: the micro-batch losses are summed on the device and the sum is read once, before the
    optimizer applies the step. (The Trainer's `logging_nan_inf_filter` would only hide such a loss from
    the log.)
    """

    def __init__(self, *args, regulariser: Callable[[], torch.Tensor] | None = None,
                 allocation: AllocationCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our task heads (sequence classification, QA) average their loss over the micro-batch and ignore the
        # Trainer's `num_items_in_batch`. The Trainer takes any model whose forward has **kwargs for one that
        # normalises by it: it would then skip its division by the accumulation steps (gradients x the number
        # of micro-batches) and, under DDP, multiply the loss by the number of processes. Say it does not.
        self.model_accepts_loss_kwargs = False
        self.regulariser = regulariser
        self.allocation = allocation
        if allocation is not None:
            self.add_callback(allocation)
        self._sums = {"task_loss": 0.0, "regulariser": 0.0}
        self._count = 0
        self._step_loss: torch.Tensor | None = None  # sum of this optimizer step's micro-batch losses

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = loss.detach().float() if self._step_loss is None else self._step_loss + loss.detach()
        if self.accelerator.sync_gradients:  # the last micro-batch of the step: check before the optimizer runs
            self._check_step_loss()
        return loss

    def _check_step_loss(self) -> None:
        total = distributed.all_reduce_sum(self._step_loss.reshape(1).clone())  # every process stops together
        self._step_loss = None
        value = float(total)
        if not math.isfinite(value):
            raise NonFiniteLoss(self.state.global_step + 1, value)

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
