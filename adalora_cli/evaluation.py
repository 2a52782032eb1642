"""The one evaluation path: reading a run's data, running a model over it, scoring it, predicting new rows.

`evaluate` serves evaluation during training, at the end of training, `adalora eval` and (through the same
`model_outputs`) `adalora predict`. `read_data` is where a run's data comes from: local files, a data folder or
the hub; without a validation set, a seeded share of the training data is held out (never an unrelated split).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adalora_cli import devices, files, hub, rundir
from adalora_cli.config import RunConfig
from adalora_cli.data import held_out_split
from adalora_cli.errors import UserError
from adalora_cli.tasks import Task, get_task

logger = logging.getLogger("adalora_cli")

HELD_OUT = "held-out"  # the name of an evaluation set cut from the training data


def quiet_datasets() -> None:
    """Tokenising a few thousand rows needs no progress bar of its own; the Trainer's bar remains."""
    import datasets

    datasets.disable_progress_bars()


def configured_task(cfg: RunConfig) -> Task:
    """The run's task with its task-specific settings applied (doc stride, columns, class names...)."""
    return get_task(cfg.task).with_settings(**cfg.task_settings())


def data_files(cfg: RunConfig, task: Task) -> dict[str, Path]:
    """Split -> local file, from --train-file / --validation-file."""
    found = {}
    if cfg.train_file:
        found[task.train_split] = Path(cfg.train_file)
    if cfg.validation_file:
        if len(task.eval_splits) != 1:
            raise UserError(f"{task.name} has several evaluation sets; use --data-dir instead of --validation-file")
        found[task.eval_splits[0].split] = Path(cfg.validation_file)
    return found


@dataclass
class EvalSet:
    """One evaluation set: its rows, and (once prepared) the model features built from them."""

    name: str  # the split it came from, or HELD_OUT
    suffix: str  # appended to its metric names (MNLI mismatched: `_mm`)
    raw: Any
    features: Any = None


def require_hub(cfg: RunConfig, data: bool = True) -> None:
    """Fail within seconds, naming everything missing, when the run needs the hub and cannot reach it."""
    task = configured_task(cfg)
    needs = [hub.model_need(cfg.model)]
    splits = [task.train_split] + ([] if _train_file_only(cfg) else [e.split for e in task.eval_splits])
    dataset = task.hub_dataset(Path(cfg.data_dir) if cfg.data_dir else None, data_files(cfg, task), splits) \
        if data else None
    if dataset is not None:
        needs.append(hub.HubNeed("dataset", *dataset))
    hub.require(needs)


def _train_file_only(cfg: RunConfig) -> bool:
    return bool(cfg.train_file) and not (cfg.validation_file or cfg.data_dir)


def holds_out(cfg: RunConfig, task: Task) -> bool:
    """Whether the run has no validation data of its own: then a share of the training data is held out."""
    if cfg.validation_file or cfg.data_dir:
        return False
    return _train_file_only(cfg) or not task.has_hub_split(task.eval_splits[0].split)


def read_data(cfg: RunConfig, training: bool = True) -> tuple[Task, Any, list[EvalSet]]:
    """(the task configured with what the data told, the training rows or None, the evaluation sets).

    Reads every set now, so that bad data fails before any model work. Settings read off the training data
    (columns, class names) are written into `cfg`, which the run saves.
    """
    task = configured_task(cfg)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    local = data_files(cfg, task)
    task.check_sources(data_dir, local)
    held_out = holds_out(cfg, task)
    train_raw = None
    if training or held_out:
        source = cfg.train_file or f"the {task.name} training data"
        train_raw = task.load(task.train_split, data_dir, local)
        for key, value in task.settings_from_data(train_raw, str(source)).items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        task = configured_task(cfg)
        task.check_rows(train_raw, str(source))
    if held_out:
        train_raw, held = held_out_split(train_raw, cfg.validation_split, cfg.seed, task.group_column)
        what = f"{task.group_column}s" if task.group_column else "rows"
        logger.info("no validation data given: holding out %.0f%% of the training data for evaluation (%s of %s %s, "
                    "seed %d)", 100 * cfg.validation_split, f"{len(held):,}", f"{len(held) + len(train_raw):,}",
                    "rows" if not task.group_column else f"rows, whole {what}", cfg.seed)
        evals = [EvalSet(HELD_OUT, "", held)]
    else:
        evals = []
        for split in task.eval_splits:
            raw = task.load(split.split, data_dir, local)
            task.check_rows(raw, str(cfg.validation_file or f"the {task.name} {split.split} data"))
            evals.append(EvalSet(split.split, split.suffix, raw))
    if train_raw is not None and cfg.max_train_samples is not None and cfg.max_train_samples < len(train_raw):
        train_raw = train_raw.select(range(cfg.max_train_samples))
    for eval_set in evals:
        if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(eval_set.raw):
            eval_set.raw = eval_set.raw.select(range(cfg.max_eval_samples))
    return task, (train_raw if training else None), evals


def max_length(cfg: RunConfig, task: Task, tokenizer) -> int:
    wanted = cfg.max_seq_length or task.default_max_seq_length
    limit = getattr(tokenizer, "model_max_length", None)
    return min(wanted, limit) if isinstance(limit, int) and limit > 0 else wanted


def model_outputs(model, features, tokenizer, batch_size: int, precision: str = "fp32", progress: str | None = None):
    """The model's outputs (all but the loss) over `features`, in order, as float32 numpy arrays, computed under
    the autocast of `precision` (resolved); with `progress`, a progress bar of that title on stderr."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    columns = [c for c in tokenizer.model_input_names if c in features.column_names]
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    outputs: list[tuple[np.ndarray, ...]] = []
    starts = range(0, len(features), batch_size)
    with torch.no_grad(), devices.autocast(precision, device):
        for start in tqdm(starts, desc=progress, disable=progress is None, file=sys.stderr, unit="batch"):
            rows = features[start:start + batch_size]
            batch = collate([{c: rows[c][i] for c in columns} for i in range(len(rows[columns[0]]))])
            result = model(**{k: v.to(device) for k, v in batch.items()})
            outputs.append(tuple(v.float().cpu().numpy() for k, v in result.items() if k != "loss"))
    return tuple(_concat_padded([o[i] for o in outputs]) for i in range(len(outputs[0]))) if outputs else ()


def _concat_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis, padding the sequence axis (per-token outputs) with -inf."""
    if arrays[0].ndim < 2 or all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                  constant_values=-np.inf) for a in arrays])


def generation_outputs(model, features, tokenizer, task: Task, batch_size: int, precision: str = "fp32",
                       generate: bool = True, progress: str | None = None) -> dict[str, Any]:
    """What a generation task is scored on: the summed token loss of the labelled rows and its token count
    (teacher forcing), and the text `generate` writes for every row with the task's settings (each distinct
    input generated once: E2E's meaning representations have several references)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    causal = task.model_kind == "causal-lm"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad(), devices.autocast(precision, device):
        if "labels" in features.column_names:
            for start in range(0, len(features), batch_size):
                rows = features[start:start + batch_size]
                loss, count = _token_loss(model, rows, pad, causal, device)
                loss_sum, tokens = loss_sum + loss, tokens + count
        texts = []
        if generate:
            inputs = task.generation_inputs(features)
            distinct = list(dict.fromkeys(tuple(ids) for ids in inputs))
            written = {}
            starts = range(0, len(distinct), batch_size)
            for start in tqdm(starts, desc=progress, disable=progress is None, file=sys.stderr, unit="batch"):
                chunk = distinct[start:start + batch_size]
                for ids, text in zip(chunk, _generate(model, tokenizer, chunk, task.generation, pad, causal, device)):
                    written[ids] = text
            texts = [written[tuple(ids)] for ids in inputs]
    return {"loss_sum": loss_sum, "tokens": tokens, "texts": texts}


def _padded(sequences: list[list[int]], value: int, left: bool, device) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [[value] * (width - len(s)) + list(s) if left else list(s) + [value] * (width - len(s)) for s in sequences]
    return torch.tensor(rows, device=device)


def _token_loss(model, rows: dict, pad: int, causal: bool, device) -> tuple[float, int]:
    """(summed cross-entropy over the label tokens, their count) of one batch, computed from the logits so that
    every model counts the same tokens (a decoder-only model predicts token t+1 from position t)."""
    import torch.nn.functional as F

    input_ids = _padded(rows["input_ids"], pad, False, device)
    attention = _padded(rows["attention_mask"], 0, False, device)
    labels = _padded(rows["labels"], -100, False, device)
    if causal:
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        labels = labels[:, 1:]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention, labels=labels).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return float(loss), int((labels != -100).sum())


def _generate(model, tokenizer, inputs: list[tuple[int, ...]], settings: dict, pad: int, causal: bool,
              device) -> list[str]:
    """`generate` on a batch of inputs (left-padded for a decoder-only model), decoded without the prompt."""
    input_ids = _padded(inputs, pad, causal, device)
    attention = _padded([[1] * len(ids) for ids in inputs], 0, causal, device)
    generated = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, pad_token_id=pad,
                               eos_token_id=tokenizer.eos_token_id, **settings)
    if causal:
        generated = generated[:, input_ids.shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


def task_outputs(model, features, tokenizer, task: Task, batch_size: int, precision: str, generate: bool = True,
                 progress: str | None = None):
    """What the task is scored on: generated text for generation tasks, one forward's outputs for the others."""
    if task.generates:
        return generation_outputs(model, features, tokenizer, task, batch_size, precision, generate, progress)
    return model_outputs(model, features, tokenizer, batch_size, precision, progress)


def evaluate(model, tokenizer, task: Task, evals: list[EvalSet], cfg: RunConfig,
             precision: devices.Precision | None = None) -> dict[str, float]:
    """Every evaluation set, metric names suffixed per set; features are built on first use and kept. Computes under
    `precision` (the run's, resolved once by the caller; default: resolved from `cfg`)."""
    metrics = {}
    precision = precision or cfg.compute_precision()
    for eval_set in evals:
        if eval_set.features is None:
            eval_set.features = task.preprocess(eval_set.raw, tokenizer, max_length(cfg, task, tokenizer),
                                                training=False)
        outputs = task_outputs(model, eval_set.features, tokenizer, task, cfg.eval_batch_size, precision,
                               generate=not getattr(task, "plain_lm", False))
        for name, value in task.compute_metrics(outputs, eval_set.raw, eval_set.features).items():
            metrics[name + eval_set.suffix] = round(float(value), 6)
    return metrics


# -- adalora eval ----------------------------------------------------------------------------------------

def _check_rank(saved, method, rank: int | None, sweep: bool) -> int:
    """The run's r_max, after checking that a chosen rank can be used."""
    if (rank is not None or sweep) and not method.any_rank:
        raise UserError(f"--rank and --rank-sweep need an adapter trained for any rank (dylora); "
                        f"this run used {saved.method}")
    r_max = max(saved.rank_pattern().values(), default=0)
    if rank is not None and not 1 <= rank <= r_max:
        raise UserError(f"rank {rank} is outside 1..{r_max} (the run's r_max); choose a rank in that range")
    return r_max


def _load_for_inference(run: Path, data_dir: str | None, rank: int | None, sweep: bool = False):
    """(the loaded run, its r_max): the model on the GPU when there is one, at `rank` when given; checked first."""
    from adalora_cli.methods import get_method

    saved = rundir.read_adapter_config(rundir.require_run(run))
    r_max = _check_rank(saved, get_method(saved.method), rank, sweep)
    loaded = rundir.load_run(run, data_dir)
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    if rank is not None:
        set_rank(loaded.layers, rank)
    return loaded, r_max


def run_eval(run: Path, data_dir: str | None = None, rank: int | None = None,
             rank_sweep: bool = False) -> dict[str, Any]:
    """Reload a run (or native export) and evaluate it; writes eval.json into the run folder.

    With `rank`, an any-rank adapter (DyLoRA) is evaluated truncated to that rank; with `rank_sweep`, at
    every rank from 1 to r_max (written to eval_ranks.json and drawn in eval_ranks.png).
    """
    quiet_datasets()
    cfg = rundir.read_run_config(run, data_dir)
    require_hub(cfg)
    _, _, evals = read_data(cfg, training=False)
    (cfg, saved, model, tokenizer, layers, task), r_max = _load_for_inference(run, data_dir, rank, rank_sweep)
    if rank_sweep:
        by_rank = {}
        for b in range(1, r_max + 1):
            set_rank(layers, b)
            by_rank[b] = evaluate(model, tokenizer, task, evals, cfg)
            logger.info("rank %d: %s", b, by_rank[b])
        files.write_json(Path(run) / "eval_ranks.json", {str(b): m for b, m in by_rank.items()})
        from adalora_cli.report import plot_rank_sweep

        plot_rank_sweep(by_rank, Path(run) / "eval_ranks.png", f"{Path(run).resolve().name}: any-rank evaluation")
        return by_rank
    metrics = evaluate(model, tokenizer, task, evals, cfg)
    files.write_json(Path(run) / "eval.json", {"task": task.name, "method": saved.method, "rank": rank, "eval": metrics})
    return metrics


def set_rank(layers: dict, rank: int) -> None:
    for layer in layers.values():
        layer.set_rank(rank)


# -- adalora predict -------------------------------------------------------------------------------------

PREDICT_FORMATS = ("jsonl", "glue")


def run_predict(run: Path, input_path: Path, output: Path | None = None, fmt: str = "jsonl",
                rank: int | None = None, batch_size: int | None = None) -> int:
    """Predict every row of `input_path` with a trained run; writes JSONL (or GLUE's leaderboard TSV) to `output`
    (atomically) or to stdout. Returns the number of rows."""
    quiet_datasets()
    if fmt not in PREDICT_FORMATS:
        raise UserError(f"unknown prediction format {fmt!r}; choose one of: {', '.join(PREDICT_FORMATS)}")
    cfg = rundir.read_run_config(run)
    require_hub(cfg, data=False)
    task = configured_task(cfg)
    if fmt == "glue" and not hasattr(task, "leaderboard_label"):
        raise UserError(f"--format glue writes the GLUE leaderboard's TSV; {task.name} is not a GLUE task, use jsonl")
    if output is not None and Path(output).is_dir():
        raise UserError(f"--output {output} is a folder; give a file path")
    raw, ids = task.prediction_inputs(Path(input_path))
    (cfg, saved, model, tokenizer, layers, task), _ = _load_for_inference(run, None, rank)
    features = task.preprocess(raw, tokenizer, max_length(cfg, task, tokenizer), training=False)
    outputs = task_outputs(model, features, tokenizer, task, batch_size or cfg.eval_batch_size,
                           cfg.compute_precision(), progress=f"predicting {len(raw):,} rows")
    records = task.prediction_records(outputs, raw, features)
    if fmt == "glue":
        text = "index\tprediction\n" + "".join(f"{i}\t{task.leaderboard_label(r)}\n" for i, r in zip(ids, records))
    else:
        text = "".join(json.dumps({"id": i, **r}, ensure_ascii=False) + "\n" for i, r in zip(ids, records))
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(Path(output), text)
        logger.info("wrote %s predictions to %s", f"{len(records):,}", output)
    return len(records)
