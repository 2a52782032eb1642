"""The one orchestration path: `run_train` (config -> data -> model -> adapters -> Trainer -> run directory).
Methods differ only through their registry record; evaluation is `evaluation.evaluate`, the path `adalora eval`
and `adalora predict` use too."""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adalora_cli import checkpoints, devices, distributed, files, models, rundir, tracking
from adalora_cli.budget import format_count
from adalora_cli.config import MAX_SAVE_STEPS, RunConfig
from adalora_cli.errors import Interrupted, TrainingFailed, UserError
from adalora_cli.evaluation import evaluate
from adalora_cli.rundata import (EvalSet, configured_task, features_for, max_length, quiet_datasets, read_data,
                                 require_hub)
from adalora_cli.inject import find_targets, inject_adapters, mark_trainable
from adalora_cli.methods import get_method
from adalora_cli.tasks import Task

logger = logging.getLogger("adalora_cli")


def training_arguments(cfg: RunConfig, output_dir: Path, lr: float, precision: devices.Precision, adapter: bool,
                       task: Task | None = None):
    """The Trainer's arguments for a run (`cfg.save_steps` resolved, else the longest default interval)."""
    from transformers import TrainingArguments

    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        warmup_steps=cfg.warmup_ratio,  # below 1: a fraction of the optimizer steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps or MAX_SAVE_STEPS,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        logging_nan_inf_filter=False,  # a host sync per micro-batch; AdapterTrainer checks the loss once per step
        **precision.trainer_settings(cfg.trainer),
    )
    if adapter:  # every adapter and head parameter takes part in every forward: skip DDP's search per step
        settings["ddp_find_unused_parameters"] = False
    if cfg.eval_every is not None and task is not None:
        settings.update(evaluation_settings(cfg, task))
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs and under DDP
        # transformers 5 renamed gradient_checkpointing* to activation_checkpointing* (old names deprecated)
        name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
            else "gradient_checkpointing"
        settings.update({name: True, f"{name}_kwargs": {"use_reentrant": False}})
    if not torch.cuda.is_available() and (distributed.world_size() > 1 or precision.name == "bf16"):
        settings["use_cpu"] = True  # torchrun or bf16 autocast on CPUs: without it the Trainer refuses them
    settings.update(cfg.trainer)
    try:
        args = TrainingArguments(**settings)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid Trainer setting ({str(exc).splitlines()[0]}); check the trainer.* keys") from None
    devices.keep_one_gpu(args)
    return args


def selection_metric(cfg: RunConfig, task: Task) -> str:
    """The metric --keep-best and --early-stopping follow (with its suffix, as in metrics.json)."""
    return cfg.metric or task.main_metric


def evaluation_settings(cfg: RunConfig, task: Task) -> dict[str, Any]:
    """Trainer settings for --eval-every and --keep-best: evaluate (and, keeping the best, checkpoint) at the same
    steps; the best checkpoint is reloaded at the end. Which evaluations may count is AdapterTrainer's business."""
    steps = cfg.eval_steps()
    strategy = "epoch" if steps == "epoch" else "steps"
    settings: dict[str, Any] = {"eval_strategy": strategy}
    if strategy == "steps":
        settings["eval_steps"] = steps
    if cfg.keep_best:
        metric = selection_metric(cfg, task)
        settings.update(save_strategy=strategy, load_best_model_at_end=True, metric_for_best_model=metric,
                        greater_is_better=task.greater_is_better(metric))
        if strategy == "steps":
            settings["save_steps"] = steps
    return settings


@dataclass
class TrainResult:
    """What `run_train` returns: the metrics written to metrics.json, and the summary a person reads at the end."""

    metrics: dict[str, Any]
    summary: str


def run_train(cfg: RunConfig, overwrite: bool = False, resume: bool = False,
              evaluation: bool = True) -> TrainResult | None:
    """Train, save the run directory, evaluate; returns the metrics written to metrics.json and the summary.

    With `resume`, continue the run in `cfg.output_dir` from its last complete checkpoint (same settings).
    Under several processes (torchrun), every process trains and evaluates its shard of the evaluation rows;
    only the main one writes the run directory; the others return None. SIGTERM or Ctrl-C stops training after
    a checkpoint (`errors.Interrupted`). Without `evaluation` (the pass of `adalora plan`), the run folder is written
    but nothing is evaluated: metrics.json has no scores.
    """
    quiet_datasets()
    method, method_cfg, precision = _checked_settings(cfg, overwrite, resume)
    out = rundir.RunDir(cfg.output_dir)
    lock = files.RunLock(out.path)
    lock.check()  # another process writes this folder: say so before any work
    resume_from = checkpoints.resume_point(cfg, method.make_allocator is not None) if resume else None
    if not resume:
        out.prepare(overwrite)
    require_hub(cfg)
    models.task_config(cfg.model, configured_task(cfg), cfg.trust_remote_code)  # refuses a misfit before reading data
    task, train_raw, evals = read_data(cfg)  # fills in what the data tells (columns, classes) before it is saved
    if cfg.lr is None:  # defaults resolved here and below are written into config.yaml: it records the values used
        cfg.lr = method.default_lr
    # counted from the examples, before tokenising (the Trainer's arguments come first); a task that cuts long
    # examples into several windows (SQuAD) takes a few more steps, so its checkpoints come a little more often
    cfg.resolve_save_steps(len(train_raw), distributed.world_size())
    args = training_arguments(cfg, out.checkpoints, cfg.lr, precision, method.adapter,
                              task)  # starts DDP if launched
    main = args.process_index == 0
    if not main:
        logger.setLevel(logging.WARNING)  # one copy of the progress lines: the main process's
    built = _build_model(cfg, task, method, method_cfg)
    task = built.task
    _resolve_task_settings(cfg, task, built.tokenizer)
    train_features, train_cut = features_for(task, train_raw, built.tokenizer, max_length(cfg, task, built.tokenizer),
                                             True, "training data")
    if method.from_data is not None:
        _initialise_from_data(built, cfg, method, method_cfg, train_features, args.device)

    _lock_on_main(lock, main, args.device)
    try:
        distributed.barrier()  # every process has checked the output folder before the main one changes it
        if main:
            if resume_from is not None:
                checkpoints.drop_later_checkpoints(resume_from)
            else:
                out.reset()
                out.write_config(cfg)  # what a later --resume checks its settings against
        distributed.barrier()
        trainer = _make_trainer(cfg, task, evals, built, method, method_cfg, args, train_features, resume_from,
                                precision)
        runtime = _train(trainer, resume_from, out, method, precision)
        if not main:  # its shard of the evaluation in _finish_run, while the main process writes the run folder
            if evaluation:
                evaluate(built.model, built.tokenizer, task, evals, cfg, precision)
            return None
        return _finish_run(cfg, task, evals, method, built, trainer, runtime, precision, resume_from is not None,
                           train_cut, evaluation)
    finally:
        lock.release()


def _resolve_task_settings(cfg: RunConfig, task: Task, tokenizer) -> None:
    """Write into `cfg` the task settings this run uses where they were left to their defaults (the sequence length
    capped by the tokenizer's limit, a generation task's target length and decoding), so that config.yaml records
    them; configured with them again, the task is the same."""
    if cfg.max_seq_length is None:  # a given length stays as given (resuming with the same options must match)
        cfg.max_seq_length = max_length(cfg, task, tokenizer)
    cfg.update_task_settings(task.resolved_settings(), only_unset=True)


def _checked_settings(cfg: RunConfig, overwrite: bool, resume: bool):
    """Validate the run's settings before any work; returns (method, method config, precision)."""
    cfg.validate()
    if not cfg.output_dir:
        raise UserError("no output directory; pass --output-dir")
    if resume and overwrite:
        raise UserError("--resume continues the run in --output-dir and --overwrite deletes it; pass only one")
    for key in ("data_dir", "train_file", "validation_file"):  # the saved config must work from any folder
        if getattr(cfg, key):
            setattr(cfg, key, str(Path(getattr(cfg, key)).resolve()))
    if Path(cfg.model).expanduser().is_dir():  # a local model folder, likewise
        cfg.model = str(Path(cfg.model).expanduser().resolve())
    if cfg.rank_plan is not None:  # likewise; and a missing or damaged plan fails before any work
        from adalora_cli.rankplan import read_plan

        read_plan(cfg.rank_plan)
        cfg.rank_plan = str(Path(cfg.rank_plan).resolve())
    method, method_cfg = get_method(cfg.method), cfg.method_config()
    distributed.check_deepspeed(cfg.trainer, method)
    tracking.check_installed(cfg.report_to)
    return method, method_cfg, cfg.compute_precision()


@dataclass
class BuiltModel:
    """A model ready to train: pretrained weights in float32, the method's adapters injected, the head; and the
    task as it applies to this model (a generation task's model kind comes from the model's config)."""

    task: Task
    model: Any
    tokenizer: Any
    head: set[str]  # parameter names of the task head (trained by every method)
    layers: dict[str, Any]  # adapter layers by module name ({} for full fine-tuning)
    targets: list  # every target matrix the preset (or the user's patterns) selected
    plan: Any  # the method's rank plan (None for full fine-tuning)


def _build_model(cfg: RunConfig, task: Task, method, method_cfg) -> BuiltModel:
    from transformers import set_seed

    task, hf_config, tokenizer = models.for_task(cfg.model, task, cfg.trust_remote_code)
    targets, plan = [], None
    if method.adapter:
        skeleton = models.skeleton(hf_config, task.auto_model)
        targets = find_targets(skeleton, hf_config.model_type, method_cfg.target_modules)
        plan = _rank_plan(cfg, targets, method, method_cfg)
        logger.info("method %s: %d target matrices, plan: %s", method.name, len(targets),
                    ", ".join(f"{key} {value}" for key, value in plan.notes.items()))
    elif cfg.budget is not None:
        logger.warning("--budget does not apply to full fine-tuning, which trains every weight; ignoring it")
    set_seed(cfg.seed)
    model, head = models.load_model(cfg.model, hf_config, task.auto_model, cfg.trust_remote_code)
    built = BuiltModel(task, model, tokenizer, head, {}, targets, plan)
    if method.from_data is None:  # otherwise the adapters wait for the data pass (`_initialise_from_data`)
        _adapt(built, method, method_cfg, plan)
    return built


def _adapt(built: BuiltModel, method, method_cfg, plan, scalings: dict[str, float] | None = None) -> None:
    """Inject the method's adapters with `plan` into the built model and freeze what does not train."""
    built.plan = plan
    built.layers = inject_adapters(built.model, method, method_cfg, plan, scalings) if method.adapter else {}
    trainable, total = mark_trainable(built.model, method, built.head)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)


def _initialise_from_data(built: BuiltModel, cfg: RunConfig, method, method_cfg, train_features, device) -> None:
    """A data-driven method's ranks and initial adapter (`Method.from_data`), from training batches in a seeded
    order (not the Trainer's sampler: the same batches on every process and on --resume); then the adapters.
    The main process's result is used everywhere, so that every process holds the same ranks."""
    built.model.to(device)
    batches = _seeded_batches(built, cfg, train_features, device)
    init = distributed.broadcast_object(method.from_data(built.model, built.targets, batches, cfg.budget, method_cfg))
    logger.info("method %s: ranks from the data: %s", method.name,
                ", ".join(f"{key} {value}" for key, value in init.plan.notes.items()))
    _adapt(built, method, method_cfg, init.plan, init.scalings)
    with torch.no_grad():
        for name, tensors in init.initial.items():
            for key, value in tensors.items():
                getattr(built.layers[name], key).copy_(value)


def _seeded_batches(built: BuiltModel, cfg: RunConfig, features, device):
    """Training batches of `cfg.batch_size` in an order drawn from `cfg.seed`, endlessly (epoch after epoch)."""
    columns = [c for c in features.column_names if c in built.tokenizer.model_input_names or c == "labels"]
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    collate = built.task.collator(built.tokenizer)
    while True:
        for start in range(0, len(order), cfg.batch_size):
            rows = features[order[start:start + cfg.batch_size]]
            count = len(rows[columns[0]])
            batch = collate([{c: rows[c][i] for c in columns} for i in range(count)])
            yield {key: value.to(device) for key, value in batch.items()}


def _rank_plan(cfg: RunConfig, targets: list, method, method_cfg):
    """The method's own plan, or with --rank-plan the plan file's ranks (whose budget becomes the run's when no
    --budget was given, so that config.yaml and metrics.json record it)."""
    if cfg.rank_plan is None:
        return method.plan(targets, cfg.budget, method_cfg)
    from adalora_cli.rankplan import plan_for_targets, read_plan

    plan_file = read_plan(cfg.rank_plan)
    if cfg.budget is None:
        cfg.budget = plan_file.budget
    return plan_for_targets(plan_file, targets, cfg.budget)


def _lock_on_main(lock: files.RunLock, main: bool, device) -> None:
    """The main process takes the run lock; under several processes all of them stop if it cannot."""
    failure = None
    if main:
        try:
            lock.acquire()
        except UserError as exc:
            failure = exc
    failed = distributed.all_reduce_sum(torch.tensor([float(failure is not None)], device=device))
    if failure is not None:
        raise failure
    if float(failed) > 0:
        raise UserError("the main process could not lock the output directory; see its message")


def _make_trainer(cfg: RunConfig, task: Task, evals: list[EvalSet], built: BuiltModel, method, method_cfg, args,
                  train_features, resume_from: Path | None, precision: devices.Precision):
    from adalora_cli.training import AdapterTrainer, AllocationCallback, EarlyStopping

    allocation = None
    if method.make_allocator is not None:
        allocation = AllocationCallback(
            lambda steps: method.make_allocator(built.layers, method_cfg, built.plan, steps), resume_from=resume_from)
    regulariser = method.regulariser(list(built.layers.values()), method_cfg) if method.regulariser else None
    callbacks = tracking.callbacks(cfg.report_to, rundir.RunDir(cfg.output_dir).logs)
    metric = selection_metric(cfg, task)
    if cfg.early_stopping is not None:
        callbacks.append(EarlyStopping(cfg.early_stopping, metric, task.greater_is_better(metric)))
    return AdapterTrainer(
        model=built.model,
        args=args,
        train_dataset=train_features,
        eval_dataset=evals[0].raw if cfg.eval_every else None,  # required by the Trainer; evaluate() reads `evals`
        data_collator=task.collator(built.tokenizer),
        processing_class=built.tokenizer,
        callbacks=callbacks,
        regulariser=regulariser,
        allocation=allocation,
        evaluator=lambda: evaluate(built.model, built.tokenizer, task, evals, cfg, precision) if cfg.eval_every
        else None,
    )


def _train(trainer, resume_from: Path | None, out: rundir.RunDir, method, precision: devices.Precision) -> float:
    """Run the Trainer under the run's precision; returns the training time in seconds. Stops cleanly on SIGTERM /
    Ctrl-C; on any other failure the log names the last complete checkpoint."""
    from adalora_cli.training import NonFiniteLoss, StopSignals

    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
    needs_allocator = method.make_allocator is not None
    started = time.time()
    try:
        with precision.applied(), StopSignals() as signals:
            trainer.stop_signals = signals
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except NonFiniteLoss as exc:
        _close_progress_bars(trainer)
        raise TrainingFailed(_divergence_message(exc, out, needs_allocator)) from None
    except pickle.UnpicklingError as exc:  # the Trainer loads optimizer, scheduler and RNG with weights_only=True
        if resume_from is None:
            raise
        raise UserError(f"--resume: {resume_from} holds a file that is not plain tensors ({str(exc).splitlines()[0]}); "
                        "it was not loaded: remove that checkpoint folder and resume from an earlier one") from None
    except BaseException as exc:  # a crash, an error, a second Ctrl-C: say what is left to resume from
        _close_progress_bars(trainer)
        if trainer.is_world_process_zero() and not isinstance(exc, UserError):  # a user error is its one line
            logger.warning(_last_checkpoint_note(trainer, out, needs_allocator))
        raise
    _stop_after_late_signal(trainer, signals, out, needs_allocator)
    if trainer.stopped_by is not None:
        raise Interrupted(_interrupted_message(trainer, out), 143 if trainer.stopped_by == "SIGTERM" else 130)
    if trainer.is_world_process_zero():
        last = checkpoints.last_complete_checkpoint(out, needs_allocator)
        logger.info("training done; last checkpoint: %s", last if last is not None else "none")
    return result.metrics.get("train_runtime", time.time() - started)


def _stop_after_late_signal(trainer, signals, out: rundir.RunDir, needs_allocator: bool) -> None:
    """A signal that came after the last optimizer step's check (training had ended on its own) stops the run like
    one during training, when the final step is in a complete checkpoint (--resume then only finishes the run);
    otherwise the run finishes. Only the main process acts on it: the others have nothing left to do."""
    if trainer.stopped_by is not None or signals.name is None or not trainer.is_world_process_zero():
        return
    last = checkpoints.last_complete_checkpoint(out, needs_allocator)
    if last is not None and last.name == f"checkpoint-{trainer.state.global_step}":
        trainer.stopped_by = signals.name
    else:
        logger.warning("%s arrived after the last optimizer step, which no checkpoint holds: finishing the run",
                       signals.name)


def _interrupted_message(trainer, out: rundir.RunDir) -> str:
    step, total = trainer.state.global_step, trainer.state.max_steps
    checkpoint = out.checkpoint(step)
    resume = f"adalora train --output-dir {out} --resume"
    if step >= total:
        return (f"stopped by {trainer.stopped_by} after the last optimizer step ({step} of {total}): training is "
                f"complete and checkpoint {checkpoint} holds it; write the run folder and evaluate with: {resume}")
    return (f"stopped by {trainer.stopped_by} after optimizer step {step} of {total}; checkpoint "
            f"{checkpoint} holds the run; continue it with: {resume}")


def _last_checkpoint_note(trainer, out: rundir.RunDir, needs_allocator: bool) -> str:
    """One line for a run that failed: where its last complete checkpoint is, and how to continue from it."""
    done = f"training failed after optimizer step {trainer.state.global_step} of {trainer.state.max_steps}"
    last = checkpoints.last_complete_checkpoint(out, needs_allocator)
    if last is None:
        return f"{done}, before its first checkpoint (one every {trainer.args.save_steps} optimizer steps)"
    return (f"{done}; the last complete checkpoint is {last}: once the cause is fixed, continue from it with: "
            f"adalora train --output-dir {out} --resume")


def _finish_run(cfg: RunConfig, task: Task, evals: list[EvalSet], method, built: BuiltModel, trainer, runtime: float,
                precision: devices.Precision, resumed: bool, train_cut: dict[str, int],
                evaluation: bool = True) -> TrainResult:
    """Write the run directory (adapter, head, tokenizer, logs), evaluate, write metrics.json and the pictures.
    `train_cut` counts the training rows whose inputs / targets were cut to fit (`rundata.features_for`)."""
    out = rundir.RunDir(cfg.output_dir)
    model, layers, allocation = built.model, built.layers, trainer.allocation
    rank_pattern = out.write_adapter(method, model, layers, built.head, cfg, built.targets)
    adapter_params = sum(layer.param_count() for layer in layers.values()) if method.adapter else \
        sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in built.head)
    if resumed:  # a resumed run may have moved its data or changed its log interval
        out.write_config(cfg)
    out.save_tokenizer(built.tokenizer)
    out.write_json(out.RANK_PATTERN, rank_pattern)
    if allocation is not None:
        out.write_json(out.RANK_HISTORY, allocation.allocator.history())
    out.write_json(out.TRAIN_LOG, trainer.state.log_history)
    if cfg.budget is not None and method.adapter and adapter_params > cfg.budget:
        raise RuntimeError(f"adapter holds {adapter_params} parameters, over the budget {cfg.budget}")

    metrics = {
        "task": task.name,
        "method": method.name,
        "model": cfg.model,
        "budget": cfg.budget if method.adapter else None,
        "adapter_params": int(adapter_params),
        "nonzero_adapter_params": int(sum(layer.nonzero_count() for layer in layers.values())) if method.adapter
        else int(adapter_params),
        "steps": int(trainer.state.global_step),
        "precision": precision.name,
        "train_runtime_s": round(float(runtime), 2),
    }
    if cfg.keep_best:
        metrics["best"] = _best(cfg, task, trainer)
    if evaluation:
        logger.info("evaluating on %s", ", ".join(e.name for e in evals))
    metrics["eval"] = evaluate(model, built.tokenizer, task, evals, cfg, precision) if evaluation else {}
    metrics["truncated"] = {"train": train_cut, **({e.name: e.truncated for e in evals} if evaluation else {})}
    metrics.update(task.record(model, built.tokenizer))
    out.write_json(out.METRICS, metrics)
    pictures = _draw(out, allocation is not None, cfg.report_to, trainer)
    return TrainResult(metrics, run_summary(cfg, task, evals, method, metrics, task.class_names(model.config),
                                            pictures))


def run_summary(cfg: RunConfig, task: Task, evals: list[EvalSet], method, metrics: dict[str, Any],
                classes: list[str] | None, pictures: list[Path]) -> str:
    """The end of `adalora train`, in one block: where the run is, its main metric, its classes, and the commands
    that come next."""
    from adalora_cli.training import format_number

    out = Path(cfg.output_dir)
    metric = selection_metric(cfg, task)
    evaluated = next((e for e in evals if e.suffix and metric.endswith(e.suffix)), evals[0])
    value = metrics["eval"].get(metric)
    result = f"{metric} {value:.4f}" if value is not None else ", ".join(
        f"{k} {format_number(v)}" for k, v in metrics["eval"].items())
    budget = f" (budget {format_count(cfg.budget)})" if cfg.budget and method.adapter else ""
    rows = [
        ("run", str(out)),
        ("result", f"{result} on {evaluated.name} ({len(evaluated.raw):,} rows), after {metrics['steps']:,} "
                   f"optimizer steps in {metrics['train_runtime_s']:.0f} s"),
        ("method", f"{method.name}, {metrics['adapter_params']:,} {'adapter ' if method.adapter else ''}parameters"
                   f"{budget}"),
    ]
    if classes:
        rows.append(("classes", ", ".join(classes)))
    rows.append(("files", ", ".join([rundir.RunDir.METRICS] + [p.name for p in pictures])))
    export_format = "peft" if method.adapter else "merged"
    rows += [("next", f"adalora eval {out}"), ("", f"adalora predict {out} --input FILE"),
             ("", f"adalora export-adapter {out} --format {export_format} --out DIR")]
    return "\n".join(f"{name:8s}{text}" for name, text in rows)


def _best(cfg: RunConfig, task: Task, trainer) -> dict[str, Any] | None:
    """The evaluation --keep-best chose (its adapter is the one saved), or None when none was eligible."""
    state = trainer.state
    if state.best_global_step is None or state.best_metric is None:
        logger.warning("--keep-best: no evaluation was at the final budget, so none could be chosen; the run keeps "
                       "its last adapter")
        return None
    logger.info("--keep-best: kept the adapter of step %d (%s %.4f)", state.best_global_step,
                selection_metric(cfg, task), state.best_metric)
    return {"step": int(state.best_global_step), "metric": selection_metric(cfg, task),
            "value": round(float(state.best_metric), 6)}


def _draw(out: rundir.RunDir, adaptive: bool, report_to: str, trainer) -> list[Path]:
    """The learning curve, and for adaptive methods the rank allocation; both go to the tracker too."""
    from adalora_cli.report import write_learning_curve, write_rank_plot

    pictures = [write_learning_curve(out)]
    if adaptive:  # the final ranks and the budget curve (as `adalora inspect`)
        pictures.append(write_rank_plot(out))
    tracking.log_images(report_to, out.logs, pictures, trainer)
    return pictures


def _divergence_message(exc, out: rundir.RunDir, needs_allocator: bool) -> str:
    last = checkpoints.last_complete_checkpoint(out, needs_allocator)
    kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written before it"
    return (f"loss became {exc.value} at optimizer step {exc.step}; {kept}; lower --lr (or "
            "--set max_grad_norm=...), check the data, and train again with --overwrite")


def _close_progress_bars(trainer) -> None:
    """Close the Trainer's progress bar, left open by the exception, so the error stays the last line."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None

