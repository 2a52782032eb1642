"""Where a run's data comes from: local files, a data folder or the hub, checked before any model work; without a
validation set, a seeded share of the training data is held out (never an unrelated split). Also the model features
of a data set (`features_for`), with what was cut to fit counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adalora_cli import hub
from adalora_cli.config import RunConfig
from adalora_cli.data import held_out_split
from adalora_cli.errors import UserError
from adalora_cli.tasks import Task, get_task, take_truncation

logger = logging.getLogger("adalora_cli")

HELD_OUT = "held-out"  # the name of an evaluation set cut from the training data
INPUT = "input"  # the name of the evaluation set of `adalora eval --input`


def _column_options() -> tuple[str, ...]:
    """Every task setting that names a column of the data file (`eval --input` / `predict` options)."""
    from dataclasses import fields

    from adalora_cli.tasks import settings_classes

    return tuple(dict.fromkeys(f.name for cls in settings_classes() for f in fields(cls) if f.metadata.get("column")))


COLUMN_OPTIONS = _column_options()


def quiet_datasets() -> None:
    """Tokenising a few thousand rows needs no progress bar of its own; the Trainer's bar remains."""
    import datasets

    datasets.disable_progress_bars()


def configured_task(cfg: RunConfig) -> Task:
    """The run's task with its task-specific settings applied (doc stride, columns, class names...)."""
    return get_task(cfg.task).with_settings(cfg.task_config())


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
        if key not in task.column_settings:
            raise UserError(f"--{key.replace('_', '-')} does not apply to {task.name} runs; name the file's columns "
                            "as the task expects")
    cfg.update_task_settings(given)
    return given


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
        cfg.update_task_settings(task.settings_from_data(train_raw, str(source)), only_unset=True)
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
        limits = task.length_limits(max_seq_length)
        targets = f", the targets of {cut['targets']:,} (max_target_length)" if cut["targets"] else ""
        logger.warning("%s: cut the inputs of %s of %s rows (%s)%s; counted in metrics.json \"truncated\"", what,
                       f"{cut['inputs']:,}", f"{len(raw):,}", limits, targets)
    return features, cut
