"""Rows cut to fit --max-seq-length are counted exactly: single texts and text pairs (own data and GLUE), with
rows just at the limit (not cut) and rows in Cyrillic and CJK; the counts match a whole-row tokenization."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from adalora_cli.tasks import get_task, take_truncation
from adalora_cli.tasks.glue import read_tsv

PAIRS = {
    "text": ["The film is a delight.", "Фильм скучный и слишком длинный, хотя актёры старались изо всех сил.",
             "这部电影很好看，我们全家都很喜欢。", "It is fine.", "A long, winding, tiresome story that goes nowhere."],
    "text_pair": ["Loved it.", "Не советую.", "推荐", "The plot, the music and the actors are all quite good, really.",
                  "Agreed."],
    "label": ["pos", "neg", "pos", "pos", "neg"],
}


def whole_lengths(tokenizer, *columns) -> list[int]:
    return [len(ids) for ids in tokenizer(*columns)["input_ids"]]


@pytest.mark.parametrize("pair", [False, True])
def test_cut_texts_are_counted_exactly(minilm_path, pair):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    columns = [PAIRS["text"]] + ([PAIRS["text_pair"]] if pair else [])
    lengths = whole_lengths(tokenizer, *columns)
    limit = sorted(lengths)[2]  # the middle row is exactly as long as the limit: it fits, it is not cut
    task = get_task("text-classification").with_settings(
        text_column="text", text_pair_column="text_pair" if pair else None, label_column="label",
        label_names=["neg", "pos"])
    features, cut = take_truncation(task.preprocess(Dataset.from_dict(PAIRS), tokenizer, limit, training=True))
    assert cut == {"inputs": sum(n > limit for n in lengths), "targets": 0} and cut["inputs"] >= 1
    assert max(len(ids) for ids in features["input_ids"]) == limit
    assert "truncated_input" not in features.column_names


def test_glue_pairs_cut_are_counted_exactly(glue_dir, minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    task = get_task("mrpc")
    rows = read_tsv(glue_dir / "MRPC" / "dev.tsv", task.spec)
    raw = Dataset.from_dict({key: values[:200] for key, values in rows.items()})
    features, cut = take_truncation(task.preprocess(raw, tokenizer, 48, training=False))
    expected = sum(n > 48 for n in whole_lengths(tokenizer, list(raw["sentence1"]), list(raw["sentence2"])))
    assert cut == {"inputs": expected, "targets": 0} and 0 < expected < 200
