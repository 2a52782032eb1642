"""SQuAD: the official EM/F1 definitions on hand-made cases, the official JSON format and its errors, windowed
features and span post-processing on a real tokenizer, the article split script, and train -> eval through
the CLI for every method on both versions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from adalora_cli import files, rundir
from adalora_cli.cli import app
from adalora_cli.errors import UserError
from adalora_cli.methods import available_methods, get_method
from adalora_cli.tasks import get_task
from adalora_cli.tasks.squad import answer_tokens, best_answers, read_squad_json
from adalora_cli.tasks.squad_eval import best_null_thresholds as squad_eval_best
from adalora_cli.tasks.squad_eval import f1_v1, f1_v2, normalize_answer, squad_v1_scores, squad_v2_scores
from conftest import SQUAD_DIR, train_tiny

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# -- metrics: the official v1.1 / v2.0 definitions, on answers worked out by hand -----------------------------

@pytest.mark.parametrize("text, normalised", [
    ("The Denver Broncos", "denver broncos"),
    ("  an apple and THE pear ", "apple and pear"),
    ("theatre, then a-team", "theatre then ateam"),  # articles only as whole words; punctuation is dropped, not spaced
    ("Levi's Stadium.", "levis stadium"),
    ("the", ""),
])
def test_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_v1_scores_by_hand():
    predictions = ["the Denver Broncos", "Broncos of Denver", "Santa Clara, California", "1990"]
    golds = [["Denver Broncos", "Broncos"], ["Denver Broncos"], ["Levi's Stadium", "Santa Clara"], ["February 7, 2016"]]
    # EM: 1, 0, 0, 0. F1: 1; 2 shared of 3 predicted / 2 gold -> P 2/3, R 1 -> 0.8; best gold "Santa Clara" -> 0.8; 0.
    scores = squad_v1_scores(predictions, golds)
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0.8 + 0) / 4)
    assert scores["total"] == 4


def test_f1_counts_repeated_tokens_once_each():
    # "the" vanishes; pred [a1: "new", "york", "new"], gold ["new", "york"]: shared 2 -> P 2/3, R 1.
    assert f1_v1("new York new", "the New York") == pytest.approx(0.8)
    assert f1_v1("red", "blue") == 0.0


def test_v1_and_v2_differ_on_answers_that_normalise_to_nothing():
    # v1.1: exact match of two empty normal forms is 1, but F1 is 0 (no shared token).
    assert squad_v1_scores(["the"], [["a"]]) == {"exact_match": 100.0, "f1": 0.0, "total": 1}
    # v2.0: an empty side scores F1 1 only against another empty side; gold answers that normalise to nothing are
    # dropped, leaving the single gold "".
    assert f1_v2("", "") == 1.0 and f1_v2("Denver", "") == 0.0 and f1_v2("", "Denver") == 0.0
    assert squad_v2_scores(["the"], [["a"]])["f1"] == 100.0


def test_v2_scores_with_unanswerable_questions_by_hand():
    predictions = ["Denver Broncos", "", "Denver", "", "Broncos of Denver"]
    golds = [["Denver Broncos"], [], [], ["Santa Clara"], ["Denver Broncos"]]
    scores = squad_v2_scores(predictions, golds)
    # HasAns: (1, 1), (0, 0), (0, 0.8). NoAns: "" right (1, 1), "Denver" wrong (0, 0).
    assert scores["HasAns_exact"] == pytest.approx(100 / 3) and scores["HasAns_f1"] == pytest.approx(60.0)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == pytest.approx(50.0)
    assert scores["exact_match"] == pytest.approx(40.0) and scores["f1"] == pytest.approx(100 * 2.8 / 5)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (5, 3, 2)


def test_best_null_thresholds_by_hand():
    spans = ["Denver Broncos", "Paris", "Broncos of Denver", "Denver", ""]
    golds = [["Denver Broncos"], [], ["Denver Broncos"], [], ["Santa Clara"]]
    gaps = [-2.0, 3.0, 1.0, -1.0, float("inf")]  # null score - best span score; inf: no valid span
    # Answering nothing: the 2 unanswerable questions right. Then by increasing gap: q0 (+1 -> 3, threshold -2),
    # q3 answers "Denver" to an unanswerable question (-1 -> 2), q2 (+0 exact, +0.8 F1 -> 2 / 2.8), q1 (-1), q4 (0).
    best = squad_eval_best(spans, gaps, golds)
    assert best == {"best_exact": 60.0, "best_exact_thresh": -2.0, "best_f1": 60.0, "best_f1_thresh": -2.0}
    gaps[3] = 2.0  # now q2 comes before q3: 3 + 0.8 = 3.8 at threshold 1 beats 3 for F1, not for exact match
    assert squad_eval_best(spans, gaps, golds) == {"best_exact": 60.0, "best_exact_thresh": -2.0,
                                                   "best_f1": pytest.approx(76.0), "best_f1_thresh": 1.0}
    # All unanswerable and all spans wrong: answering nothing is best, reported at threshold 0.0 as the script does.
    assert squad_eval_best(["x"], [-5.0], [[]]) == {"best_exact": 100.0, "best_exact_thresh": 0.0,
                                                    "best_f1": 100.0, "best_f1_thresh": 0.0}


def test_v1_scoring_needs_a_gold_answer():
    with pytest.raises(ValueError, match="at least one gold answer"):
        squad_v1_scores([""], [[]])


# -- the official JSON format --------------------------------------------------------------------------------

def squad_doc(contexts_and_qas, version="1.1"):
    """An official-format document: one article per (context, [(question, id, answers, impossible)])."""
    data = []
    for a, (context, qas) in enumerate(contexts_and_qas):
        data.append({"title": f"Article_{a}", "paragraphs": [{"context": context, "qas": [
            {"question": q, "id": qid, "answers": [{"text": t, "answer_start": context.index(t)} for t in answers],
             **({"is_impossible": impossible} if version != "1.1" else {})}
            for q, qid, answers, impossible in qas]}]})
    return {"version": version, "data": data}


def write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_reads_the_official_format(tmp_path):
    doc = squad_doc([("Paris is the capital of France.", [("What is the capital?", "q1", ["Paris"], False),
                                                          ("Which country?", "q2", ["France", "France."], False)])])
    columns = read_squad_json(write(tmp_path / "a.json", doc), unanswerable=False)
    assert columns["id"] == ["q1", "q2"] and columns["title"] == ["Article_0"] * 2
    assert columns["answers"][1] == {"text": ["France", "France."], "answer_start": [24, 24]}


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("", "is not valid JSON"),
    ({"version": "1.1"}, "lacks the key 'data'"),
    ({"data": []}, "holds no questions"),
    ({"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}, "lacks the key 'context'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x", "answers": []}]}]}]}, "lacks the key 'question'"),
    ({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "x", "question": "q",
                                                           "answers": [{"text": "b", "answer_start": "1"}]}]}]}]},
     "'answer_start' should be int"),
    ({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "x", "question": "q",
                                                           "answers": [{"text": "bc", "answer_start": 2}]}]}]}]},
     "outside the context"),
    ({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "x", "question": "q", "answers": []}]}]}]},
     "use --task squad_v2"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(UserError, match=message) as info:
        read_squad_json(path, unanswerable=False)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_v2_reads_unanswerable_questions(tmp_path):
    doc = squad_doc([("Paris is the capital of France.", [("What is the capital?", "q1", ["Paris"], False),
                                                          ("What is the capital of Mars?", "q2", [], True)])], "v2.0")
    task = get_task("squad_v2")
    raw = task.load("validation", None, {"validation": write(tmp_path / "dev.json", doc)})
    assert [a["text"] for a in raw["answers"]] == [["Paris"], []]
    with pytest.raises(UserError, match="use --task squad_v2"):
        get_task("squad").load("validation", None, {"validation": tmp_path / "dev.json"})


def test_data_dir_uses_the_official_file_names(tmp_path):
    doc = squad_doc([("Paris is the capital of France.", [("What is the capital?", "q1", ["Paris"], False)])])
    write(tmp_path / "dev-v1.1.json", doc)
    task = get_task("squad")
    assert task.local_path("validation", tmp_path, {}) == tmp_path / "dev-v1.1.json"
    assert get_task("squad_v2").local_path("train", tmp_path, {}) == tmp_path / "train-v2.0.json"
    assert len(task.load("validation", tmp_path, {})) == 1
    with pytest.raises(UserError, match="train file .*train-v1.1.json does not exist"):
        task.check_sources(tmp_path, {})


# -- windows and post-processing on the real MiniLM tokenizer -------------------------------------------------

ANSWER = "Zanzibar Blue"
LONG_CONTEXT = (" ".join(f"Filler sentence number {i} talks about nothing in particular." for i in range(5))
                + f" The secret code of the vault is {ANSWER}, said the guard."
                + " ".join(f" More filler {i} follows here." for i in range(6)))
QUESTION = "What is the secret code of the vault?"


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def long_example():
    import datasets

    start = LONG_CONTEXT.index(ANSWER)
    return datasets.Dataset.from_dict({
        "id": ["q0", "q1"], "title": ["t", "t"], "context": [LONG_CONTEXT, "Short context about Paris."],
        "question": [QUESTION, "Which city?"],
        "answers": [{"text": [ANSWER], "answer_start": [start]}, {"text": ["Paris"], "answer_start": [20]}],
    })


def windowed(task, tokenizer, raw, training):
    return task.with_settings(doc_stride=16).preprocess(raw, tokenizer, 64, training=training)


def test_training_windows_point_at_the_answer_or_at_cls(tokenizer, long_example):
    task = get_task("squad")
    features = windowed(task, tokenizer, long_example, training=True)
    eval_features = windowed(task, tokenizer, long_example, training=False)
    assert set(features.column_names) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    windows = [i for i, e in enumerate(eval_features["example_index"]) if e == 0]
    assert len(windows) >= 3 and all(len(ids) <= 64 for ids in features["input_ids"])
    hits = [i for i in windows if features[i]["start_positions"] != 0]
    assert hits and hits[0] == windows[1], "the constructed answer lies in the second window"
    for i in windows:
        start, end = features[i]["start_positions"], features[i]["end_positions"]
        if i in hits:
            decoded = tokenizer.decode(features[i]["input_ids"][start:end + 1])
            assert decoded == ANSWER.lower()
        else:
            assert start == end == 0  # this window's context does not hold the whole answer
    # The short example fits one window, whose answer tokens map back to "Paris".
    (short,) = [i for i, e in enumerate(eval_features["example_index"]) if e == 1]
    offsets = eval_features[short]["offset_mapping"]
    start, end = features[short]["start_positions"], features[short]["end_positions"]
    assert "Short context about Paris."[offsets[start][0]:offsets[end][1]] == "Paris"


def test_eval_features_mask_the_question(tokenizer, long_example):
    features = windowed(get_task("squad"), tokenizer, long_example, training=False)
    first = features[0]
    assert first["offset_mapping"][0] is None  # [CLS]
    question_tokens = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    assert all(o is None for o in first["offset_mapping"][:question_tokens + 2])
    assert all(o is not None for o in first["offset_mapping"][question_tokens + 2:-1])


def logits_for(features, peaks):
    """Logits of -1 everywhere, -inf past each window's end, `peaks[f] = [(start, end, value)]` raised."""
    width = max(len(ids) for ids in features["input_ids"])
    start = np.full((len(features), width), -1.0)
    end = np.full((len(features), width), -1.0)
    for f, ids in enumerate(features["input_ids"]):
        start[f, len(ids):] = end[f, len(ids):] = -np.inf
    for f, spans in peaks.items():
        for s, e, value in spans:
            start[f, s] = max(start[f, s], value)
            end[f, e] = max(end[f, e], value)
    return start, end


def test_best_span_is_taken_over_windows_and_mapped_to_the_context(tokenizer, long_example):
    task = get_task("squad")
    train = windowed(task, tokenizer, long_example, training=True)
    features = windowed(task, tokenizer, long_example, training=False)
    windows = [i for i, e in enumerate(features["example_index"]) if e == 0]
    second = windows[1]
    s, e = train[second]["start_positions"], train[second]["end_positions"]
    first_context = next(t for t, o in enumerate(features[windows[0]]["offset_mapping"]) if o is not None)
    short = len(features) - 1
    peaks = {
        second: [(s, e, 5.0),  # the answer: score 10
                 (1, 2, 9.0),  # higher, but in the question: invalid
                 (e + 1, s - 1, 8.0)],  # higher, but the end comes before the start: invalid
        windows[0]: [(first_context, first_context + 31, 7.0)],  # higher, but 32 tokens long: invalid
        windows[2]: [(len(train[windows[2]]["input_ids"]) - 3, len(train[windows[2]]["input_ids"]) - 2, 4.0)],  # valid, 8 < 10
        short: [(len(train[short]["input_ids"]) - 3, len(train[short]["input_ids"]) - 3, 2.0)],
    }
    start, end = logits_for(features, peaks)
    answers = task.answers((start, end), long_example, features)
    assert answers[0] == ANSWER  # original casing, from the context text
    assert answers[1] == "Paris"  # the token before [SEP] and the final "."
    metrics = task.compute_metrics((start, end), long_example, features)
    assert metrics == {"exact_match": 100.0, "f1": 100.0, "total": 2}


def test_a_span_limit_keeps_answers_short(tokenizer, long_example):
    task = get_task("squad")
    features = windowed(task, tokenizer, long_example, training=False)
    train = windowed(task, tokenizer, long_example, training=True)
    second = [i for i, e in enumerate(features["example_index"]) if e == 0][1]
    s, e = train[second]["start_positions"], train[second]["end_positions"]
    start, end = logits_for(features, {second: [(s, e, 5.0), (s, s, 4.0)]})
    assert task.answers((start, end), long_example, features)[0] == ANSWER
    short_task = task.with_settings(max_answer_length=e - s)  # the answer is e - s + 1 tokens long
    first_token = features[second]["offset_mapping"][s]
    assert short_task.answers((start, end), long_example, features)[0] == LONG_CONTEXT[first_token[0]:first_token[1]]
    assert task.settings.max_answer_length == 30, "with_settings returns a copy"


def test_null_answer_against_threshold(tokenizer, long_example):
    task = get_task("squad_v2")
    features = windowed(task, tokenizer, long_example, training=False)
    train = windowed(task, tokenizer, long_example, training=True)
    windows = [i for i, e in enumerate(features["example_index"]) if e == 0]
    s, e = train[windows[1]]["start_positions"], train[windows[1]]["end_positions"]
    # Span score 6; null scores (CLS start + end) per window: 7 in the second, 10 elsewhere: the minimum, 7, counts.
    peaks = {f: [(0, 0, 5.0)] for f in windows}
    peaks[windows[1]] = [(0, 0, 3.5), (s, e, 3.0)]
    start, end = logits_for(features, peaks)
    assert task.answers((start, end), long_example, features)[0] == ""  # 7 - 6 > 0
    assert task.with_settings(null_threshold=1.5).answers((start, end), long_example, features)[0] == ANSWER
    assert get_task("squad").answers((start, end), long_example, features)[0] == ANSWER  # v1.1 has no null answer
    texts, gaps, _ = task.spans((start, end), long_example, features)
    assert texts[0] == ANSWER and gaps[0] == pytest.approx(1.0)


def test_answer_tokens_outside_the_window():
    sequence_ids = [None, 0, None, 1, 1, 1, None]
    offsets = [(0, 0), (0, 3), (0, 0), (10, 14), (15, 19), (20, 24), (0, 0)]
    assert answer_tokens(sequence_ids, offsets, 15, 24) == (4, 5)
    assert answer_tokens(sequence_ids, offsets, 16, 19) == (4, 4)  # inside one token
    assert answer_tokens(sequence_ids, offsets, 5, 12) is None  # starts before the window's context
    assert answer_tokens(sequence_ids, offsets, 20, 30) is None  # ends after it


def test_best_answers_without_any_valid_span():
    offsets = [[None, None, [0, 3]]]  # [CLS], a question token, one context token
    start = np.array([[5.0, 4.0, -3.0, -np.inf]])  # a padded row: one position past the window
    end = np.array([[5.0, 4.0, -3.0, -np.inf]])
    assert best_answers(start, end, [0], offsets, ["abc"], n_best=2) == [""]
    assert best_answers(start, end, [0], offsets, ["abc"], n_best=3) == ["abc"]


def test_doc_stride_too_large_is_a_user_error(tokenizer, long_example):
    task = get_task("squad").with_settings(doc_stride=60)
    with pytest.raises(UserError, match="raise --max-seq-length or lower --doc-stride"):
        task.preprocess(long_example, tokenizer, 64, training=True)


# -- the article split ----------------------------------------------------------------------------------------

def test_split_script_splits_by_article(tmp_path):
    doc = squad_doc([(f"Context {i} mentions Paris.", [(f"Q{i}?", f"q{i}", ["Paris"], False)]) for i in range(5)])
    source = write(tmp_path / "all.json", doc)
    args = [sys.executable, str(ROOT / "scripts" / "split_squad.py"), str(source), "--train-articles", "3",
            "--out-train", str(tmp_path / "train.json"), "--out-eval", str(tmp_path / "eval.json")]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    train, held_out = (json.loads((tmp_path / n).read_text()) for n in ("train.json", "eval.json"))
    assert train == {"version": "1.1", "data": doc["data"][:3]}
    assert held_out == {"version": "1.1", "data": doc["data"][3:]}
    bad = subprocess.run(args[:3] + ["--train-articles", "5"] + args[5:], capture_output=True, text=True)
    assert bad.returncode == 2 and "between 1 and 4" in bad.stderr


# -- train -> eval through the CLI ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def squad_splits(tmp_path_factory):
    """Small real splits: v1.1 dev articles 0-1 / 2, and the v2.0 subset's articles 0 / 1 (first questions)."""
    if not (SQUAD_DIR / "dev-v1.1.json").is_file() or not (SQUAD_DIR / "dev-v2.0.cs224n-subset.json").is_file():
        pytest.skip(f"SQuAD data not found at {SQUAD_DIR}")
    folder = tmp_path_factory.mktemp("squad")
    out = {}
    for version, source in (("v1", "dev-v1.1.json"), ("v2", "dev-v2.0.cs224n-subset.json")):
        data = json.loads((SQUAD_DIR / source).read_text(encoding="utf-8"))
        out[version] = (write(folder / f"{version}-train.json", {"version": data["version"], "data": data["data"][:2]}),
                        write(folder / f"{version}-eval.json", {"version": data["version"], "data": data["data"][2:3]}))
    return out


def train_qa(model_dir, files, out, task, method, *extra):
    train_tiny(method, "--task", task, "--model", model_dir, "--train-file", files[0], "--validation-file", files[1],
               "--output-dir", out, "--max-steps", "4", "--batch-size", "8", "--max-train-samples", "64",
               "--max-eval-samples", "40", "--max-seq-length", "96", "--doc-stride", "32", "--set", "logging_steps=2",
               "--set", "adalora.t_init=1", "--set", "adalora.t_final=1", *extra)
    return json.loads((out / rundir.METRICS).read_text())


@pytest.mark.parametrize("task, method", [("squad", m) for m in available_methods()] + [("squad_v2", "adalora")])
def test_train_then_eval_reproduces_qa_metrics(tiny_bert_dir, squad_splits, tmp_path, task, method):
    out = tmp_path / method
    version = "v2" if task == "squad_v2" else "v1"
    metrics = train_qa(tiny_bert_dir, squad_splits[version], out, task, method, "--set", "null_threshold=0.5")
    keys = {"exact_match", "f1", "total"}
    if task == "squad_v2":
        keys |= {f"{group}_{name}" for group in ("HasAns", "NoAns") for name in ("exact", "f1", "total")}
        keys |= {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"}
    assert set(metrics["eval"]) == keys and metrics["eval"]["total"] == 40
    assert 0 <= metrics["eval"]["exact_match"] <= metrics["eval"]["f1"] <= 100
    assert metrics["steps"] == 4 and metrics["task"] == task
    config = (out / rundir.CONFIG).read_text()
    assert "doc_stride: 32" in config and "null_threshold: 0.5" in config
    if get_method(method).adapter:
        assert metrics["adapter_params"] <= 4000
        assert "qa_outputs.weight" in files.load_tensors(out / rundir.HEAD)

    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], abs=1e-6)


def first_questions(path, out, count):
    """A SQuAD file holding the first `count` questions of `path`, in order (what --max-eval-samples keeps)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    articles, left = [], count
    for article in data["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if left > 0:
                paragraphs.append({**paragraph, "qas": paragraph["qas"][:left]})
                left -= len(paragraphs[-1]["qas"])
        if paragraphs:
            articles.append({**article, "paragraphs": paragraphs})
    return write(out, {"version": data["version"], "data": articles})


def test_eval_input_on_a_squad_file(tiny_bert_dir, squad_splits, tmp_path):
    """`adalora eval RUN --input FILE.json` scores a SQuAD file as `adalora eval` scores the run's data."""
    run = tmp_path / "run"
    metrics = train_qa(tiny_bert_dir, squad_splits["v1"], run, "squad", "lora")
    test = first_questions(squad_splits["v1"][1], tmp_path / "kept-aside.json", 40)
    result = runner.invoke(app, ["eval", str(run), "--input", str(test)])
    assert result.exit_code == 0, result.stderr
    written = json.loads((run / "eval-kept-aside.json").read_text())
    assert written["eval"] == json.loads(result.stdout) == pytest.approx(metrics["eval"], abs=1e-6)
    assert written["rows"] == 40 == written["eval"]["total"]


def test_qa_exports_load_as_question_answering_models(tiny_bert_dir, squad_splits, tmp_path):
    """PEFT export -> peft on AutoModelForQuestionAnswering, merged export -> plain Transformers: our logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering

    run = tmp_path / "run"
    train_qa(tiny_bert_dir, squad_splits["v1"], run, "squad", "adalora")
    _, _, ours, tokenizer, *_ = rundir.load_run(run)
    batch = tokenizer(["Who won?", "Where was it played?"],
                      ["The Denver Broncos won the game.", "It was played at Levi's Stadium in California."],
                      padding=True, return_tensors="pt")
    for fmt in ("peft", "merged"):
        result = runner.invoke(app, ["export-adapter", str(run), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert result.exit_code == 0, result.stderr + result.stdout
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "QUESTION_ANS"
    base = AutoModelForQuestionAnswering.from_pretrained(config["base_model_name_or_path"])
    # PeftModelForQuestionAnswering.forward accepts token_type_ids but does not pass them on (peft 0.21), which
    # changes a BERT's output; its base_model (the LoRA-wrapped Transformers model) passes everything.
    theirs = {"peft": PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval().base_model,
              "merged": AutoModelForQuestionAnswering.from_pretrained(tmp_path / "merged").eval()}
    with torch.no_grad():
        expected = ours.eval()(**batch)
        for fmt, model in theirs.items():
            got = model(**batch)
            for name in ("start_logits", "end_logits"):
                torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-4, rtol=0,
                                           msg=f"{fmt} {name}")


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_predict_answers_squad_format_questions(tiny_bert_dir, squad_splits, tmp_path, task):
    """`adalora predict` on a SQuAD-format file: one {"id", "answer", "score"} per question, in order, each answer
    taken from its context (or "" for no answer in v2.0), as `adalora eval` scores them."""
    version = "v2" if task == "squad_v2" else "v1"
    run = tmp_path / "run"
    train_qa(tiny_bert_dir, squad_splits[version], run, task, "lora")
    result = runner.invoke(app, ["predict", str(run), "--input", str(squad_splits[version][1])])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    data = json.loads(squad_splits[version][1].read_text())["data"]
    questions = [(qa["id"], p["context"]) for a in data for p in a["paragraphs"] for qa in p["qas"]]
    assert [r["id"] for r in records] == [qid for qid, _ in questions]
    assert all(r["answer"] in context for r, (_, context) in zip(records, questions))
    assert all(isinstance(r["score"], float) for r in records if r["answer"])


def test_cli_reports_bad_squad_files_in_one_line(tiny_bert_dir, tmp_path):
    bad = write(tmp_path / "bad.json", "{oops")
    out = tmp_path / "out"
    args = ["train", "--task", "squad", "--model", tiny_bert_dir, "--train-file", bad, "--validation-file", bad,
            "--output-dir", out, "--budget", "4k"]
    # A subprocess: the CLI's log handler writes to the real stderr, which CliRunner swaps per invocation.
    proc = subprocess.run([sys.executable, "-m", "adalora_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert lines[-1] == f"adalora: error: {bad} is not valid JSON (Expecting property name enclosed in double quotes " \
                        "at line 1); use the official SQuAD file"
    assert not out.exists()


def test_squad_paper_configs():
    from adalora_cli.config import make_config

    for name, epochs, t_final in (("squad_v1", 10, 25000), ("squad_v2", 12, 50000)):
        cfg = make_config(ROOT / "configs" / "squad" / f"{name}_adalora_deberta-v3-base.yaml")
        m = cfg.method_config()
        assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.max_seq_length) == (1e-3, 16, epochs, 384)
        assert cfg.task_config().doc_stride == 128
        assert (m.t_init, m.t_final, m.delta_t, m.orth_reg, m.alpha) == (5000, t_final, 100, 0.1, 16)
