"""The Hugging Face Trainer, extended only where adapters need it: an extra loss term, an allocator driven
once per optimizer step by a callback (its state saved in every checkpoint and restored on resume), and a
stop on a non-finite loss. All method logic stays in the method's file."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from adalora_cli import checkpoints, distributed, models
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
        self.step_skipped: Callable[[], bool] = lambda: False  # AdapterTrainer tells: fp16 loss scaling

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
        self.allocator.after_optimizer_step(state.global_step, skipped=self.step_skipped())

    def on_train_end(self, args, state, control, **kwargs):
        self.allocator.finalize()


class StopSignals:
    """SIGTERM, or a first Ctrl-C (SIGINT): finish the current optimizer step, checkpoint, stop.

    Spot instances and cluster schedulers send SIGTERM before they take a machine away. The handler only
    records the signal; the Trainer acts on it at the next optimizer-step boundary (`AdapterTrainer`), so the
    checkpoint holds a complete step. A signal after the last step's check stops the run as well when that step is
    checkpointed (`pipeline._stop_after_late_signal`). A second Ctrl-C while that happens aborts at once
    (KeyboardInterrupt).
    Handlers can only be installed from the main thread; elsewhere nothing is installed.
    """

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
            return
        self.received = signum
        logger.warning("%s received: finishing this optimizer step and writing a checkpoint, then stopping "
                       "(press Ctrl-C again to abort at once)", self.NAMES[signum])

    @property
    def name(self) -> str | None:
        return self.NAMES.get(self.received) if self.received is not None else None


def format_number(value: Any) -> str:
    """A logged value as a person reads it: integers with thousands separators, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def format_log(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One line of the training log: led by the optimizer step, then the values under their train_log.json names.
    An evaluation says whether it counted (an adaptive method's adapter is over the budget until its final phase)."""
    logs = {k: v for k, v in logs.items() if k != "total_flos"}
    epoch = logs.pop("epoch", None)
    where = f"step {step:,}/{max_steps:,}" + (f" (epoch {epoch:.3g})" if epoch is not None else "")
    if any(k.startswith("eval_") for k in logs):
        counted = logs.pop("eval_at_final_budget", True)
        values = ", ".join(f"{k.removeprefix('eval_')} {format_number(v)}" for k, v in logs.items())
        note = "" if counted else " (before the final budget: not used by --keep-best or --early-stopping)"
        return f"evaluation at {where}: {values}{note}"
    if "train_runtime" in logs:
        return f"training done at {where}: " + ", ".join(f"{k} {format_number(v)}" for k, v in logs.items())
    return f"{where}: " + ", ".join(f"{k} {format_number(v)}" for k, v in logs.items())


class RunProgress(ProgressCallback):
    """The Trainer's progress bar and log lines, for a person: each log line through our logger (stderr, written
    around the bar, never onto its line), numbers as numbers, led by the optimizer step. The bar is drawn only on
    a terminal; in a log file its redraws would be noise, and the log lines say how far training is."""

    def __init__(self, bar: bool = True):
        super().__init__()
        self.bar = bar

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True,
                                     disable=not (self.bar and sys.stderr.isatty()))
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(format_log(logs, state.global_step, state.max_steps))


class AdapterTrainer(Trainer):
    """A Trainer that adds the method's regulariser to the loss and logs it beside the task loss,
    together with the allocator's budget and kept adapter parameters, stops on a non-finite loss, and stops
    cleanly (checkpoint first) on SIGTERM or Ctrl-C.

    The loss check costs one host sync (and, under DDP, one two-number all-reduce that also agrees on a stop
    request) per optimizer step, not per micro-batch: the micro-batch losses are summed on the device and the
    sum is read once, before the optimizer applies the step. Under fp16 loss scaling a non-finite loss is not
    an error: the scaler skips that step and lowers its scale, and only a long run of skipped steps
    (`MAX_SKIPPED_STEPS` in a row) stops training.
    """

    MAX_SKIPPED_STEPS = 25  # the scale halves at every skip: 25 skips take 2^16 down to 2^-9

    def __init__(self, *args, regulariser: Callable[[], torch.Tensor] | None = None,
                 allocation: AllocationCallback | None = None, stop_signals: StopSignals | None = None,
                 evaluator: Callable[[], dict[str, float]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        from transformers.trainer import DEFAULT_PROGRESS_CALLBACK  # a notebook's own, in Jupyter

        for default in {ProgressCallback, PrinterCallback, DEFAULT_PROGRESS_CALLBACK}:  # dicts of quoted numbers
            self.remove_callback(default)
        self.add_callback(RunProgress(bar=not self.args.disable_tqdm))
        self.evaluator = evaluator  # the run's own evaluation (evaluation.evaluate), for --eval-every
        self.eval_at_final_budget = True
        # Our task heads (sequence classification, QA) average their loss over the micro-batch and ignore the
        # Trainer's `num_items_in_batch`. The Trainer takes any model whose forward has **kwargs for one that
        # normalises by it: it would then skip its division by the accumulation steps (gradients x the number
        # of micro-batches) and, under DDP, multiply the loss by the number of processes. Say it does not.
        self.model_accepts_loss_kwargs = False
        self.regulariser = regulariser
        self.allocation = allocation
        self.stop_signals = stop_signals
        self.stopped_by: str | None = None  # the signal that stopped training early, once acted on
        self.step_skipped = False  # whether fp16 loss scaling skipped the optimizer step just taken
        self.add_callback(_StepGuard(self))  # first: the allocation callback reads step_skipped
        if allocation is not None:
            allocation.step_skipped = lambda: self.step_skipped
            self.add_callback(allocation)
        self._sums = {"task_loss": 0.0, "regulariser": 0.0}
        self._count = 0
        self._step_loss: torch.Tensor | None = None  # sum of this optimizer step's micro-batch losses
        self._stop_agreed = False
        self._skipped_in_a_row = 0

    def train(self, *args, **kwargs):
        """Training without Transformers' own progress bars ("Writing model shards" at every checkpoint): one bar,
        ours."""
        with models.no_progress_bars():
            return super().train(*args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        """Nothing left to train (a run resumed from the checkpoint of its last step, stopped before it wrote its
        folder): the Trainer would still take one more optimizer step, as it checks for the end only after a step.
        Skipping the epoch leaves the checkpoint's state as it is; the Trainer then ends training as usual."""
        if self.state.global_step >= self.state.max_steps:
            return None
        return super()._run_epoch(*args, **kwargs)

    @property
    def loss_scaling(self) -> bool:
        return getattr(self.accelerator, "scaler", None) is not None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = loss.detach().float() if self._step_loss is None else self._step_loss + loss.detach()
        if self.accelerator.sync_gradients:  # the last micro-batch of the step: check before the optimizer runs
            self._check_step()
        return loss

    def _check_step(self) -> None:
        stop = float(self.stop_signals is not None and self.stop_signals.received is not None)
        flags = torch.stack([self._step_loss.reshape(()), self._step_loss.new_tensor(stop)])
        loss, stop = distributed.all_reduce_sum(flags).tolist()  # every process decides alike
        self._step_loss = None
        self._stop_agreed = stop > 0
        if not math.isfinite(loss) and not self.loss_scaling:
            raise NonFiniteLoss(self.state.global_step + 1, loss)

    def _after_optimizer_step(self, skipped: bool) -> None:
        """Count fp16 steps skipped in a row; too many means the run diverged, not a passing overflow."""
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped else 0
        if self._skipped_in_a_row >= self.MAX_SKIPPED_STEPS:
            first = self.state.global_step - self._skipped_in_a_row + 2
            raise TrainingFailed(
                f"fp16 loss scaling skipped {self._skipped_in_a_row} optimizer steps in a row (steps {first}-"
                f"{self.state.global_step + 1}): the gradients are not finite at any scale; train with "
                "--precision bf16 or fp32, or lower --lr")

    # -- evaluation during training ------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The run's own evaluation (the one `adalora eval` runs), on the adapter as it would be saved now.

        Every process evaluates its shard of the rows and computes the metrics of all of them (`evaluate`); the
        main process's numbers are then shared, so that every process takes the same --keep-best and
        --early-stopping decisions even where a metric's float sums could depend on the process (Python's string
        hashing orders sets). An adaptive method's adapter holds more than the budget until its final phase: such
        an evaluation is logged but marked `at_final_budget: false`, and never chosen.
        """
        allocator = self.allocation.allocator if self.allocation is not None else None
        with allocator.evaluation_view() if allocator is not None else contextlib.nullcontext():
            metrics = self.evaluator()
        metrics = distributed.broadcast_object(metrics)
        self.eval_at_final_budget = allocator.at_final_budget() if allocator is not None else True
        logs = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        logs[f"{metric_key_prefix}_at_final_budget"] = self.eval_at_final_budget
        self.log(logs)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logs)
        return logs

    def _determine_best_metric(self, metrics, trial) -> bool:
        if not self.eval_at_final_budget:  # the adapter evaluated holds more parameters than the budget
            return False
        return super()._determine_best_metric(metrics, trial)

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


class _StepGuard(TrainerCallback):
    """The trainer's own per-step checks: steps skipped by fp16 loss scaling, and a stop requested by a signal.

    A skipped step is read off the loss scale, which the scaler halves exactly when it finds inf/NaN gradients
    (it only ever grows otherwise). Accelerate's `optimizer_step_was_skipped` cannot be used: with a fused
    optimizer (the Trainer's default AdamW) the scaler hands the skip to the optimizer's kernel, and accelerate
    then reports every step as taken. The scaler decides from the all-reduced gradients, so every process sees
    the same. Reading the scale costs two host syncs per step, under fp16 only.
    """

    def __init__(self, trainer: AdapterTrainer):
        self.trainer = trainer
        self.scale_before: float | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        self.scale_before = scaler.get_scale() if scaler is not None else None

    def on_optimizer_step(self, args, state, control, **kwargs):
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        skipped = self.scale_before is not None and scaler.get_scale() < self.scale_before
        self.trainer.step_skipped = skipped
        self.trainer._after_optimizer_step(skipped)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._stop_agreed:  # checkpoint this step, then leave the training loop
            control.should_save = True
            control.should_training_stop = True
            self.trainer.stopped_by = self.trainer.stop_signals.name if self.trainer.stop_signals else "SIGTERM"


class EarlyStopping(TrainerCallback, ExportableState):
    """Stop after `patience` evaluations at the final budget without improving `metric` (earlier evaluations of an
    adaptive method do not count). Its counters travel in every checkpoint's trainer_state.json."""

    def __init__(self, patience: int, metric: str, greater_is_better: bool = True):
        self.patience, self.metric, self.greater_is_better = patience, metric, greater_is_better
        self.best: float | None = None
        self.without_improvement = 0
        self._restored = False

    def state(self) -> dict:
        return {"args": {"patience": self.patience, "metric": self.metric, "greater_is_better": self.greater_is_better},
                "attributes": {"best": self.best, "without_improvement": self.without_improvement}}

    def on_step_begin(self, args, state, control, **kwargs):
        if not self._restored:  # a resumed run: the counters of the checkpoint it continues from
            saved = state.stateful_callbacks.get(type(self).__name__)
            if isinstance(saved, dict):
                for key, value in saved.get("attributes", {}).items():
                    setattr(self, key, value)
            self._restored = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or not metrics.get("eval_at_final_budget", True):
            return
        value = metrics[f"eval_{self.metric}"]
        improved = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
        if improved:
            self.best, self.without_improvement = value, 0
            return
        self.without_improvement += 1
        if self.without_improvement >= self.patience:
            logger.info("early stopping at step %d: %s has not improved on %.4f for %d evaluation(s)",
                        state.global_step, self.metric, self.best, self.without_improvement)
            control.should_training_stop = True
