"""`adalora eval` and `adalora predict`: a trained run reloaded and evaluated, or run over new rows."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from adalora_cli import distributed, files, rundir
from adalora_cli.errors import UserError
from adalora_cli.evaluation import evaluate
from adalora_cli.inference import sharded_outputs
from adalora_cli.rundata import (apply_file_columns, configured_task, max_length, quiet_datasets, read_data,
                                 require_hub)

logger = logging.getLogger("adalora_cli")


def _require_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise UserError(f"--input {path} does not exist; give the file to read")
    return Path(path)


def _load_for_inference(run: rundir.RunDir, rank: int | None, sweep: bool = False):
    """(the loaded run, its r_max): the model on the GPU when there is one, at `rank` when given; checked first."""
    from adalora_cli.methods import get_method

    saved = run.adapter
    if rank is not None or sweep:
        saved.require_any_rank(get_method(saved.method), "--rank and --rank-sweep need")
    r_max = saved.r_max(rank)
    loaded = run.load()
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    if rank is not None:
        set_rank(loaded.layers, rank)
    return loaded, r_max


@distributed.across_processes
def run_eval(run: Path, data_dir: str | None = None, rank: int | None = None, rank_sweep: bool = False,
             input_path: Path | None = None, columns: dict[str, str | None] | None = None) -> dict[str, Any] | None:
    """Reload a run (or native export) and evaluate it; writes eval.json into the run folder.

    With `rank`, an any-rank adapter (DyLoRA) is evaluated truncated to that rank; with `rank_sweep`, at
    every rank from 1 to r_max (written to eval_ranks.json and drawn in eval_ranks.png). With `input_path`, a
    labelled file in the run's task format (its columns named by `columns` where they differ from the run's) is
    scored instead of the run's evaluation data, into eval-<file stem>.json. Under torchrun each process evaluates
    its shard of the rows; the main process writes the files and returns the metrics, the others return None.
    """
    quiet_datasets()
    run = rundir.RunDir(run, data_dir)
    cfg = run.config
    if input_path is None and any(v is not None for v in (columns or {}).values()):
        raise UserError("the column options name the columns of --input FILE; give --input or drop them")
    if input_path is not None and rank_sweep:
        raise UserError("--rank-sweep evaluates the run's own evaluation data; use --rank B with --input")
    eval_file = _require_file(input_path) if input_path is not None else None
    given = apply_file_columns(cfg, columns)
    require_hub(cfg, data=eval_file is None)
    _, _, evals = read_data(cfg, training=False, eval_file=eval_file)
    (cfg, saved, model, tokenizer, layers, task), r_max = _load_for_inference(run, rank, rank_sweep)
    task = task.with_settings(given)
    precision = cfg.compute_precision()
    if rank_sweep:
        by_rank = {}
        for b in range(1, r_max + 1):
            set_rank(layers, b)
            by_rank[b] = evaluate(model, tokenizer, task, evals, cfg, precision)
            logger.info("rank %d: %s", b, by_rank[b])
        if not distributed.is_main():
            return None
        run.write_json(run.EVAL_RANKS, {str(b): m for b, m in by_rank.items()})
        from adalora_cli.report import plot_rank_sweep

        plot_rank_sweep(by_rank, run / run.EVAL_RANKS_PLOT, f"{run.path.resolve().name}: any-rank evaluation")
        return by_rank
    metrics = evaluate(model, tokenizer, task, evals, cfg, precision)
    if not distributed.is_main():
        return None
    record = {"task": task.name, "method": saved.method, "rank": rank, "eval": metrics, **task.record(model, tokenizer)}
    if input_path is not None:
        record.update(input=str(input_path), rows=len(evals[0].raw))
    written = run.write_json(run.eval_name(input_path), record)
    if input_path is not None:
        logger.info("scored %s rows of %s; wrote %s", f"{len(evals[0].raw):,}", input_path, written)
    return metrics


def set_rank(layers: dict, rank: int) -> None:
    for layer in layers.values():
        layer.set_rank(rank)


@distributed.across_processes
def run_predict(run: Path, input_path: Path, output: Path | None = None, fmt: str = "jsonl",
                rank: int | None = None, batch_size: int | None = None,
                columns: dict[str, str | None] | None = None) -> int:
    """Predict every row of `input_path` with a trained run; writes JSONL (or GLUE's leaderboard TSV) to `output`
    (atomically) or to stdout. `columns` names the file's columns where they differ from the run's. Returns the
    number of rows. Under torchrun each process runs its shard of the rows and the main process writes them all."""
    quiet_datasets()
    from adalora_cli.tasks import prediction_formats

    if fmt not in prediction_formats():
        raise UserError(f"unknown prediction format {fmt!r}; choose one of: {', '.join(prediction_formats())}")
    run = rundir.RunDir(run)
    cfg = run.config
    given = apply_file_columns(cfg, columns)
    require_hub(cfg, data=False)
    task = configured_task(cfg)
    if fmt not in task.prediction_formats:
        raise UserError(f"--format {fmt} does not apply to {task.name} runs; use "
                        f"{' or '.join(task.prediction_formats)}")
    if output is not None and Path(output).is_dir():
        raise UserError(f"--output {output} is a folder; give a file path")
    raw, ids = task.prediction_inputs(Path(input_path))
    (cfg, saved, model, tokenizer, layers, task), _ = _load_for_inference(run, rank)
    task = task.with_settings(given)
    precision = cfg.compute_precision()
    features = task.preprocess(raw, tokenizer, max_length(cfg, task, tokenizer), training=False)
    batch_size = batch_size or cfg.eval_batch_size
    progress = f"predicting {len(raw):,} rows" if distributed.is_main() else None
    outputs = sharded_outputs(lambda shard: task.outputs(model, shard, tokenizer, batch_size, precision,
                                                         progress=progress, scoring=False),
                              features, batch_size)
    if not distributed.is_main():
        return len(raw)
    records = task.prediction_records(outputs, raw, features)
    text = task.format_predictions(records, ids, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(Path(output), text)
        logger.info("wrote %s predictions to %s", f"{len(records):,}", output)
    return len(records)
