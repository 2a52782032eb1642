"""Reading the user's tables: every supported format, the errors that name the file and the place, column
detection, and a hub dataset without a validation split (held out, never an unrelated split)."""

from __future__ import annotations

import json

import pytest

from adalora_cli.config import RunConfig
from adalora_cli.data import pick_column, read_table, row_ids
from adalora_cli.errors import UserError
from adalora_cli.rundata import HELD_OUT, read_data


@pytest.mark.parametrize("name, text", [
    ("rows.csv", 'text,label\n"a, quoted\nline",good\nplain,bad\n'),
    ("rows.tsv", 'text\tlabel\na, "quoted\tgood\nplain\tbad\n'),  # TSV: no quoting, a stray quote is text
    ("rows.json", json.dumps([{"text": "a", "label": "good"}, {"text": "plain", "label": "bad"}])),
    ("rows.json", json.dumps({"data": [{"text": "a", "label": "good"}, {"text": "plain", "label": "bad"}]})),
    ("rows.json", '{"text": "a", "label": "good"}\n{"text": "plain", "label": "bad"}\n'),  # JSON lines named .json
    ("rows.jsonl", '{"text": "a", "label": "good"}\n\n{"text": "plain", "label": "bad"}\n'),
])
def test_every_format_reads_to_the_same_columns(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    columns = read_table(path)
    assert list(columns) == ["text", "label"] and columns["label"] == ["good", "bad"]
    assert columns["text"][1] == "plain"


@pytest.mark.parametrize("name, text, fragment", [
    ("rows.csv", "text,label\nfine,good,extra\n", "line 2 has 3 field(s), the header has 2"),
    ("rows.csv", "text,text\nfine,good\n", "empty or repeated column names"),
    ("rows.csv", "text,label\n", "holds no rows"),
    ("rows.jsonl", '{"text": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("rows.jsonl", '{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ("rows.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "row 2 has the fields ['text'], not those of the first"),
    ("rows.json", '{"a": [1], "b": [2]}', "holds an object; give a list of row objects"),
    ("rows.parquet", "x", "unknown file type .parquet"),
])
def test_bad_tables_are_one_line_naming_the_place(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=None) as error:
        read_table(path)
    assert fragment in str(error.value) and str(path) in str(error.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("text,label\ntrès,1\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8"):
        read_table(path)


def test_column_detection_and_ids():
    found = ["idx", "sentence1", "sentence2", "labels"]
    assert pick_column(found, None, ("text", "sentence", "sentence1"), "text", "--text-column", "f") == "sentence1"
    assert pick_column(found, None, ("text_pair", "sentence2"), "pair", "--text-pair-column", "f", required=False) \
        == "sentence2"
    assert pick_column(["text"], None, ("text_pair",), "pair", "--text-pair-column", "f", required=False) is None
    assert row_ids({"idx": [7, 9], "text": ["a", "b"]}) == [7, 9]
    assert row_ids({"text": ["a", "b"]}) == [0, 1]


def test_a_hub_dataset_without_a_validation_split_is_held_out(monkeypatch):
    """`--dataset NAME` whose hub copy has no `validation` split: 10% of its training split is held out."""
    import datasets

    rows = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)], "label": ["a", "b"] * 25})
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config=None: ["train", "test"])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: rows)
    cfg = RunConfig(task="text-classification", task_args={"text-classification": {"dataset": "someone/reviews"}})
    task, train, evals = read_data(cfg)
    assert [e.name for e in evals] == [HELD_OUT] and len(evals[0].raw) == 5 and len(train) == 45
    settings = cfg.task_config()
    assert (settings.text_column, settings.label_column, settings.label_names) == ("text", "label", ["a", "b"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_held_out_source_with_several_references_is_never_trained_on(tmp_path):
    """50 sources x 4 references (E2E's shape), seq2seq data without a validation file: the held-out share takes
    whole sources, so no held-out source was trained on, and every reference of a held-out source is scored."""
    rows = [{"source": f"name[Ресторан {s}] food[寿司] area[riverside {s}]", "target": f"reference {r} of {s}"}
            for r in range(4) for s in range(50)]  # references of a source far apart, as when a file is sorted
    cfg = RunConfig(task="seq2seq", train_file=str(write_jsonl(tmp_path / "e2e.jsonl", rows)))
    _, train, evals = read_data(cfg)
    held = evals[0].raw
    assert set(held["source"]).isdisjoint(train["source"])
    assert len(set(held["source"])) == 5 and len(held) == 20 and len(train) == 180  # 10% of the sources
    assert all(list(held["source"]).count(source) == 4 for source in set(held["source"]))  # every reference


def test_a_held_out_text_or_pair_is_never_trained_on(tmp_path):
    """Classification rows that repeat a text (or a text pair) with several labels go to one side together;
    the same first text with another second text is another input."""
    rows = [{"sentence1": f"Предложение {i % 30}", "sentence2": f"第{i % 60}句", "label": ["a", "b", "c"][i % 3]}
            for i in range(240)]
    cfg = RunConfig(task="text-classification", train_file=str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    _, train, evals = read_data(cfg)
    held = evals[0].raw
    pairs = set(zip(train["sentence1"], train["sentence2"]))
    assert not pairs & set(zip(held["sentence1"], held["sentence2"]))
    assert len(held) == 24 and len(train) + len(held) == 240  # 6 of the 60 distinct pairs, 4 rows each


def test_unique_inputs_split_as_rows_alone_would(tmp_path):
    """Grouping by the input changes nothing when no input repeats: the seeded share of the rows as before."""
    import numpy as np

    from adalora_cli.data import held_out_split, to_dataset

    raw = to_dataset({"text": [f"row {i}" for i in range(50)], "label": ["a", "b"] * 25})
    order = np.random.default_rng(3).permutation(50)
    train, held = held_out_split(raw, 0.1, seed=3, group_columns=("text",))
    assert held["text"] == [f"row {i}" for i in sorted(order[:5])]
    assert train["text"] == [f"row {i}" for i in sorted(order[5:])]


def test_a_named_column_is_never_detected_again():
    """--text-column sentence2 on a file with sentence1 / sentence2: sentence2 is the text, not also its pair."""
    from adalora_cli.data import to_dataset
    from adalora_cli.tasks import get_task

    raw = to_dataset({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": ["x", "y"]})
    task = get_task("text-classification").with_settings(text_column="sentence2")
    settings = task.settings_from_data(raw, "f.csv")
    assert (settings["text_column"], settings["text_pair_column"]) == ("sentence2", None)
    task = get_task("text-classification").with_settings(label_column="text")  # a column named text holds labels
    settings = task.settings_from_data(to_dataset({"text": ["x", "y"], "sentence": ["a", "b"]}), "f.csv")
    assert (settings["text_column"], settings["label_column"]) == ("sentence", "text")


@pytest.mark.parametrize("train_labels, dev_labels", [
    ([1.0, 0.0, 1.0], [1, 0]),  # JSON: floats in training, integers in validation
    (["1", "0", "1"], [1.0, 0]),  # CSV-like text in training
    ([1, 0, 1.0], ["1.0", "0"]),  # one class written two ways is one class
])
def test_numeric_labels_compare_as_numbers(tmp_path, train_labels, dev_labels):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(train_labels)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": f"d{i}", "label": v} for i, v in enumerate(dev_labels)])
    cfg = RunConfig(task="text-classification", train_file=str(train), validation_file=str(dev))
    task, train_raw, evals = read_data(cfg)
    names = cfg.task_config().label_names
    assert len(names) == 2 and float(names[0]) == 0 and float(names[1]) == 1
    assert task.label_ids(evals[0].raw).tolist() == [1, 0]
    assert task.label_ids(train_raw).tolist() == [1, 0, 1]
