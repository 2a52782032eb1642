"""The task interface: `Task` (each task knows its data, its preprocessing, its model head, how it is run and
scored, and nothing of methods), `TaskSettings` (a task family's settings, under the task's name in config.yaml),
`UserDataTask` for tasks on the user's files or a hub dataset, and the helpers task files share (truncation
columns, `encode_counting_cuts`).

The rest of the code never asks which kind of task it holds: whatever differs between tasks is a method or an
attribute here (the model class, PEFT's task type, how outputs are computed and formatted, labels, decoding).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adalora_cli.errors import UserError

DATA = "Data"  # the help panel of the data options


def setting(help: str, default: Any = None, *, column: bool = False, panel: str | None = None,
            shown: str | None = None):
    """A task-settings field with the metadata the command line is generated from (see interface notes): `column`
    marks a setting that names a column of the data file (eval --input and predict accept it too)."""
    metadata: dict[str, Any] = {"help": help}
    if column:
        metadata["column"] = True
    if column or panel:
        metadata["panel"] = panel or DATA
    if shown is not None:
        metadata["shown"] = shown
    return field(default=default, metadata=metadata)


@dataclass
class TaskSettings:
    """A task family's settings: a dataclass whose fields are options (`--doc-stride`), keys of the task's section in
    config.yaml (`squad: {doc_stride: 128}`) and `--set squad.doc_stride=64`. This base has none (GLUE)."""

    def validate(self) -> None:
        """Raise UserError on a value out of range; subclasses check their fields."""

    def require_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}; give a positive whole number")


@dataclass
class DatasetSettings(TaskSettings):
    """Where a task on the user's data reads a hub dataset from, when no file is given."""

    dataset: str | None = setting("Hub dataset to read instead of --train-file / --validation-file.", panel=DATA)
    dataset_config: str | None = setting("Its configuration.", panel=DATA)
    dataset_train_split: str = setting("The hub dataset's training split.", "train", panel=DATA)
    dataset_eval_split: str = setting("The hub dataset's evaluation split.", "validation", panel=DATA)


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation set; `suffix` is appended to its metric names (MNLI mismatched: `_mm`)."""

    split: str
    suffix: str = ""


class Task:
    """Interface of a task. Subclasses fill the attributes and implement the methods.

    Data sources: `files` maps a split ("train", or an eval split's name) to a local file, and
    `data_dir` is a folder in the original distribution's layout; with neither, the hub is used.
    """

    name: str
    num_labels: int
    auto_model: str  # the transformers Auto class of the task's model (AutoModelForSequenceClassification...)
    peft_task_type: str  # PEFT's task type of an export: SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM, CAUSAL_LM
    default_max_seq_length: int = 128
    train_split: str = "train"
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("validation"),)
    metric_names: tuple[str, ...] = ()
    settings_class: type[TaskSettings] = TaskSettings
    prediction_formats: tuple[str, ...] = ("jsonl",)  # `adalora predict --format`
    _settings: TaskSettings | None = None  # set by `with_settings`; None: the class's defaults

    @property
    def main_metric(self) -> str:
        """The metric that --keep-best and --early-stopping follow unless --metric names another."""
        return self.metric_names[0]

    @property
    def group_columns(self) -> tuple[str, ...]:
        """The columns that name a row's input. Rows sharing them (a text labelled twice, a source with several
        references, the questions of one SQuAD article) are held out together, so that no held-out input was
        trained on. Empty: every row is an input of its own."""
        return ()

    def greater_is_better(self, metric: str) -> bool:
        return metric not in ("mse", "loss", "perplexity")

    def headline(self, metrics: dict[str, float]) -> float:
        """The one number that compares runs of this task (`adalora sweep`'s tables and picture), from a run's
        evaluation metrics: the main metric by default."""
        return float(metrics[self.main_metric])

    @property
    def headline_name(self) -> str:
        """What `headline` is, for a table's caption and a picture's axis."""
        return self.main_metric

    # -- settings --------------------------------------------------------------------------------------

    @property
    def settings(self) -> TaskSettings:
        """This task's settings (`settings_class`): the run's, once configured with `with_settings`."""
        return self._settings if self._settings is not None else self.settings_class()

    def with_settings(self, settings: TaskSettings | dict[str, Any] | None = None, /, **changes: Any) -> "Task":
        """This task configured, as a copy (registered tasks stay untouched): with a `settings_class` instance (a
        run's `RunConfig.task_config()`), or with the given fields changed (a mapping or keywords; None values leave
        a field as it is). The result is validated."""
        if isinstance(settings, TaskSettings):
            values = settings
        else:
            given = {**(settings or {}), **changes}
            names = {f.name for f in dataclasses.fields(self.settings_class)}
            unknown = sorted(set(given) - names)
            if unknown:
                raise ValueError(f"{self.name} has no setting {unknown[0]!r}; its settings: {', '.join(sorted(names))}")
            values = dataclasses.replace(self.settings, **{k: v for k, v in given.items() if v is not None})
        values.validate()
        task = copy.copy(self)
        task._settings = values
        return task

    def resolved_settings(self) -> dict[str, Any]:
        """The settings this configured task uses, its defaults filled in (a generation task's target length and
        decoding), for the run's config.yaml to record; configuring the task with them again changes nothing."""
        return dataclasses.asdict(self.settings)

    @property
    def column_settings(self) -> tuple[str, ...]:
        """The settings that name a column of the data file (`eval --input` and `predict` accept them too)."""
        return tuple(f.name for f in dataclasses.fields(self.settings_class) if f.metadata.get("column"))

    # -- what the rest of the code asks instead of the task's kind -------------------------------------

    def outputs(self, model, features, tokenizer, batch_size: int, precision="fp32", progress: str | None = None,
                scoring: bool = True):
        """What the task is scored on (`scoring`) or predicts from: by default one forward's outputs
        (`inference.model_outputs`), a tuple of float32 arrays with the row axis first. A task may return a dict
        instead, whose values are numbers (summed across shards) or lists (one entry per row)."""
        from adalora_cli.inference import model_outputs

        return model_outputs(model, features, tokenizer, batch_size, precision, progress)

    def record(self, model, tokenizer) -> dict[str, Any]:
        """Extra entries of metrics.json and eval.json (a generation task: its "decoding"); none by default."""
        return {}

    def generation_config(self, model, tokenizer) -> dict[str, Any] | None:
        """The generation_config.json of a merged export, for a task that generates; None by default."""
        return None

    def label_config(self, model_config) -> dict[str, Any] | None:
        """{num_labels, id2label, label2id} for the labels.json beside a PEFT export (a classifier); None: none."""
        return None

    def class_names(self, model_config) -> list[str] | None:
        """The class names a classification run predicts, in id order (the run's summary); None for other tasks."""
        return None

    def length_limits(self, max_seq_length: int) -> str:
        """What limits an input's length, for the log line that counts the rows cut to fit."""
        return f"--max-seq-length {max_seq_length}"

    def format_predictions(self, records: list[dict[str, Any]], ids: list, fmt: str) -> str:
        """The text `adalora predict` writes in format `fmt` (one of `prediction_formats`): JSON lines by default."""
        if fmt != "jsonl":
            raise UserError(f"--format {fmt} does not apply to {self.name}; use "
                            f"{' or '.join(self.prediction_formats)}")
        return "".join(json.dumps({"id": i, **r}, ensure_ascii=False) + "\n" for i, r in zip(ids, records))

    def config_overrides(self) -> dict[str, Any]:
        """Extra fields for the model config (problem type, label names)."""
        return {}

    @property
    def model_advice(self) -> str | None:
        """The models that fit this task, for error messages that suggest another --model; None: any model with the
        task's head (the embedded MiniLM-L6 among them)."""
        return None

    def for_model(self, config) -> "Task":
        """This task for a model with this config: a generation task becomes the class that fits the model
        (encoder-decoder or decoder-only) and refuses a model that cannot generate; the others are the same for every
        model."""
        return self

    def collator(self, tokenizer):
        """Pads a list of features into a training batch."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def local_path(self, split: str, data_dir: Path | None, files: dict[str, Path]) -> Path | None:
        """The local file a split is read from, or None to use the hub."""
        raise NotImplementedError

    def check_sources(self, data_dir: Path | None, files: dict[str, Path]) -> None:
        """Fail early, before any model is loaded, when a local file is missing."""
        for split in [self.train_split] + [e.split for e in self.eval_splits]:
            path = self.local_path(split, data_dir, files)
            if path is not None and not path.is_file():
                raise UserError(f"{self.name}: {split} file {path} does not exist; check --data-dir or the file options")

    def load(self, split: str, data_dir: Path | None, files: dict[str, Path]):
        """The raw split as a `datasets.Dataset`."""
        raise NotImplementedError

    def hub_dataset(self, data_dir: Path | None, files: dict[str, Path], splits: list[str]) -> tuple[str, str | None] | None:
        """(name, configuration) of the hub dataset the task would read `splits` from with these sources, or None
        when every one of them is local."""
        return None

    def has_hub_split(self, split: str) -> bool:
        """Whether the task's hub data holds `split` (when it does not, a share of the training data is held out)."""
        return True

    def settings_from_data(self, raw, source: str) -> dict[str, Any]:
        """Settings read off the training data (columns, class names) for the run's config; none by default."""
        return {}

    def check_rows(self, raw, source: str, labelled: bool = True) -> None:
        """Fail with one line on rows the task cannot use (empty text, unknown label); nothing by default."""

    def prediction_inputs(self, path: Path):
        """(rows to predict as a `datasets.Dataset` of the task's input columns, their ids) from a file."""
        raise NotImplementedError

    def prediction_records(self, predictions, raw, features) -> list[dict[str, Any]]:
        """One JSON-able record per row of `raw` for `adalora predict` (without the id)."""
        raise NotImplementedError

    def preprocess(self, raw, tokenizer, max_seq_length: int, training: bool):
        """Model features as a `datasets.Dataset`: inputs and labels for training, inputs plus whatever
        `compute_metrics` needs for evaluation (extra columns are not fed to the model). A task that cuts rows to
        fit adds the 0/1 columns `TRUNCATED_INPUT` / `TRUNCATED_TARGET`, which `take_truncation` counts and removes."""
        raise NotImplementedError

    def compute_metrics(self, predictions, raw, features) -> dict[str, float]:
        """Metrics from `outputs` over `features` (built from `raw`)."""
        raise NotImplementedError


class UserDataTask(Task):
    """A task on the user's data: `--train-file` / `--validation-file` (.csv .tsv .json .jsonl), or a hub dataset
    (`--dataset NAME`, or the task's own benchmark dataset) whose splits are named by `dataset_train_split` /
    `dataset_eval_split`."""

    settings_class: type[TaskSettings] = DatasetSettings

    @property
    def hub_name(self) -> str | None:
        """The hub dataset this task reads when no file is given."""
        return self.settings.dataset

    @property
    def hub_config(self) -> str | None:
        return self.settings.dataset_config

    def local_path(self, split, data_dir, files):
        if split in files:
            return Path(files[split])
        if data_dir is not None:
            raise UserError(f"{self.name} reads --train-file / --validation-file (or --dataset), not --data-dir")
        return None

    def check_sources(self, data_dir, files) -> None:
        from adalora_cli.data import TABLE_FORMATS

        if self.train_split not in files and self.hub_name is None:
            raise UserError(f"{self.name} trains on your data: pass --train-file ({' '.join(TABLE_FORMATS)}) or "
                            "--dataset NAME for a hub dataset")
        super().check_sources(data_dir, files)

    def hub_dataset(self, data_dir, files, splits):
        if self.hub_name is None or all(split in files for split in splits):
            return None
        return self.hub_name, self.hub_config

    def _hub_split(self, split: str) -> str:
        settings = self.settings
        return settings.dataset_train_split if split == self.train_split else settings.dataset_eval_split

    def has_hub_split(self, split: str) -> bool:
        from adalora_cli.data import hub_split_names

        return self.hub_name is not None and self._hub_split(split) in hub_split_names(self.hub_name, self.hub_config)

    def load(self, split, data_dir, files):
        from adalora_cli.data import load_hub_dataset, read_table, to_dataset

        path = self.local_path(split, data_dir, files)
        if path is not None:
            return to_dataset(read_table(path))
        return load_hub_dataset(self.hub_name, self.hub_config, self._hub_split(split))


# Feature columns, 1 for a row whose inputs (source, prompt, text, text pair) / target (completion) were cut to fit.
TRUNCATED_INPUT, TRUNCATED_TARGET = "truncated_input", "truncated_target"


def take_truncation(features) -> tuple[Any, dict[str, int]]:
    """(`features` without the truncation columns, {"inputs": rows whose inputs were cut, "targets": ...})."""
    columns = {"inputs": TRUNCATED_INPUT, "targets": TRUNCATED_TARGET}
    present = [column for column in columns.values() if column in features.column_names]
    counts = {kind: int(sum(features[column])) if column in present else 0 for kind, column in columns.items()}
    return (features.remove_columns(present) if present else features), counts


def encode_counting_cuts(encode, max_length: int, *texts: list[str]) -> tuple[Any, list[int]]:
    """(`encode(*texts, truncation=True, max_length=max_length)`, per row 1 where that cut the row). Only the rows
    that came out exactly `max_length` long are encoded again, whole, to tell a cut row from one that just fits."""
    features = encode(*texts, truncation=True, max_length=max_length)
    ids = features["input_ids"]
    full = [i for i, row in enumerate(ids) if len(row) >= max_length]
    cut = [0] * len(ids)
    if full:
        whole = encode(*([column[i] for i in full] for column in texts), verbose=False)["input_ids"]
        for i, row in zip(full, whole):
            cut[i] = int(len(row) > max_length)
    return features, cut
