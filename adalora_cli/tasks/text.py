"""Generic tasks on the user's own data: `text-classification` and `text-regression`, single texts or pairs.

Data: `--train-file` / `--validation-file` (.csv, .tsv, .json, .jsonl) or a hub dataset (`--dataset NAME
[--dataset-config C]`, splits named by `dataset_train_split` / `dataset_eval_split`). Columns: `--text-column`,
`--text-pair-column`, `--label-column`, or detected from the training data (text / sentence / sentence1;
text_pair / sentence2; label / labels / score). What was detected, and the class names, are written into the
run's config, so `eval`, `predict` and the exports use the same columns and classes.

Classes are the distinct labels of the training data (strings or numbers; numbers compare as numbers, so 1, 1.0
and "1" are one class), sorted; their names are kept in
metrics, predictions and every export's `id2label`. Metrics: accuracy and macro-F1 (two classes: also the F1 of
the second class, `f1`); regression: Pearson, Spearman and mean squared error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adalora_cli.data import pick_column, read_table, to_dataset
from adalora_cli.errors import UserError
from adalora_cli.tasks.base import (TRUNCATED_INPUT, DatasetSettings, EvalSplit, UserDataTask, encode_counting_cuts,
                                    setting)
from adalora_cli.tasks.classification import (SequenceClassifier, classification_metrics, classification_records,
                                              regression_metrics)
from adalora_cli.tasks.registry import register_task

TEXT_COLUMNS = ("text", "sentence", "sentence1")
PAIR_COLUMNS = ("text_pair", "sentence2")
LABEL_COLUMNS = ("label", "labels", "score")


@dataclass
class TextSettings(DatasetSettings):
    """The columns and classes of the user's data: given, or read off the training data (and then recorded)."""

    text_column: str | None = setting("Text column.", column=True, shown="text / sentence / sentence1")
    text_pair_column: str | None = setting("Second text of a pair.", column=True,
                                           shown="text_pair / sentence2 if present")
    label_column: str | None = setting("Label column.", column=True, shown="label / labels / score")
    label_names: list[str] | None = setting("Classification: the class names, in id order.",
                                            shown="the training data's distinct labels, sorted")


class TextTask(SequenceClassifier, UserDataTask):
    eval_splits = (EvalSplit("validation"),)
    settings_class = TextSettings

    def __init__(self, name: str, regression: bool):
        self.name = name
        self.regression = regression
        self.metric_names = ("pearson", "spearmanr", "mse") if regression else ("accuracy", "macro_f1", "f1")

    @property
    def text_column(self) -> str | None:
        return self.settings.text_column

    @property
    def text_pair_column(self) -> str | None:
        return self.settings.text_pair_column

    @property
    def label_column(self) -> str | None:
        return self.settings.label_column

    @property
    def label_names(self) -> list[str] | None:
        return self.settings.label_names

    @property
    def group_columns(self) -> tuple[str, ...]:
        """A held-out share takes a repeated text (or text pair) with all its rows."""
        return tuple(self.input_columns())

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.label_names or ())

    def config_overrides(self) -> dict[str, Any]:
        if self.regression:
            name = self.label_column or "score"
            return {"problem_type": "regression", "id2label": {0: name}, "label2id": {name: 0}}
        names = self.label_names or []
        return {"problem_type": "single_label_classification", "id2label": dict(enumerate(names)),
                "label2id": {name: i for i, name in enumerate(names)}}

    # -- data ------------------------------------------------------------------------------------------

    def settings_from_data(self, raw, source: str) -> dict[str, Any]:
        """The columns (given or detected) and, for classification, the class names of the training data. A column
        named for one role is never detected for another (`--text-column sentence2` is not also the pair)."""
        found = list(raw.column_names)
        taken = [self.text_column, self.text_pair_column, self.label_column]
        text = pick_column(found, self.text_column, TEXT_COLUMNS, "text", "--text-column", source, taken=tuple(taken))
        taken.append(text)
        pair = pick_column(found, self.text_pair_column, PAIR_COLUMNS, "text pair", "--text-pair-column", source,
                           required=False, taken=tuple(taken))
        taken.append(pair)
        label = pick_column(found, self.label_column, LABEL_COLUMNS, "label", "--label-column", source,
                            taken=tuple(taken))
        settings = {"text_column": text, "text_pair_column": pair, "label_column": label}
        if not self.regression and self.label_names is None:
            settings["label_names"] = class_names(raw[label])
            if len(settings["label_names"]) < 2:
                raise UserError(f"{source} has {len(settings['label_names'])} distinct label(s) in column {label!r}; "
                                "classification needs at least two classes")
        return settings

    def require_columns(self, found: list[str], source: str, labelled: bool = True) -> None:
        """One line naming the first of the run's columns that `found` (a file's real columns) lacks."""
        columns = [(self.text_column, "--text-column")]
        if self.text_pair_column:
            columns.append((self.text_pair_column, "--text-pair-column"))
        if labelled:
            columns.append((self.label_column, "--label-column"))
        for column, flag in columns:
            pick_column(found, column, (), "", flag, source)

    def check_rows(self, raw, source: str, labelled: bool = True) -> None:
        self.require_columns(list(raw.column_names), source, labelled)
        for column in self.input_columns():
            for i, value in enumerate(raw[column]):
                if not isinstance(value, str) or not value.strip():
                    shown = "empty" if _empty(value) else repr(value)
                    raise UserError(f"{source} row {i + 1}: {column!r} is {shown}; every row needs a non-empty text "
                                    "(remove or fill that row)")
        if labelled:
            self.label_ids(raw, source)

    def label_ids(self, raw, source: str = "the data") -> np.ndarray:
        """The gold labels of `raw` as model targets: class ids, or float scores for regression."""
        values = raw[self.label_column]
        for i, value in enumerate(values):
            if _empty(value):
                raise UserError(f"{source} row {i + 1}: the label ({self.label_column!r}) is empty; every row needs a "
                                "label (fill it in or remove that row)")
        if self.regression:
            targets = []
            for i, value in enumerate(values):
                try:
                    if isinstance(value, bool):
                        raise ValueError
                    targets.append(float(value))
                except (TypeError, ValueError):
                    raise UserError(f"{source} row {i + 1}: {self.label_column!r} is {value!r}, not a number; "
                                    "text-regression needs numeric targets") from None
                if not np.isfinite(targets[-1]):
                    raise UserError(f"{source} row {i + 1}: {self.label_column!r} is {value!r}; give a finite number")
            return np.asarray(targets, dtype=np.float32)
        index = {label_key(name): i for i, name in enumerate(self.label_names)}
        ids = []
        for i, value in enumerate(values):
            if label_key(value) not in index:
                raise UserError(f"{source} row {i + 1}: label {value!r} was not seen in the training data (classes: "
                                f"{', '.join(self.label_names)}); fix the label or add such rows to the training data")
            ids.append(index[label_key(value)])
        return np.asarray(ids, dtype=np.int64)

    # -- features and metrics --------------------------------------------------------------------------

    def input_columns(self) -> list[str]:
        return [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])

    def preprocess(self, raw, tokenizer, max_seq_length, training):
        labelled = self.label_column in raw.column_names
        targets = self.label_ids(raw) if labelled else None

        def tokenize(batch, indices):
            texts = [batch[column] for column in self.input_columns()]
            features, cut = encode_counting_cuts(tokenizer, max_seq_length, *texts)
            features[TRUNCATED_INPUT] = cut
            if targets is not None:
                features["labels"] = targets[indices]
            return features

        return raw.map(tokenize, batched=True, with_indices=True, remove_columns=raw.column_names)

    def compute_metrics(self, predictions, raw, features):
        logits = np.asarray(predictions[0])
        labels = self.label_ids(raw)
        if self.regression:
            return regression_metrics(logits.reshape(-1), labels)
        return classification_metrics(logits.argmax(axis=-1), labels, len(self.label_names))

    def prediction_inputs(self, path: Path):
        """Rows to predict (the run's text columns; a label column is ignored) and their ids."""
        from adalora_cli.data import row_ids

        columns = read_table(path)
        self.require_columns(list(columns), str(path), labelled=False)
        raw = to_dataset({c: columns[c] for c in self.input_columns()})
        self.check_rows(raw, str(path), labelled=False)
        return raw, row_ids(columns)

    def prediction_records(self, predictions, raw, features) -> list[dict[str, Any]]:
        logits = np.asarray(predictions[0])
        if self.regression:
            return [{"value": float(v)} for v in logits.reshape(-1)]
        return classification_records(logits, self.label_names)


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def label_key(value) -> float | str:
    """What a class label is compared by: a number as a number (1, 1.0 and "1" are one class, whether a file holds
    them as JSON integers, floats or CSV text), anything else as its text."""
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and math.isfinite(number):
            return number
    return str(value)


def class_names(values) -> list[str]:
    """The distinct non-empty labels as class names (each as first written), in numeric order when every label is
    a number, else in text order."""
    names: dict[float | str, str] = {}
    for value in values:
        if not _empty(value):
            names.setdefault(label_key(value), str(value))
    numeric = all(isinstance(key, float) for key in names)
    return [names[key] for key in sorted(names, key=lambda k: k if numeric else names[k])]


register_task(TextTask("text-classification", regression=False))
register_task(TextTask("text-regression", regression=True))
