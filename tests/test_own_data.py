"""Your own data: generic classification and regression tasks on files with your column names and labels, the
held-out split when no validation data is given, `adalora predict`, and labels in every export. Tiny runs on
files made from the real GLUE data (tests/own_data.py); the measured runs are in the README's docs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from adalora_cli import rundir
from adalora_cli.cli import app
from conftest import train_tiny
from own_data import write_reviews, write_sts

runner = CliRunner()
TINY = ["--max-steps", "6", "--batch-size", "8", "--max-seq-length", "32", "--set", "adalora.t_init=1",
        "--set", "adalora.t_final=2"]


@pytest.fixture(scope="module")
def own(glue_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("own-data")
    return {
        "reviews": write_reviews(glue_dir, folder, "train", 200), "reviews_dev": write_reviews(glue_dir, folder, "dev", 60),
        "similarity": write_sts(glue_dir, folder, "train", "similarity", 200),
        "similarity_dev": write_sts(glue_dir, folder, "dev", "similarity", 60),
        "relatedness": write_sts(glue_dir, folder, "train", "relatedness", 200),
        "relatedness_dev": write_sts(glue_dir, folder, "dev", "relatedness", 60),
    }


@pytest.fixture(scope="module")
def reviews_run(own, tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reviews") / "run"
    train_tiny("adalora", "--task", "text-classification", "--model", tiny_bert_dir, "--train-file", own["reviews"],
               "--validation-file", own["reviews_dev"], "--text-column", "review", "--label-column", "sentiment",
               "--output-dir", out, *TINY)
    return out


def test_string_labels_and_own_columns(reviews_run):
    config = yaml.safe_load((reviews_run / rundir.CONFIG).read_text())["text-classification"]
    assert (config["text_column"], config["text_pair_column"], config["label_column"]) == ("review", None, "sentiment")
    assert config["label_names"] == ["negative", "positive"]
    metrics = json.loads((reviews_run / rundir.METRICS).read_text())
    assert set(metrics["eval"]) == {"accuracy", "macro_f1", "f1"}  # two classes: also the F1 of the second


def predict(run, rows, *extra):
    result = runner.invoke(app, ["predict", str(run), "--input", str(rows), *map(str, extra)])
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_predict_agrees_with_the_run(reviews_run, own, tmp_path):
    """Predictions for the dev rows without their labels: one line per row, in order, with the class names; their
    accuracy against the gold labels is the run's."""
    gold = [json.loads(line) for line in own["reviews_dev"].read_text().splitlines()]
    unlabelled = tmp_path / "new.jsonl"
    unlabelled.write_text("".join(json.dumps({"review": r["review"]}) + "\n" for r in gold))
    records = predict(reviews_run, unlabelled)
    assert [r["id"] for r in records] == list(range(len(gold)))
    assert all(set(r["probabilities"]) == {"negative", "positive"} and r["label"] in r["probabilities"]
               for r in records)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in records)
    accuracy = np.mean([r["label"] == g["sentiment"] for r, g in zip(records, gold)])
    assert accuracy == pytest.approx(json.loads((reviews_run / rundir.METRICS).read_text())["eval"]["accuracy"])
    assert predict(reviews_run, own["reviews_dev"]) == records  # a label column in the input is ignored
    out = tmp_path / "predictions.jsonl"
    assert runner.invoke(app, ["predict", str(reviews_run), "--input", str(unlabelled), "--output", str(out)]).exit_code == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalora: error: "), result.stderr
    return lines[0]


def renamed(path, out, names: dict[str, str]):
    """The JSONL rows of `path` with their columns renamed."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out.write_text("".join(json.dumps({names.get(k, k): v for k, v in r.items()}) + "\n" for r in rows))
    return out


def test_predict_takes_the_column_options_and_names_the_files_columns(reviews_run, own, tmp_path):
    """A file whose columns differ from the run's: the error lists the file's real columns and the option to
    use; with that option (as at training), the predictions are those of the run's own column names."""
    words = renamed(own["reviews_dev"], tmp_path / "words.jsonl", {"review": "words", "sentiment": "stars"})
    error = one_line_error(runner.invoke(app, ["predict", str(reviews_run), "--input", str(words)]))
    assert f"{words} has no column 'review' (columns: words, stars); pick one with --text-column" in error
    assert predict(reviews_run, words, "--text-column", "words") == predict(reviews_run, own["reviews_dev"])
    error = one_line_error(runner.invoke(app, ["predict", str(reviews_run), "--input", str(words), "--source-column",
                                               "words"]))
    assert "--source-column does not apply to text-classification runs" in error


def evaluate_file(run, path, *extra) -> dict:
    result = runner.invoke(app, ["eval", str(run), "--input", str(path), *map(str, extra)])
    assert result.exit_code == 0, result.stderr
    written = json.loads((run / f"eval-{path.stem}.json").read_text())
    assert written["eval"] == json.loads(result.stdout) and written["input"] == str(path)
    return written


def test_eval_input_scores_a_kept_aside_file(reviews_run, own, tmp_path):
    """`adalora eval RUN --input FILE` on the run's own validation file gives the run's metrics, written to
    eval-<stem>.json (eval.json untouched); a file with other column names is read with the column options."""
    expected = json.loads((reviews_run / rundir.METRICS).read_text())["eval"]
    before = (reviews_run / "eval.json").read_bytes() if (reviews_run / "eval.json").exists() else None
    written = evaluate_file(reviews_run, own["reviews_dev"])
    assert written["eval"] == pytest.approx(expected, abs=1e-6) and written["rows"] == 60
    assert written["task"] == "text-classification" and written["method"] == "adalora"
    after = (reviews_run / "eval.json").read_bytes() if (reviews_run / "eval.json").exists() else None
    assert after == before
    words = renamed(own["reviews_dev"], tmp_path / "words.jsonl", {"review": "words", "sentiment": "stars"})
    assert evaluate_file(reviews_run, words, "--text-column", "words", "--label-column", "stars")["eval"] == \
        pytest.approx(expected, abs=1e-6)


def test_eval_input_without_the_runs_columns_is_one_line(reviews_run, own, tmp_path):
    words = renamed(own["reviews_dev"], tmp_path / "other.jsonl", {"review": "words", "sentiment": "stars"})
    error = one_line_error(runner.invoke(app, ["eval", str(reviews_run), "--input", str(words)]))
    assert f"{words} has no column 'review' (columns: words, stars); pick one with --text-column" in error
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("review,id\nsehr gut,1\n", encoding="utf-8")
    error = one_line_error(runner.invoke(app, ["eval", str(reviews_run), "--input", str(unlabelled)]))
    assert "has no column 'sentiment' (columns: review, id); pick one with --label-column" in error
    assert not (reviews_run / "eval-other.json").exists() and not (reviews_run / "eval-unlabelled.json").exists()


MERGED_LABELS = """
import json, sys
from transformers import pipeline
classify = pipeline("text-classification", model=sys.argv[1])
print(json.dumps([r["label"] for r in classify(["a gripping, beautifully acted film", "dull and far too long"])]))
"""


def test_exports_carry_the_class_names(reviews_run, tmp_path):
    for fmt in ("merged", "peft", "native"):
        assert runner.invoke(app, ["export-adapter", str(reviews_run), "--format", fmt, "--out",
                                   str(tmp_path / fmt)]).exit_code == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    labels = json.loads((tmp_path / "peft" / "labels.json").read_text())
    assert labels["id2label"] == {"0": "negative", "1": "positive"} and labels["num_labels"] == 2
    proc = subprocess.run([sys.executable, "-c", MERGED_LABELS, str(tmp_path / "merged")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) <= {"negative", "positive"}
    result = runner.invoke(app, ["eval", str(tmp_path / "native")])
    assert result.exit_code == 0, result.stderr


def test_three_classes_from_pairs_with_detected_columns(own, tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    train_tiny("lora", "--task", "text-classification", "--model", tiny_bert_dir, "--train-file", own["similarity"],
               "--validation-file", own["similarity_dev"], "--text-column", "first", "--text-pair-column", "second",
               "--label-column", "similarity", "--output-dir", out, *TINY)
    config = yaml.safe_load((out / rundir.CONFIG).read_text())["text-classification"]
    assert config["label_names"] == ["high", "low", "mid"]
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert set(metrics["eval"]) == {"accuracy", "macro_f1"}  # three classes: no single positive class


def test_regression_with_own_column_names(own, tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    train_tiny("adalora", "--task", "text-regression", "--model", tiny_bert_dir, "--train-file", own["relatedness"],
               "--validation-file", own["relatedness_dev"], "--text-column", "premise", "--text-pair-column",
               "hypothesis", "--label-column", "relatedness", "--output-dir", out, *TINY)
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert set(metrics["eval"]) == {"pearson", "spearmanr", "mse"}
    records = predict(out, own["relatedness_dev"])
    assert len(records) == 60 and all(isinstance(r["value"], float) for r in records)
    assert runner.invoke(app, ["export-adapter", str(out), "--format", "merged", "--out", str(tmp_path / "m")]).exit_code == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["id2label"] == {"0": "relatedness"}


def test_columns_are_detected_and_saved(glue_dir, tiny_bert_dir, tmp_path):
    rows = [{"text": r["review"], "label": r["sentiment"]} for r in
            map(json.loads, write_reviews(glue_dir, tmp_path, "train", 80).read_text().splitlines())]
    data = tmp_path / "plain.json"
    data.write_text(json.dumps(rows))  # a JSON list of objects
    out = tmp_path / "run"
    train_tiny("lora", "--task", "text-classification", "--model", tiny_bert_dir, "--train-file", data,
               "--output-dir", out, *TINY)
    config = yaml.safe_load((out / rundir.CONFIG).read_text())["text-classification"]
    assert (config["text_column"], config["label_column"]) == ("text", "label")


def test_without_validation_data_a_seeded_share_is_held_out(glue_dir, tiny_bert_dir, tmp_path):
    """SST-2 from its training file alone: 10% of it is held out (never the hub's validation set), the log says
    so, and `adalora eval` finds the same rows again."""
    train = tmp_path / "train.tsv"
    lines = (glue_dir / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[:301]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--task", "sst2", "--method", "lora", "--budget", "4k", "--model",
                                 tiny_bert_dir, "--train-file", str(train), "--output-dir", str(out), *TINY])
    assert result.exit_code == 0, result.stderr
    assert "no validation data given: holding out 10% of the training data for evaluation (30 of 300 rows" \
           in result.stderr
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert runner.invoke(app, ["eval", str(out)]).exit_code == 0
    assert json.loads((out / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], abs=1e-6)


def test_squad_without_validation_data_holds_out_whole_articles(tmp_path):
    from adalora_cli.data import held_out_split, to_dataset

    raw = to_dataset({"title": ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"] * 2, "question": [str(i) for i in range(14)]})
    train, held = held_out_split(raw, 0.25, seed=0, group_columns=("title",))
    assert set(train["title"]).isdisjoint(held["title"]) and len(train) + len(held) == 14
    assert len(set(held["title"])) == 1


@pytest.fixture(scope="module")
def sst2_run(glue_dir, tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sst2") / "run"
    train_tiny("lora", "--task", "sst2", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out,
               "--max-train-samples", "64", "--max-eval-samples", "16", *TINY)
    return out


def test_eval_input_on_a_glue_tsv(sst2_run, glue_dir, tmp_path):
    """A GLUE TSV (the run's 16 dev rows, kept aside as a file) scores as `adalora eval` scores the run's data."""
    lines = (glue_dir / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:17]
    test = tmp_path / "sst2-test.tsv"
    test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert runner.invoke(app, ["eval", str(sst2_run)]).exit_code == 0
    expected = json.loads((sst2_run / "eval.json").read_text())["eval"]
    written = evaluate_file(sst2_run, test)
    assert written["eval"] == pytest.approx(expected, abs=1e-6) and written["rows"] == 16


def test_glue_leaderboard_tsv(sst2_run, glue_dir, tmp_path):
    """`--format glue` writes GLUE's submission file: index and prediction (class ids for SST-2), in input order,
    from a file shaped like GLUE's test.tsv (an index column, no labels)."""
    out = sst2_run
    sentences = [line.split("\t")[0] for line in (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:11]]
    test = tmp_path / "test.tsv"
    test.write_text("index\tsentence\n" + "".join(f"{100 + i}\t{s}\n" for i, s in enumerate(sentences)))
    result = runner.invoke(app, ["predict", str(out), "--input", str(test), "--format", "glue", "--output",
                                 str(tmp_path / "SST-2.tsv")])
    assert result.exit_code == 0, result.stderr
    lines = (tmp_path / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert [line.split("\t")[0] for line in lines[1:]] == [str(100 + i) for i in range(10)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


@pytest.mark.parametrize("arch, task, names", [
    ("bart", "seq2seq", {"source": "document", "target": "question"}),
    ("gpt2", "causal-lm", {"prompt": "context", "completion": "question"}),
])
def test_eval_input_on_generation_data(generators, question_generation, tmp_path, arch, task, names):
    """Source/target and prompt/completion files score as `adalora eval` scores the run's validation file, also
    with other column names given by the column options."""
    kind = "seq2seq" if task == "seq2seq" else "causal"
    run = tmp_path / "run"
    train_tiny("lora", "--task", task, "--model", generators[arch], "--train-file", question_generation[f"{kind}-train"],
               "--validation-file", question_generation[f"{kind}-dev"], "--output-dir", run, "--max-steps", "2",
               "--batch-size", "8", "--max-seq-length", "96", "--set", "max_target_length=24",
               "--set", "max_new_tokens=8")
    expected = json.loads((run / rundir.METRICS).read_text())["eval"]
    assert evaluate_file(run, question_generation[f"{kind}-dev"])["eval"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    other = renamed(question_generation[f"{kind}-dev"], tmp_path / "other.jsonl", names)
    first, second = (f"--{role}-column" for role in names)
    error = one_line_error(runner.invoke(app, ["eval", str(run), "--input", str(other)]))
    assert f"(columns: {', '.join(names.values())}); pick one with {first}" in error
    scored = evaluate_file(run, other, first, list(names.values())[0], second, list(names.values())[1])
    assert scored["eval"] == pytest.approx(expected, rel=1e-5, abs=1e-5) and scored["rows"] == 16
