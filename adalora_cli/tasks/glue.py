"""The nine GLUE tasks: loading (hub or the original TSV files), tokenisation, and GLUE's own metrics.

Local files are read exactly as the GLUE distribution ships them: tab-separated with quoting disabled
(some rows hold a stray `"`), CoLA without a header, MRPC's header behind a byte-order mark. Rows become
the columns and label ids of the hub's `nyu-mll/glue` so both sources feed the same code.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adalora_cli.errors import UserError
from adalora_cli.tasks.base import EvalSplit, Task, TRUNCATED_INPUT, encode_counting_cuts
from adalora_cli.tasks.classification import SequenceClassifier, classification_records, correlations
from adalora_cli.tasks.registry import register_task

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    name: str
    folder: str  # folder in the GLUE distribution
    keys: tuple[str, str | None]  # text columns, hub naming
    labels: tuple[str, ...] | None  # label names in hub id order; None: regression
    metrics: tuple[str, ...]
    tsv_columns: dict[str, str | int]  # hub column -> TSV header name (or position when no header)
    label_text: bool = False  # TSV holds label names rather than ids
    has_header: bool = True
    eval_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    max_seq_length: int = 128


SPECS = [
    GlueSpec("cola", "CoLA", ("sentence", None), ("unacceptable", "acceptable"), ("matthews_correlation",),
             {"sentence": 3, "label": 1}, has_header=False, max_seq_length=64),
    GlueSpec("sst2", "SST-2", ("sentence", None), ("negative", "positive"), ("accuracy",),
             {"sentence": "sentence", "label": "label"}),
    GlueSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
             {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}, max_seq_length=320),
    GlueSpec("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"),
             {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
    GlueSpec("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
             {"question1": "question1", "question2": "question2", "label": "is_duplicate"}, max_seq_length=320),
    GlueSpec("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
             {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}, label_text=True,
             eval_files={"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
             max_seq_length=256),
    GlueSpec("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
             {"question": "question", "sentence": "sentence", "label": "label"}, label_text=True, max_seq_length=512),
    GlueSpec("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",),
             {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, label_text=True,
             max_seq_length=320),
    GlueSpec("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
             {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
]


def read_tsv(path: Path, spec: GlueSpec) -> dict[str, list]:
    """Rows of a GLUE TSV as hub-style columns, with labels as hub ids. Bad files raise UserError."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check --data-dir or the file options") from None
    if spec.has_header:
        if not rows:
            raise UserError(f"{path} is empty; it needs a header row and at least one example")
        header, rows = [h.strip() for h in rows[0]], rows[1:]
        missing = [c for c in spec.tsv_columns.values() if c not in header]
        if missing:
            raise UserError(
                f"{path} lacks the column(s) {', '.join(map(repr, missing))} that GLUE {spec.name} needs "
                f"(found {', '.join(map(repr, header))}); use the original GLUE file"
            )
        positions = {col: header.index(name) for col, name in spec.tsv_columns.items()}
    else:
        positions = dict(spec.tsv_columns)
    width = max(positions.values()) + 1
    columns: dict[str, list] = {col: [] for col in positions}
    for line, row in enumerate(rows, start=2 if spec.has_header else 1):
        if not row:
            continue
        if len(row) < width:
            raise UserError(f"{path} line {line} has {len(row)} column(s), GLUE {spec.name} needs {width}; fix that row")
        for col, pos in positions.items():
            columns[col].append(_parse_label(row[pos], spec, path, line) if col == "label" else row[pos])
    if not columns["label"]:
        raise UserError(f"{path} holds no examples; use the original GLUE file")
    return columns


def _parse_label(value: str, spec: GlueSpec, path: Path, line: int) -> int | float:
    value = value.strip()
    try:
        if spec.labels is None:
            return float(value)
        if spec.label_text:
            return spec.labels.index(value)
        label = int(value)
    except ValueError:
        expected = "a number" if spec.labels is None else (
            " / ".join(spec.labels) if spec.label_text else f"0..{len(spec.labels) - 1}")
        raise UserError(f"{path} line {line}: label {value!r} is not {expected}; fix the label column") from None
    if not 0 <= label < len(spec.labels):
        raise UserError(f"{path} line {line}: label {label} is outside 0..{len(spec.labels) - 1} for GLUE {spec.name}; "
                        "fix the label column")
    return label


class GlueTask(SequenceClassifier, Task):
    prediction_formats = ("jsonl", "glue")  # glue: the leaderboard's TSV

    def __init__(self, spec: GlueSpec):
        self.spec = spec
        self.name = spec.name
        self.num_labels = 1 if spec.labels is None else len(spec.labels)
        self.default_max_seq_length = spec.max_seq_length
        self.metric_names = spec.metrics
        self.eval_splits = tuple(
            EvalSplit(split, "_mm" if split.endswith("mismatched") else "") for split in spec.eval_files
        )

    def headline(self, metrics: dict[str, float]) -> float:
        """The GLUE score: the mean of the task's GLUE metrics x 100 (MRPC: accuracy and F1; STS-B: Pearson and
        Spearman; MNLI: matched accuracy)."""
        return 100 * float(np.mean([metrics[name] for name in self.spec.metrics]))

    @property
    def headline_name(self) -> str:
        names = " and ".join(self.spec.metrics)
        return f"mean of {names} x 100" if len(self.spec.metrics) > 1 else f"{names} x 100"

    @property
    def group_columns(self) -> tuple[str, ...]:
        """A held-out share takes a repeated sentence (pair) with all its rows."""
        return tuple(key for key in self.spec.keys if key is not None)

    def config_overrides(self) -> dict[str, Any]:
        if self.spec.labels is None:
            return {"problem_type": "regression"}
        return {
            "problem_type": "single_label_classification",
            "id2label": dict(enumerate(self.spec.labels)),
            "label2id": {name: i for i, name in enumerate(self.spec.labels)},
        }

    def local_path(self, split, data_dir, files):
        if split in files:
            return Path(files[split])
        if data_dir is None:
            return None
        filename = "train.tsv" if split == self.train_split else self.spec.eval_files[split]
        folder = Path(data_dir)
        # Accept both the GLUE root (<dir>/SST-2/train.tsv) and the task folder itself (<dir>/train.tsv).
        return folder / filename if (folder / filename).exists() else folder / self.spec.folder / filename

    def hub_dataset(self, data_dir, files, splits):
        return (HUB_DATASET, self.name) if any(self.local_path(s, data_dir, files) is None for s in splits) else None

    def load(self, split, data_dir, files):
        import datasets

        path = self.local_path(split, data_dir, files)
        if path is not None:
            return datasets.Dataset.from_dict(read_tsv(path, self.spec))
        try:
            return datasets.load_dataset(HUB_DATASET, self.name, split=split)
        except Exception as exc:  # the hub client raises many types when offline or missing
            raise UserError(
                f"cannot load GLUE {self.name} {split} from the Hugging Face hub ({type(exc).__name__}); "
                "pass --data-dir with the GLUE TSV files for offline use"
            ) from None

    def preprocess(self, raw, tokenizer, max_seq_length, training):
        first, second = self.spec.keys
        label_dtype = np.float32 if self.spec.labels is None else np.int64

        def tokenize(batch):
            texts = (batch[first],) if second is None else (batch[first], batch[second])
            features, cut = encode_counting_cuts(tokenizer, max_seq_length, *texts)
            features[TRUNCATED_INPUT] = cut
            if "label" in batch:  # absent from rows to predict
                features["labels"] = np.asarray(batch["label"], dtype=label_dtype)
            return features

        return raw.map(tokenize, batched=True, remove_columns=raw.column_names)

    def compute_metrics(self, predictions, raw, features):
        labels = np.asarray(raw["label"])
        return glue_metrics(self.spec.metrics, np.asarray(predictions[0]), labels)

    # -- predictions -----------------------------------------------------------------------------------

    def prediction_inputs(self, path: Path):
        """Rows to predict and their ids, from a table with the task's text columns named as on the hub
        (`sentence`, `sentence1`...) or as in the GLUE files (`#1 String`...); a label column is ignored. GLUE's
        own test files (index column, header) read as they are."""
        from adalora_cli.data import read_table, row_ids, to_dataset

        columns = read_table(path)
        rows = {}
        for key in (k for k in self.spec.keys if k is not None):
            name = key if key in columns else self.spec.tsv_columns.get(key)
            if name not in columns:
                raise UserError(f"{path} has no column {key!r} (columns: {', '.join(columns)}); GLUE {self.name} "
                                f"predicts from {' and '.join(k for k in self.spec.keys if k)}")
            rows[key] = [str(v) for v in columns[name]]
        return to_dataset(rows), row_ids(columns)

    def prediction_records(self, predictions, raw, features):
        logits = np.asarray(predictions[0])
        if self.spec.labels is None:
            return [{"value": float(v)} for v in logits.reshape(-1)]
        return classification_records(logits, list(self.spec.labels))

    def format_predictions(self, records, ids, fmt):
        if fmt != "glue":
            return super().format_predictions(records, ids, fmt)
        return "index\tprediction\n" + "".join(f"{i}\t{self.leaderboard_label(r)}\n" for i, r in zip(ids, records))

    def leaderboard_label(self, record: dict) -> str:
        """A prediction as the GLUE leaderboard's TSV wants it: label names for the NLI tasks, class ids for the
        others, STS-B scores clipped to [0, 5]."""
        if self.spec.labels is None:
            return f"{min(5.0, max(0.0, record['value'])):.3f}"
        return record["label"] if self.spec.label_text else str(self.spec.labels.index(record["label"]))


def glue_metrics(names: tuple[str, ...], logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics, computed offline with scikit-learn and SciPy."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if "pearson" in names:
        return correlations(logits.reshape(-1), labels)
    predicted = logits.argmax(axis=-1)
    metrics = {}
    if "accuracy" in names:
        metrics["accuracy"] = float(accuracy_score(labels, predicted))
    if "f1" in names:
        metrics["f1"] = float(f1_score(labels, predicted))
    if "matthews_correlation" in names:
        metrics["matthews_correlation"] = float(matthews_corrcoef(labels, predicted))
    return metrics


for _spec in SPECS:
    register_task(GlueTask(_spec))
