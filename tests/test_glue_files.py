"""Every GLUE task read from its files as the GLUE distribution ships them (../shared/data/glue), through the task
registry's loaders: row counts, label ids in the hub's order, rows that hold a stray `"`, and the metric names.

The expected numbers were counted independently of our reader (`cut -f4 RTE/dev.tsv | sort | uniq -c` and the like)
and agree with the data README's canonical counts. MNLI, QQP and QNLI's training file are too large for the shared
folder: they are written here, a few rows each, in the exact layout of the GLUE files (MNLI's parse columns, its
matched and mismatched dev sets).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest

from adalora_cli.config import RunConfig
from adalora_cli.rundata import read_data
from adalora_cli.tasks import get_task

# task: (folder, split -> (rows, {label name or "min"/"max": count or value}))
SHIPPED = {
    "cola": {"train": (8551, {"acceptable": 6023, "unacceptable": 2528}),
             "validation": (1043, {"acceptable": 721, "unacceptable": 322})},
    "sst2": {"train": (67349, {"positive": 37569, "negative": 29780}),
             "validation": (872, {"positive": 444, "negative": 428})},
    "mrpc": {"train": (3668, {"equivalent": 2474, "not_equivalent": 1194}),
             "validation": (408, {"equivalent": 279, "not_equivalent": 129})},
    "stsb": {"train": (5749, {"min": 0.0, "max": 5.0}), "validation": (1500, {"min": 0.0, "max": 5.0})},
    "qnli": {"validation": (5463, {"entailment": 2702, "not_entailment": 2761})},
    "rte": {"train": (2490, {"entailment": 1249, "not_entailment": 1241}),
            "validation": (277, {"entailment": 146, "not_entailment": 131})},
    "wnli": {"train": (635, {"not_entailment": 323, "entailment": 312}),
             "validation": (71, {"not_entailment": 40, "entailment": 31})},
}

METRICS = {
    "cola": ("matthews_correlation",), "sst2": ("accuracy",), "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"), "qqp": ("accuracy", "f1"), "mnli": ("accuracy",), "qnli": ("accuracy",),
    "rte": ("accuracy",), "wnli": ("accuracy",),
}


def load(task_name: str, split: str, data_dir):
    task = get_task(task_name)
    return task, task.load(split, data_dir, {})


def label_summary(task, labels) -> dict:
    if task.spec.labels is None:
        return {"min": min(labels), "max": max(labels)}
    return {task.spec.labels[i]: n for i, n in Counter(labels).items()}


@pytest.mark.parametrize("task_name, split", [(t, s) for t, splits in SHIPPED.items() for s in splits])
def test_shipped_files_read_whole(glue_dir, task_name, split):
    rows, labels = SHIPPED[task_name][split]
    task, raw = load(task_name, split, glue_dir)
    assert len(raw) == rows
    assert label_summary(task, raw["label"]) == labels
    first, second = task.spec.keys
    for key in (first, second):
        if key is not None:
            assert all(isinstance(text, str) and text.strip() for text in raw[key]), key


@pytest.mark.parametrize("task_name, split, row, column, text, label", [
    # CoLA has no header: the first line is an example
    ("cola", "validation", 0, "sentence", "The sailors rode the breeze clear of the rocks.", 1),
    # MRPC's header starts with a byte-order mark; the second sentence opens a quote it never closes
    ("mrpc", "validation", 0, "sentence2", '"The foodservice pie business does not fit our long-term growth strategy.',
     1),
    # stray quotes: csv's default quoting would merge these rows with the following ones
    ("stsb", "validation", 698, "sentence2", '"I had mainly been" is fine, in the context you\'re using it.', 0.6),
    ("qnli", "validation", 658, "sentence", '" This term describes cells with low levels of a cell-surface marker '
     "called MHC I (major histocompatibility complex) – a situation that can arise in viral infections of host "
     "cells.", 0),
    ("rte", "validation", 137, "sentence1", '"It\'s Only a Play" is Terrence McNally\'s "Give My Regards to '
     'Broadway," a lightweight tribute to the theater as seen from the lofty but limited vantage point of Broadway '
     "artists who are consumed by New York's hit/flop mentality.", 0),
])
def test_quirky_rows_are_read_verbatim(glue_dir, task_name, split, row, column, text, label):
    task, raw = load(task_name, split, glue_dir)
    assert raw[row][column] == text
    assert raw[row]["label"] == pytest.approx(label)


def test_the_labels_are_the_hubs():
    assert get_task("rte").config_overrides()["id2label"] == {0: "entailment", 1: "not_entailment"}
    assert get_task("mnli").config_overrides()["label2id"] == {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert get_task("stsb").config_overrides() == {"problem_type": "regression"}


@pytest.mark.parametrize("task_name", sorted(METRICS))
def test_metric_names(task_name):
    """Perfect predictions score 1 under every metric of the task, named as GLUE names them."""
    task = get_task(task_name)
    assert task.metric_names == METRICS[task_name]
    if task.spec.labels is None:
        labels = np.array([0.0, 1.5, 2.5, 4.0, 5.0])
        logits = labels.reshape(-1, 1)
    else:
        labels = np.arange(2 * len(task.spec.labels)) % len(task.spec.labels)
        logits = np.eye(len(task.spec.labels))[labels]
    metrics = task.compute_metrics((logits,), {"label": labels}, None)
    assert metrics == pytest.approx({name: 1.0 for name in METRICS[task_name]})


def test_stsb_correlations_of_a_constant_prediction_are_zero_not_nan():
    """A model that predicts one score for every pair (early in training, or collapsed) has no defined correlation:
    STS-B reports 0 for Pearson and Spearman, as text-regression does, without NaN or SciPy's warning. Scores that
    vary still give the reference correlations."""
    task = get_task("stsb")
    labels = np.array([0.0, 1.2, 2.5, 3.8, 5.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert task.compute_metrics((np.full((5, 1), 2.5),), {"label": labels}, None) == {"pearson": 0.0,
                                                                                          "spearmanr": 0.0}
        assert task.compute_metrics((labels.reshape(-1, 1),), {"label": np.full(5, 3.0)}, None) == {
            "pearson": 0.0, "spearmanr": 0.0}
    scores = np.array([0.3, 0.9, 3.1, 2.9, 4.4])
    metrics = task.compute_metrics((scores.reshape(-1, 1),), {"label": labels}, None)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731  (no ties here)
    assert metrics == pytest.approx({"pearson": np.corrcoef(scores, labels)[0, 1],
                                     "spearmanr": np.corrcoef(ranks(scores), ranks(labels))[0, 1]})


# -- files too large for the shared folder, written in their exact layout -----------------------------------

MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:10] + ["label1", "label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(index: int, premise: str, hypothesis: str, label: str, dev: bool) -> list[str]:
    parse = lambda s: "( " + " ".join(s.rstrip(".").split()) + " . )"  # noqa: E731  (the parse columns' shape)
    votes = [label] * (5 if dev else 1)
    return [str(index), str(1000 + index), f"{1000 + index}e", "fiction", parse(premise), parse(hypothesis),
            "(ROOT " + parse(premise) + ")", "(ROOT " + parse(hypothesis) + ")", premise, hypothesis, *votes, label]


def write_tsv(path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


@pytest.fixture
def mnli_dir(tmp_path):
    folder = tmp_path / "glue" / "MNLI"
    pairs = [("The cat sat on the mat.", "A cat is sitting.", "entailment"),
             ('He said "maybe later.', "He refused outright.", "contradiction"),  # a stray quote, as in GLUE
             ("Кошка спит на диване.", "The cat is asleep.", "neutral")]
    write_tsv(folder / "train.tsv", MNLI_TRAIN_HEADER, [mnli_row(i, *p, dev=False) for i, p in enumerate(pairs)])
    write_tsv(folder / "dev_matched.tsv", MNLI_DEV_HEADER, [mnli_row(i, *p, dev=True) for i, p in enumerate(pairs)])
    mismatched = pairs[:2] + [("猫が寝ている。", "A dog barks.", "neutral")] + pairs[:1]
    write_tsv(folder / "dev_mismatched.tsv", MNLI_DEV_HEADER,
              [mnli_row(i, *p, dev=True) for i, p in enumerate(mismatched)])
    return tmp_path / "glue"


def test_mnli_reads_matched_and_mismatched_dev_sets(mnli_dir):
    task, train, evals = read_data(RunConfig(task="mnli", data_dir=str(mnli_dir), model="minilm-l6"))
    assert train["premise"][1] == 'He said "maybe later.' and train["label"] == [0, 2, 1]
    assert [(e.name, e.suffix, len(e.raw)) for e in evals] == [("validation_matched", "", 3),
                                                              ("validation_mismatched", "_mm", 4)]
    assert evals[1].raw["premise"][2] == "猫が寝ている。" and evals[1].raw["label"] == [0, 2, 1, 0]
    # the names evaluation writes into metrics.json: accuracy (matched) and accuracy_mm (mismatched)
    names = [name + e.suffix for e in evals for name in task.compute_metrics(
        (np.eye(3)[np.array(e.raw["label"])],), e.raw, None)]
    assert names == ["accuracy", "accuracy_mm"]


def test_mnli_from_the_task_folder_itself(mnli_dir):
    """--data-dir may name the task's folder (MNLI/) instead of the GLUE root."""
    task, raw = load("mnli", "validation_mismatched", mnli_dir / "MNLI")
    assert len(raw) == 4


def test_qqp_and_qnli_training_files(tmp_path):
    qqp = [["1", "11", "12", "How do I learn Python?", "What is the best way to learn Python?", "1"],
           ["2", "13", "14", 'What does "ok" mean?', "Why is the sky blue?", "0"]]
    write_tsv(tmp_path / "QQP" / "train.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], qqp)
    write_tsv(tmp_path / "QNLI" / "train.tsv", ["index", "question", "sentence", "label"],
              [["0", "Who wrote it?", '" Tolstoy wrote it.', "entailment"],
               ["1", "When?", "In Moscow.", "not_entailment"]])
    _, raw = load("qqp", "train", tmp_path)
    assert raw["question2"] == qqp[0][4:5] + qqp[1][4:5] and raw["label"] == [1, 0]
    assert raw["question1"][1] == 'What does "ok" mean?'
    _, raw = load("qnli", "train", tmp_path)
    assert raw["sentence"][0] == '" Tolstoy wrote it.' and raw["label"] == [0, 1]
