"""Token classification (NER): the CoNLL reader, label alignment on first sub-tokens, the strict IOB2 scores against
hand-computed ones, entities with character offsets, truncation, the user errors; then one short LoRA run on
CoNLL-2003 with MiniLM-L6 (predict, eval, merged export in a Transformers pipeline, PEFT export)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import rundir
from adalora_cli.cli import app
from adalora_cli.errors import UserError
from adalora_cli.tasks import TRUNCATED_INPUT, get_task
from adalora_cli.tasks.ner import (align_labels, encode_words, entity_spans, needs_prefix_space, parse_conll,
                                   read_conll, tag_names, tagging_metrics, to_iob2)
from conftest import DATA_DIR

NER_DIR = DATA_DIR / "ner"
CONLL_NAMES = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]
runner = CliRunner()


def dataset(columns):
    import datasets

    return datasets.Dataset.from_dict(columns)


def ner_task(name="token-classification", **settings):
    return get_task(name).with_settings(**settings)


# -- reading --------------------------------------------------------------------------------------------------

def test_conll_reader_takes_first_and_last_columns_skips_docstart_and_reads_crlf_and_a_last_line_without_newline(
        tmp_path):
    text = ("-DOCSTART- -X- -X- O\r\n\r\n"
            "EU NNP B-NP B-ORG\r\nrejects\tO\r\n\t\r\n"  # a tab-only line ends a sentence (WNUT-17's train file)
            "Москва NNP B-NP B-LOC\r\n東京 B-LOC\r\n\r\n\r\n"
            "-DOCSTART- -X- -X- O\r\n"
            "Peter B-PER\r\nBlackburn  I-PER")  # two spaces, and no newline at the end
    path = tmp_path / "mixed.conll"
    path.write_bytes(text.encode("utf-8"))
    raw = read_conll(path)
    assert raw["tokens"] == [["EU", "rejects"], ["Москва", "東京"], ["Peter", "Blackburn"]]
    assert raw["tags"] == [["B-ORG", "O"], ["B-LOC", "B-LOC"], ["B-PER", "I-PER"]]
    assert raw["line"] == [3, 6, 11]


def test_conll_reader_names_the_line_of_a_one_column_line_and_of_a_tag_that_is_not_iob2(tmp_path):
    with pytest.raises(UserError, match=r"f.conll line 4 has one column \('lamb'\)"):
        parse_conll("EU B-ORG\nrejects O\n\nlamb\n", "f.conll")
    with pytest.raises(UserError, match=r"f.conll line 2: tag 'S-PER' is not IOB2"):
        parse_conll("EU B-ORG\nPeter S-PER\n", "f.conll")
    with pytest.raises(UserError, match="holds no sentences"):
        parse_conll("-DOCSTART- O\n\n\t\n", "f.conll")
    # rows to predict need no tag column
    assert parse_conll("lamb\nchops x\n", "f.conll", tagged=False)["tokens"] == [["lamb", "chops"]]


def test_tag_names_are_o_first_then_sorted_and_iob1_rows_read_as_iob2():
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    assert to_iob2(["B-PER", "I-PER", "O"]) == ["B-PER", "I-PER", "O"]
    assert tag_names([["B-PER", "I-PER", "O"], ["B-LOC"]]) == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]


def test_row_errors_are_one_line_each():
    task = ner_task(tokens_column="tokens", tags_column="tags", label_names=["O", "B-PER", "I-PER"])
    cases = [
        ({"tokens": [["a", "b"]], "tags": [["O"]]}, r"row 1: 2 token\(s\) but 1 tag\(s\)"),
        ({"tokens": [["a"], []], "tags": [["O"], []]}, r"row 2: the token list is empty"),
        ({"tokens": [["a", " "]], "tags": [["O", "O"]]}, r"row 1: token 2 is empty"),
        ({"tokens": [["Paris"]], "tags": [["B-LOC"]]}, r"row 1: tag 'B-LOC' was not seen in the training data"),
        ({"tokens": [["Paris"]], "tags": [[7]]}, r"row 1: tag 7 is outside 0..2"),
    ]
    for columns, message in cases:
        with pytest.raises(UserError, match=message):
            task.check_rows(dataset(columns), "eval.jsonl")
    # integer tags name the classes by position in label_names
    task.check_rows(dataset({"tokens": [["Ann", "Lee"]], "tags": [[1, 2]]}), "ok.jsonl")
    with pytest.raises(UserError, match="the tags are numbers; name them with label_names"):
        ner_task().settings_from_data(dataset({"tokens": [["Ann"]], "tags": [[1]]}), "train.jsonl")


def test_columns_are_detected_or_renamed(tmp_path):
    rows = [{"words": ["Ann", "Lee"], "ner_tags": ["B-PER", "I-PER"]}, {"words": ["in", "Paris"],
                                                                         "ner_tags": ["O", "B-LOC"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = ner_task()
    raw = task.load("train", None, {"train": path})
    assert task.settings_from_data(raw, str(path)) == {
        "tokens_column": "words", "tags_column": "ner_tags", "label_names": ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]}
    with pytest.raises(UserError, match="has no column 'toks'.*--tokens-column"):
        ner_task(tokens_column="toks").settings_from_data(raw, str(path))


def test_a_conll_file_takes_the_runs_column_names(tmp_path):
    """A run trained on JSON rows of `words` and `ner_tags` evaluates a CoNLL file as well."""
    path = tmp_path / "dev.conll"
    path.write_text("Ann B-PER\nLee I-PER\n")
    raw = ner_task(tokens_column="words", tags_column="ner_tags").load("validation", None, {"validation": path})
    assert (raw["words"], raw["ner_tags"]) == ([["Ann", "Lee"]], [["B-PER", "I-PER"]])


def test_the_hub_datasets_integer_tags_are_read_as_their_class_names(monkeypatch):
    """The hub path, offline: a dataset shaped like eriktks/conll2003 (ner_tags a sequence of ClassLabel) stands in
    for `load_hub_dataset`."""
    import datasets

    from adalora_cli import data

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    asked = []

    def fake_hub(name, config, split):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict({"tokens": [["Ann", "Lee", "left"]], "ner_tags": [[1, 2, 0]]},
                                          features=features)

    monkeypatch.setattr(data, "load_hub_dataset", fake_hub)
    task = get_task("conll2003")
    assert task.hub_dataset(None, {}, ["train", "validation", "test"]) == ("eriktks/conll2003", None)
    raw = task.load("test", None, {})
    assert asked == [("eriktks/conll2003", None, "test")] and raw["ner_tags"] == [["B-PER", "I-PER", "O"]]
    assert task.settings_from_data(raw, "hub")["label_names"] == ["O", "B-PER", "I-PER"]


def test_training_on_a_file_with_rows_of_unequal_length_fails_with_one_line(tmp_path, minilm_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"tokens": ["Ann", "Lee"], "tags": ["B-PER", "I-PER"]}\n{"tokens": ["in", "Paris"], '
                    '"tags": ["O"]}\n')
    result = runner.invoke(app, ["train", "--task", "token-classification", "--train-file", str(path), "--model",
                                 minilm_path, "--method", "lora", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"adalora: error: {path} row 2: 2 token(s) but 1 tag(s); give one tag per "
                                     "token")


# -- features ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def test_labels_sit_on_each_words_first_sub_token(bert_tokenizer):
    words, tags = ["Johanson", "visited", "Москва", "."], ["B-PER", "O", "B-LOC", "O"]
    task = ner_task(tokens_column="tokens", tags_column="tags", label_names=tag_names([tags]))
    features = task.preprocess(dataset({"tokens": [words], "tags": [tags]}), bert_tokenizer, 64, training=True)
    # the reference: each word tokenised alone; its label on its first piece, -100 on the rest and on [CLS] [SEP]
    expected, ids = [-100], [bert_tokenizer.cls_token_id]
    for word, tag in zip(words, tags):
        pieces = bert_tokenizer.tokenize(word)
        expected += [task.label_names.index(tag)] + [-100] * (len(pieces) - 1)
        ids += bert_tokenizer.convert_tokens_to_ids(pieces)
    expected.append(-100)
    ids.append(bert_tokenizer.sep_token_id)
    assert len(bert_tokenizer.tokenize("Johanson")) > 1 and len(bert_tokenizer.tokenize("Москва")) > 1
    assert features["input_ids"][0] == ids
    assert features["labels"][0] == expected
    assert features[TRUNCATED_INPUT] == [0]
    assert align_labels([None, 0, 0, 1, None], [5, 6]) == [-100, 5, -100, 6, -100]


def test_a_cut_sentence_scores_its_lost_words_as_missed_entities(bert_tokenizer):
    """Metrics count every gold entity of the whole sentence: the words cut by --max-seq-length count as predicted O,
    so a model right on every kept word still misses the entity in the cut tail."""
    words = ["Ann", "met", "Bob", "in", "the", "old", "town", "of", "Paris"]
    tags = ["B-PER", "O", "B-PER", "O", "O", "O", "O", "O", "B-LOC"]
    task = ner_task(tokens_column="tokens", tags_column="tags", label_names=tag_names([tags]))
    raw = dataset({"tokens": [words], "tags": [tags]})
    features = task.preprocess(raw, bert_tokenizer, 6, training=False)  # [CLS] + 4 words + [SEP]
    assert features[TRUNCATED_INPUT] == [1]
    kept = [w for w in features["word_ids"][0] if w >= 0]
    assert kept == [0, 1, 2, 3]
    logits = np.full((1, 6, len(task.label_names)), -5.0)
    for position, w in enumerate(features["word_ids"][0]):  # right on every kept word
        if w >= 0:
            logits[0, position, task.label_names.index(tags[w])] = 5.0
    metrics = task.compute_metrics((logits,), raw, features)
    assert metrics["precision"] == 1.0 and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.8) and metrics["accuracy"] == pytest.approx(8 / 9)


def byte_level_tokenizer():
    from tokenizers import processors
    from transformers import RobertaTokenizerFast

    from model_folders import byte_level_bpe

    sentences = ["Peter Blackburn said on Thursday that the European Commission disagreed",
                 "Москва и 東京 are cities", "He lives in Brussels"] * 20
    bpe = byte_level_bpe(sentences, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], vocab_size=400)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def test_byte_level_bpe_words_are_tokenized_as_in_running_text(bert_tokenizer):
    tokenizer = byte_level_tokenizer()
    assert needs_prefix_space(tokenizer) and not needs_prefix_space(bert_tokenizer)
    words = ["Peter", "Blackburn", "lives", "in", "Москва", "東京"]
    encoding, cut = encode_words(tokenizer, [words], 64)
    # each word as it follows a space in text (RoBERTa's Ġ), not as the start of a text
    assert encoding["input_ids"][0] == tokenizer(" " + " ".join(words))["input_ids"]
    assert encoding["input_ids"][0] != tokenizer(words, is_split_into_words=True)["input_ids"]
    assert cut == [0]
    assert sorted(set(w for w in encoding.word_ids(0) if w is not None)) == list(range(len(words)))


def test_a_roberta_with_a_byte_level_tokenizer_trains_and_predicts(tmp_path):
    """End to end on a tiny RoBERTa whose tokenizer (byte-level BPE, no prefix space) was trained here: training,
    evaluation with a cut sentence, and predictions of one tag per word."""
    from transformers import AutoModel

    from conftest import ON_CPU, tiny_config

    tokenizer = byte_level_tokenizer()
    model_dir = tmp_path / "roberta"
    config = tiny_config("roberta", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"tokens": ["Peter", "Blackburn", "lives", "in", "Москва"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
            {"tokens": ["東京", "is", "a", "city"], "tags": ["B-LOC", "O", "O", "O"]}] * 8
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--task", "token-classification", "--train-file", str(train),
                                 "--validation-file", str(train), "--model", str(model_dir), "--method", "adalora",
                                 "--budget", "2k", "--max-steps", "4", "--batch-size", "4", "--max-seq-length", "8",
                                 "--set", "adalora.t_init=1", "--set", "adalora.t_final=2", "--output-dir", str(out),
                                 *ON_CPU])
    assert result.exit_code == 0, result.stderr + result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"f1", "precision", "recall", "accuracy"}
    too_long = sum(len(tokenizer(" " + " ".join(r["tokens"]))["input_ids"]) > 8 for r in rows)
    assert 0 < metrics["truncated"]["validation"]["inputs"] == too_long
    result = runner.invoke(app, ["predict", str(out), "--input", str(train)])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(r["tags"]) for r in records] == [len(r["tokens"]) for r in rows]


# -- metrics and entities ------------------------------------------------------------------------------------

def test_strict_iob2_scores_match_a_hand_computation():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["I-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "B-ORG"]]
    # gold entities: PER[0:2], LOC[3:4], ORG[0:1]. Strict IOB2 reads the prediction's I-PER I-PER as no entity, so
    # the predicted ones are LOC[3:4], ORG[0:1], ORG[1:2]: 2 right of 3 predicted, 2 found of 3 gold.
    # Words right: 3 of 4, then 1 of 2.
    assert tagging_metrics(gold, predicted) == pytest.approx(
        {"f1": 2 / 3, "precision": 2 / 3, "recall": 2 / 3, "accuracy": 4 / 6})
    # the lenient (conlleval) reading would have counted the PER: strict differs
    from seqeval.metrics import f1_score
    assert f1_score(gold, predicted) == pytest.approx(0.857142857)
    assert tagging_metrics([["B-PER", "O"]], [["O", "O"]])["f1"] == 0.0  # no predicted entity: 0, no warning


def test_entities_carry_character_offsets_in_the_space_joined_tokens():
    tokens = ["Peter", "Blackburn", "visited", "東京", "and", "Нью-Йорк"]
    text = " ".join(tokens)
    spans = entity_spans(tokens, ["B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC"])  # the last word is an entity
    assert spans == [{"text": "Peter Blackburn", "type": "PER", "start": 0, "end": 15},
                     {"text": "東京", "type": "LOC", "start": 24, "end": 26},
                     {"text": "Нью-Йорк", "type": "LOC", "start": 31, "end": 39}]
    assert all(text[s["start"]:s["end"]] == s["text"] for s in spans)
    # predicted tags as the strict F1 reads them: an I- after O begins no entity, an I- of another type ends one
    assert entity_spans(["a", "b", "c", "d"], ["O", "I-PER", "B-ORG", "I-LOC"]) == [
        {"text": "c", "type": "ORG", "start": 4, "end": 5}]


# -- the benchmarks' files -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ner_dir() -> Path:
    if not (NER_DIR / "conll2003" / "train.txt").is_file():
        pytest.skip(f"NER data not found at {NER_DIR}")
    return NER_DIR


def test_benchmark_files_read_with_the_published_counts(ner_dir):
    from seqeval.scheme import IOB2, Entities

    counts = {("conll2003", "validation"): (3250, 51362, 5942), ("conll2003", "test"): (3453, 46435, 5648),
              ("wnut_17", "validation"): (1009, 15733, 836), ("wnut_17", "test"): (1287, 23394, 1079)}
    for (name, split), (sentences, tokens, entities) in counts.items():
        task = get_task(name)
        for data_dir in (ner_dir, ner_dir / task.benchmark.folder):  # the ner folder or the benchmark's own
            raw = task.load(split, data_dir, {})
            assert (len(raw), sum(map(len, raw["tokens"])),
                    sum(map(len, Entities(raw["tags"], IOB2).entities))) == (sentences, tokens, entities)
    assert get_task("conll2003").settings_from_data(get_task("conll2003").load("validation", ner_dir, {}), "dev") \
        == {"tokens_column": "tokens", "tags_column": "tags", "label_names": CONLL_NAMES}


# -- a short real run ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conll_run(ner_dir, minilm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ner") / "run"
    result = runner.invoke(app, [
        "train", "--task", "conll2003", "--data-dir", str(ner_dir), "--model", minilm_path, "--method", "lora",
        "--budget", "0.3M", "--lr", "3e-3", "--max-steps", "100", "--batch-size", "8", "--max-seq-length", "64",
        "--max-train-samples", "800", "--max-eval-samples", "300", "--output-dir", str(out)])
    assert result.exit_code == 0, result.stderr + result.stdout
    return out


@pytest.mark.slow
def test_a_short_lora_run_beats_the_all_o_baseline_and_predicts_entities(conll_run, tmp_path):
    metrics = json.loads((conll_run / "metrics.json").read_text())
    scores = metrics["eval"]
    assert scores["f1"] > 0.3 and scores["f1_test"] > 0.3, scores  # all-O scores 0 (measured: 0.60 and 0.72)
    assert set(scores) == {f"{m}{s}" for m in ("f1", "precision", "recall", "accuracy") for s in ("", "_test")}
    assert metrics["truncated"]["validation"]["inputs"] > 0  # some dev sentences exceed 64 tokens
    config = rundir.RunDir(conll_run).config
    settings = config.task_config()  # recorded in config.yaml under the task's name
    assert (settings.tokens_column, settings.tags_column, settings.label_names) == ("tokens", "tags", CONLL_NAMES)
    assert config.to_dict()["conll2003"]["label_names"] == CONLL_NAMES

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "text": "Peter Blackburn flew from London to Moscow ."}\n'
                    '{"id": "b", "text": "EU rejects German call to boycott British lamb ."}\n')
    result = runner.invoke(app, ["predict", str(conll_run), "--input", str(rows)])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["a", "b"] and [len(r["tags"]) for r in records] == [8, 9]
    texts = ["Peter Blackburn flew from London to Moscow .", "EU rejects German call to boycott British lamb ."]
    for record, text in zip(records, texts):
        assert record["entities"] == entity_spans(text.split(), record["tags"])
        assert all(text[e["start"]:e["end"]] == e["text"] for e in record["entities"])
    found = {(e["text"], e["type"]) for r in records for e in r["entities"]}
    assert {("London", "LOC"), ("Moscow", "LOC")} <= found, records


SENTENCES = ["Peter Blackburn flew from London to Moscow .", "EU rejects German call to boycott British lamb ."]


@pytest.fixture(scope="module")
def our_logits(conll_run):
    """The run's logits on SENTENCES, as `adalora eval` computes them (the run reloaded)."""
    _, _, model, tokenizer, *_ = rundir.load_run(conll_run)
    with torch.no_grad():
        return model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits


@pytest.mark.slow
def test_merged_export_runs_in_a_transformers_pipeline_with_the_tag_names(conll_run, our_logits, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    folder = tmp_path / "merged"
    result = runner.invoke(app, ["export-adapter", str(conll_run), "--format", "merged", "--out", str(folder)])
    assert result.exit_code == 0, result.stderr + result.stdout
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    assert [model.config.id2label[i] for i in range(len(CONLL_NAMES))] == CONLL_NAMES
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        theirs = model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(theirs, our_logits, atol=1e-4, rtol=0)
    tagger = pipeline("token-classification", model=str(folder), aggregation_strategy="simple", device="cpu")
    entities = tagger(SENTENCES[0])
    assert {(e["word"], e["entity_group"]) for e in entities} >= {("london", "LOC"), ("moscow", "LOC")}, entities
    assert all(SENTENCES[0][e["start"]:e["end"]].lower() == e["word"] for e in entities)


@pytest.mark.slow
def test_peft_export_gives_our_logits_on_the_base_model_with_its_labels(conll_run, our_logits, minilm_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    folder = tmp_path / "peft"
    result = runner.invoke(app, ["export-adapter", str(conll_run), "--format", "peft", "--out", str(folder)])
    assert result.exit_code == 0, result.stderr + result.stdout
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["classifier"]
    labels = json.loads((folder / "labels.json").read_text())
    assert labels["num_labels"] == 9 and labels["label2id"] == {n: i for i, n in enumerate(CONLL_NAMES)}
    # JSON keys are strings; transformers 5 keeps the keys of id2label given to from_pretrained as they are
    labels["id2label"] = {int(i): name for i, name in labels["id2label"].items()}
    base = AutoModelForTokenClassification.from_pretrained(minilm_path, **labels)  # the hub id's local copy
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(conll_run / rundir.TOKENIZER)
    with torch.no_grad():
        theirs = model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(theirs, our_logits, atol=1e-4, rtol=0)
    assert model.config.id2label[4] == "B-PER"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
