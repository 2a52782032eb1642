"""Reading the user's tables: every supported format, the errors that name the file and the place, column
detection, and a hub dataset without a validation split (held out, never an unrelated split)."""

from __future__ import annotations

import json

import pytest

from adalora_cli.config import RunConfig
from adalora_cli.data import pick_column, read_table, row_ids
from adalora_cli.errors import UserError
from adalora_cli.evaluation import HELD_OUT, read_data


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
    cfg = RunConfig(task="text-classification", dataset="someone/reviews")
    task, train, evals = read_data(cfg)
    assert [e.name for e in evals] == [HELD_OUT] and len(evals[0].raw) == 5 and len(train) == 45
    assert (cfg.text_column, cfg.label_column, cfg.label_names) == ("text", "label", ["a", "b"])
