"""The one evaluation path: reading a run's data, running a model over it, scoring it, predicting new rows.

`evaluate` serves evaluation during training, at the end of training, `adalora eval` and (through the same
`model_outputs`) `adalora predict`. `read_data` is where a run's data comes from: local files, a data folder or
the hub; without a validation set, a seeded share of the training data is held out (never an unrelated split).
"""

from __future__ import annotations

import contextlib
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
from adalora_cli.tasks import Task, get_task, take_truncation

logger = logging.getLogger("adalora_cli")

HELD_OUT = "held-out"  # the name of an evaluation set cut from the training data
INPUT = "input"  # the name of the evaluation set of `adalora eval --input`
COLUMN_OPTIONS = ("text_column", "text_pair_column", "label_column", "source_column", "target_column",
                  "prompt_column", "completion_column")


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
    truncated: dict[str, int] | None = None  # rows whose inputs / targets were cut, once the features are built


def require_hub(cfg: RunConfig, data: bool = True) -> None:
    """Fail within seconds, naming everything missing, when the run needs the hub and cannot reach it."""
    task = configured_task(cfg)
    needs = [hub.model_need(cfg.model)]
    splits = [task.train_split] + ([] if _train_file_only(cfg) else [e.split for e in task.eval_splits])
    dataset = task.hub_dataset(Path(cfg.data_dir) if cfg.data_dir else None, data_files(cfg, task), splits) \
        if data else None
    if dataset is not None:
        needs.append(hub.HubNeed("dataset", *dataset))
    hub.require(needs, task.model_advice)


def apply_file_columns(cfg: RunConfig, columns: dict[str, str | None] | None) -> dict[str, str]:
    """The column options given for a file to evaluate or predict (`--text-column`...), set in `cfg`; columns not
    given stay the run's. A task whose files have fixed columns (GLUE, SQuAD) refuses them."""
    given = {key: value for key, value in (columns or {}).items() if value is not None}
    task = configured_task(cfg)
    for key in given:
        if key not in COLUMN_OPTIONS or not hasattr(task, key):
            raise UserError(f"--{key.replace('_', '-')} does not apply to {task.name} runs; name the file's columns "
                            "as the task expects")
        setattr(cfg, key, given[key])
    return given


def _require_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise UserError(f"--input {path} does not exist; give the file to read")
    return Path(path)


def _train_file_only(cfg: RunConfig) -> bool:
    return bool(cfg.train_file) and not (cfg.validation_file or cfg.data_dir)


def holds_out(cfg: RunConfig, task: Task) -> bool:
    """Whether the run has no validation data of its own: then a share of the training data is held out."""
    if cfg.validation_file or cfg.data_dir:
        return False
    return _train_file_only(cfg) or not task.has_hub_split(task.eval_splits[0].split)


def read_data(cfg: RunConfig, training: bool = True,
              eval_file: Path | None = None) -> tuple[Task, Any, list[EvalSet]]:
    """(the task configured with what the data told, the training rows or None, the evaluation sets).

    Reads every set now, so that bad data fails before any model work. Settings read off the training data
    (columns, class names) are written into `cfg`, which the run saves. With `eval_file` (a trained run's `cfg`,
    not training), that file in the task's format is the one evaluation set, read in full.
    """
    task = configured_task(cfg)
    if eval_file is not None:
        split = task.eval_splits[0].split
        raw = task.load(split, None, {split: Path(eval_file)})
        task.check_rows(raw, str(eval_file))
        return task, None, [EvalSet(INPUT, "", raw)]
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
        train_raw, held = held_out_split(train_raw, cfg.validation_split, cfg.seed, task.group_columns)
        together = f", rows of the same {' + '.join(task.group_columns)} together" if task.group_columns else ""
        logger.info("no validation data given: holding out %.0f%% of the training data for evaluation (%s of %s rows"
                    "%s, seed %d)", 100 * cfg.validation_split, f"{len(held):,}", f"{len(held) + len(train_raw):,}",
                    together, cfg.seed)
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


def features_for(task: Task, raw, tokenizer, max_seq_length: int, training: bool, what: str):
    """(`task.preprocess` of `raw`, how many rows had their inputs / targets cut to fit); says so once in the log."""
    features, cut = take_truncation(task.preprocess(raw, tokenizer, max_seq_length, training=training))
    if cut["inputs"] or cut["targets"]:
        context = getattr(task, "context_length", None)  # generation tasks fit the model's context too
        limits = f"--max-seq-length {max_seq_length}" + (f", the model's {context}-position context" if context else "")
        targets = f", the targets of {cut['targets']:,} (max_target_length)" if cut["targets"] else ""
        logger.warning("%s: cut the inputs of %s of %s rows (%s)%s; counted in metrics.json \"truncated\"", what,
                       f"{cut['inputs']:,}", f"{len(raw):,}", limits, targets)
    return features, cut


def model_outputs(model, features, tokenizer, batch_size: int, precision: devices.Precision | str = "fp32",
                  progress: str | None = None):
    """The model's outputs (all but the loss) over `features`, in order, as float32 numpy arrays, computed under
    the autocast of `precision` (resolved); with `progress`, a progress bar of that title on stderr."""
    from transformers import DataCollatorWithPadding

    columns = [c for c in tokenizer.model_input_names if c in features.column_names]
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    model.eval()
    outputs: list[tuple[np.ndarray, ...]] = []
    starts = range(0, len(features), batch_size)
    with torch.no_grad(), devices.autocast(precision, device):
        for start in _progress(starts, progress):
            rows = features[start:start + batch_size]
            batch = collate([{c: rows[c][i] for c in columns} for i in range(len(rows[columns[0]]))])
            result = model(**{k: v.to(device) for k, v in batch.items()})
            outputs.append(tuple(v.float().cpu().numpy() for k, v in result.items() if k != "loss"))
    return tuple(_concat_padded([o[i] for o in outputs]) for i in range(len(outputs[0]))) if outputs else ()


def _progress(batches, title: str | None):
    """`batches` with a progress bar of that title on stderr, drawn only on a terminal (none in a log file)."""
    from tqdm.auto import tqdm

    return tqdm(batches, desc=title, disable=title is None or not sys.stderr.isatty(), file=sys.stderr, unit="batch")


def _concat_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis, padding the sequence axis (per-token outputs) with -inf."""
    if arrays[0].ndim < 2 or all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                  constant_values=-np.inf) for a in arrays])


def generation_outputs(model, features, tokenizer, task: Task, batch_size: int,
                       precision: devices.Precision | str = "fp32",
                       generate: bool = True, progress: str | None = None) -> dict[str, Any]:
    """What a generation task is scored on: the summed token loss of the labelled rows and its token count
    (teacher forcing), and the text `generate` writes for every row with the task's settings (each distinct
    input generated once: E2E's meaning representations have several references)."""
    device = next(model.parameters()).device
    causal = task.model_kind == "causal-lm"
    pad = _pad_id(tokenizer)
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
            settings = decoding(model, tokenizer, task)
            starts = range(0, len(distinct), batch_size)
            for start in _progress(starts, progress):
                chunk = distinct[start:start + batch_size]
                for ids, text in zip(chunk, _generate(model, tokenizer, chunk, settings, causal, device)):
                    written[ids] = text
            texts = [written[tuple(ids)] for ids in inputs]
    return {"loss_sum": loss_sum, "tokens": tokens, "texts": texts}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def decoding(model, tokenizer, task: Task) -> dict[str, Any]:
    """The whole of what `generate` runs with: the task's settings (`task.decoding()`), the tokenizer's end-of-text
    token (the one training appends) and padding, an encoder-decoder model's decoder start. Nothing comes from the
    checkpoint's generation_config.json (min_length, max_length, forced tokens, sampling), so train-time evaluation,
    `adalora eval` and `adalora predict` decode alike on any checkpoint; metrics.json and eval.json record it."""
    settings = {**task.decoding(), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": _pad_id(tokenizer)}
    if getattr(model.config, "is_encoder_decoder", False):
        start = getattr(model.config, "decoder_start_token_id", None)
        settings["decoder_start_token_id"] = start if start is not None else \
            model.generation_config.decoder_start_token_id
    return settings


@contextlib.contextmanager
def _only_these_settings(model, config):
    """`generate` fills every setting its `generation_config` leaves unset from `model.generation_config` (the
    checkpoint's file) before the library's defaults; with `config` standing in for it, only the library's remain."""
    shipped = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = shipped


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


def _generate(model, tokenizer, inputs: list[tuple[int, ...]], settings: dict, causal: bool, device) -> list[str]:
    """`generate` with `settings` (`decoding`) on a batch of inputs (left-padded for a decoder-only model), decoded
    without the prompt."""
    from transformers import GenerationConfig

    input_ids = _padded(inputs, settings["pad_token_id"], causal, device)
    attention = _padded([[1] * len(ids) for ids in inputs], 0, causal, device)
    config = GenerationConfig(**settings)
    with _only_these_settings(model, config):
        generated = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
    if causal:
        generated = generated[:, input_ids.shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


def task_outputs(model, features, tokenizer, task: Task, batch_size: int, precision: devices.Precision,
                 generate: bool = True,
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
            eval_set.features, eval_set.truncated = features_for(task, eval_set.raw, tokenizer,
                                                                 max_length(cfg, task, tokenizer), False,
                                                                 f"evaluation set {eval_set.name}")
        outputs = task_outputs(model, eval_set.features, tokenizer, task, cfg.eval_batch_size, precision,
                               generate=not getattr(task, "plain_lm", False))
        for name, value in task.compute_metrics(outputs, eval_set.raw, eval_set.features).items():
            metrics[name + eval_set.suffix] = round(float(value), 6)
    return metrics


# -- adalora eval ----------------------------------------------------------------------------------------

def _load_for_inference(run: Path, data_dir: str | None, rank: int | None, sweep: bool = False):
    """(the loaded run, its r_max): the model on the GPU when there is one, at `rank` when given; checked first."""
    from adalora_cli.methods import get_method

    saved = rundir.read_adapter_config(rundir.require_run(run))
    if rank is not None or sweep:
        saved.require_any_rank(get_method(saved.method), "--rank and --rank-sweep need")
    r_max = saved.r_max(rank)
    loaded = rundir.load_run(run, data_dir)
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    if rank is not None:
        set_rank(loaded.layers, rank)
    return loaded, r_max


def run_eval(run: Path, data_dir: str | None = None, rank: int | None = None, rank_sweep: bool = False,
             input_path: Path | None = None, columns: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Reload a run (or native export) and evaluate it; writes eval.json into the run folder.

    With `rank`, an any-rank adapter (DyLoRA) is evaluated truncated to that rank; with `rank_sweep`, at
    every rank from 1 to r_max (written to eval_ranks.json and drawn in eval_ranks.png). With `input_path`, a
    labelled file in the run's task format (its columns named by `columns` where they differ from the run's) is
    scored instead of the run's evaluation data, into eval-<file stem>.json.
    """
    quiet_datasets()
    cfg = rundir.read_run_config(run, data_dir)
    if input_path is None and any(v is not None for v in (columns or {}).values()):
        raise UserError("the column options name the columns of --input FILE; give --input or drop them")
    if input_path is not None and rank_sweep:
        raise UserError("--rank-sweep evaluates the run's own evaluation data; use --rank B with --input")
    eval_file = _require_file(input_path) if input_path is not None else None
    given = apply_file_columns(cfg, columns)
    require_hub(cfg, data=eval_file is None)
    _, _, evals = read_data(cfg, training=False, eval_file=eval_file)
    (cfg, saved, model, tokenizer, layers, task), r_max = _load_for_inference(run, data_dir, rank, rank_sweep)
    task = task.with_settings(**given)
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
    record = {"task": task.name, "method": saved.method, "rank": rank, "eval": metrics}
    if task.generates:
        record["decoding"] = decoding(model, tokenizer, task)
    if input_path is None:
        files.write_json(Path(run) / "eval.json", record)
    else:
        written = Path(run) / f"eval-{Path(input_path).stem}.json"
        files.write_json(written, {**record, "input": str(input_path), "rows": len(evals[0].raw)})
        logger.info("scored %s rows of %s; wrote %s", f"{len(evals[0].raw):,}", input_path, written)
    return metrics


def set_rank(layers: dict, rank: int) -> None:
    for layer in layers.values():
        layer.set_rank(rank)


# -- adalora predict -------------------------------------------------------------------------------------

PREDICT_FORMATS = ("jsonl", "glue")


def run_predict(run: Path, input_path: Path, output: Path | None = None, fmt: str = "jsonl",
                rank: int | None = None, batch_size: int | None = None,
                columns: dict[str, str | None] | None = None) -> int:
    """Predict every row of `input_path` with a trained run; writes JSONL (or GLUE's leaderboard TSV) to `output`
    (atomically) or to stdout. `columns` names the file's columns where they differ from the run's. Returns the
    number of rows."""
    quiet_datasets()
    if fmt not in PREDICT_FORMATS:
        raise UserError(f"unknown prediction format {fmt!r}; choose one of: {', '.join(PREDICT_FORMATS)}")
    cfg = rundir.read_run_config(run)
    given = apply_file_columns(cfg, columns)
    require_hub(cfg, data=False)
    task = configured_task(cfg)
    if fmt == "glue" and not hasattr(task, "leaderboard_label"):
        raise UserError(f"--format glue writes the GLUE leaderboard's TSV; {task.name} is not a GLUE task, use jsonl")
    if output is not None and Path(output).is_dir():
        raise UserError(f"--output {output} is a folder; give a file path")
    raw, ids = task.prediction_inputs(Path(input_path))
    (cfg, saved, model, tokenizer, layers, task), _ = _load_for_inference(run, None, rank)
    task = task.with_settings(**given)
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
