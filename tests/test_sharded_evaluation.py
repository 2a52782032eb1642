"""Evaluation shared out among processes (torchrun): each process runs the model over its shard of the rows, every
process gets the merged outputs of all of them, and the metrics are those of one process.

- `distributed.shard_bounds`: consecutive, balanced shards of whole batches that cover every row once, also with
  fewer rows (or batches) than processes and with none.
- `inference.merge_outputs`: arrays of different sequence widths padded as one process pads them, generation's
  sums and per-row lists, empty shards.
- Shards of a real model's outputs (a forward task and SQuAD's windows) merge into one process's outputs, bit for bit.
- `adalora eval` under `torchrun --nproc_per_node 2` (gloo) prints and writes the metrics of one process, once, for a
  classification run (trained under torchrun: its final evaluation is sharded too), a generation run with repeated
  inputs, and a SQuAD run whose questions span several windows; `adalora predict` prints the lines of one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adalora_cli import distributed, inference
from conftest import ON_CPU, train_tiny

HOOKED_CLI = Path(__file__).with_name("hooked_cli.py")
ROOT = Path(__file__).resolve().parents[1]


def all_bounds(n: int, size: int, unit: int, monkeypatch) -> list[tuple[int, int]]:
    bounds = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "rank_and_size", lambda rank=rank: (rank, size))
        bounds.append(distributed.shard_bounds(n, unit))
    return bounds


@pytest.mark.parametrize("n, size, unit, expected", [
    (7, 2, 1, [(0, 4), (4, 7)]),  # uneven: the first process takes the extra row
    (10, 3, 1, [(0, 4), (4, 7), (7, 10)]),
    (1, 3, 1, [(0, 1), (1, 1), (1, 1)]),  # fewer rows than processes: empty shards
    (0, 2, 1, [(0, 0), (0, 0)]),
    (10, 2, 4, [(0, 8), (8, 10)]),  # whole batches of 4: 3 batches, the last one short
    (15, 2, 4, [(0, 8), (8, 15)]),
    (5, 3, 4, [(0, 4), (4, 5), (5, 5)]),  # fewer batches than processes
    (9, 1, 4, [(0, 9)]),
])
def test_shard_bounds(n, size, unit, expected, monkeypatch):
    assert all_bounds(n, size, unit, monkeypatch) == expected


def test_shards_cover_every_row_once_and_are_balanced(monkeypatch):
    for n in range(0, 30):
        for size in (1, 2, 3, 5):
            for unit in (1, 2, 4, 7):
                bounds = all_bounds(n, size, unit, monkeypatch)
                assert [i for start, end in bounds for i in range(start, end)] == list(range(n))
                batches = [-(-(end - start) // unit) for start, end in bounds]
                assert max(batches) - min(batches) <= 1 and batches == sorted(batches, reverse=True)


def test_a_single_process_gets_every_row():
    assert distributed.rank_and_size() == (0, 1) and distributed.shard_bounds(5, 2) == (0, 5)
    assert distributed.gather_parts({"texts": ["a"]}) == [{"texts": ["a"]}]


def test_merge_pads_sequence_widths_as_one_process():
    start = [np.arange(6, dtype=np.float32).reshape(2, 3), np.full((1, 5), 7, dtype=np.float32)]
    pooled = [np.ones((2, 4), dtype=np.float32), np.zeros((1, 4), dtype=np.float32)]
    merged = inference.merge_outputs([(start[0], pooled[0]), (), (start[1], pooled[1])])  # () : an empty shard
    expected = np.array([[0, 1, 2, -np.inf, -np.inf], [3, 4, 5, -np.inf, -np.inf], [7, 7, 7, 7, 7]], np.float32)
    assert len(merged) == 2 and np.array_equal(merged[0], expected) and merged[0].dtype == np.float32
    assert np.array_equal(merged[1], np.concatenate(pooled))
    per_token = [np.ones((1, 2, 3), np.float32), np.ones((2, 4, 3), np.float32)]  # (rows, tokens, classes)
    merged = inference.merge_outputs([(per_token[0],), (per_token[1],)])[0]
    assert merged.shape == (3, 4, 3) and np.isneginf(merged[0, 2:]).all() and (merged[0, :2] == 1).all()
    assert inference.merge_outputs([(), ()]) == ()


def test_merge_sums_numbers_and_concatenates_rows():
    parts = [{"loss_sum": 2.5, "tokens": 4, "texts": ["Кто?", "谁?"]}, {"loss_sum": 0.0, "tokens": 0, "texts": []},
             {"loss_sum": 1.25, "tokens": 3, "texts": ["Who?"]}]
    assert inference.merge_outputs(parts) == {"loss_sum": 3.75, "tokens": 7, "texts": ["Кто?", "谁?", "Who?"]}


def simulated_shards(compute, features, batch_size: int, size: int, monkeypatch):
    """What `sharded_outputs` gives on every one of `size` processes, computed here one shard after another."""
    parts = []
    for start, end in all_bounds(len(features), size, batch_size, monkeypatch):
        parts.append(compute(features.select(list(range(start, end)))))
    monkeypatch.setattr(distributed, "rank_and_size", lambda: (0, size))  # as seen from the main process
    monkeypatch.setattr(distributed, "gather_parts", lambda part: parts)
    return inference.sharded_outputs(compute, features, batch_size)


@pytest.mark.parametrize("size", [2, 3, 8])
def test_shards_of_a_models_outputs_merge_into_one_processs(tiny_bert_dir, size, monkeypatch):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3).to("cpu")
    texts = ["short", "a much longer sentence than the others, with more words in it", "Привет, мир", "你好世界",
             "one more", "and the last, fairly long, sentence of this small set"]
    features = Dataset.from_dict(dict(tokenizer(texts)))

    def compute(rows):
        return inference.model_outputs(model, rows, tokenizer, batch_size=2)

    merged = simulated_shards(compute, features, 2, size, monkeypatch)
    alone = compute(features)
    assert len(merged) == len(alone) == 1 and np.array_equal(merged[0], alone[0])


# -- adalora eval under torchrun ----------------------------------------------------------------------------------
def cpu_env(trace: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "ADALORA_TEST_TRACE": str(trace), "CUDA_VISIBLE_DEVICES": ""}  # CPU processes, also beside a GPU


def run_cli(args, trace: Path, processes: int):
    """The command line in `processes` CPU processes (torchrun when more than one); (stdout, per-process traces)."""
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    proc = subprocess.run([*launcher, str(HOOKED_CLI), *map(str, args)], capture_output=True, text=True,
                          env=cpu_env(trace), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, [json.loads((trace / f"rank{r}.json").read_text()) for r in range(processes)]


def check_eval_on_two_processes(run: Path, tmp_path: Path) -> dict:
    """`adalora eval RUN` on 2 processes prints and writes exactly what it does on one; returns the metrics."""
    out, (trace,) = run_cli(["eval", run], tmp_path / "one", 1)
    alone = json.loads(out)
    assert trace["writes"] == [str((run / "eval.json").resolve())]
    written = json.loads((run / "eval.json").read_text())
    (run / "eval.json").unlink()
    out, traces = run_cli(["eval", run], tmp_path / "two", 2)
    assert json.loads(out) == alone  # printed once: one JSON object
    assert traces[0]["writes"] == [str((run / "eval.json").resolve())] and traces[1]["writes"] == []
    assert json.loads((run / "eval.json").read_text()) == written
    return alone


def test_eval_of_a_classification_run_trained_on_two_processes(tiny_bert_dir, glue_dir, tmp_path):
    run = tmp_path / "run"  # 15 rows in batches of 4: shards of 8 and 7 rows
    train = ["train", "--task", "sst2", "--method", "lora", "--model", tiny_bert_dir, "--data-dir", glue_dir,
             "--output-dir", run, "--budget", "4k", "--max-steps", "4", "--batch-size", "4", "--eval-every", "2",
             "--keep-best", "--max-train-samples", "32", "--max-eval-samples", "15", "--max-seq-length", "32",
             "--set", "eval_batch_size=4", *ON_CPU]
    run_cli(train, tmp_path / "train", 2)
    metrics = json.loads((run / "metrics.json").read_text())
    alone = check_eval_on_two_processes(run, tmp_path)
    assert alone == metrics["eval"] and set(alone) == {"accuracy"}  # the final evaluation under torchrun: the same
    during = [e for e in json.loads((run / "train_log.json").read_text()) if "eval_accuracy" in e]
    assert [e["step"] for e in during] == [2, 4]  # every process loaded the kept adapter before the final evaluation
    assert metrics["best"]["value"] == alone["accuracy"] == during[metrics["best"]["step"] // 2 - 1]["eval_accuracy"]

    rows = tmp_path / "rows.tsv"  # predict shares its rows out too: the same lines, printed once, in order
    rows.write_text("".join((glue_dir / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines(True)[:16]))
    predict = ["predict", run, "--input", rows, "--batch-size", "4"]
    (one, _), (two, traces) = run_cli(predict, tmp_path / "p1", 1), run_cli(predict, tmp_path / "p2", 2)
    assert two == one and len(one.splitlines()) == 15 and traces[1]["writes"] == []


def test_eval_of_a_generation_run_with_repeated_inputs(generators, question_generation, tmp_path):
    rows = [json.loads(line) for line in question_generation["causal-dev"].read_text().splitlines()][:12]
    for at, source in ((3, 1), (9, 7), (12, 8)):  # the same prompt with another reference, in both shards
        rows.insert(at, {"prompt": rows[source]["prompt"], "completion": f"another question {at}?"})
    assert len(rows) == 15
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    train_tiny("lora", "--task", "causal-lm", "--model", generators["gpt2"], "--train-file",
               question_generation["causal-train"], "--validation-file", dev, "--output-dir", run,
               "--max-steps", "2", "--batch-size", "8", "--max-seq-length", "96", "--set", "max_target_length=24",
               "--set", "max_new_tokens=6", "--set", "eval_batch_size=4")
    metrics = check_eval_on_two_processes(run, tmp_path)
    assert {"loss", "perplexity"} <= set(metrics) and len(metrics) > 2


def test_eval_of_a_squad_run_with_questions_over_several_windows(tiny_bert_dir, squad_file, tmp_path):
    data = json.loads(squad_file.read_text(encoding="utf-8"))
    train, dev = (tmp_path / f"{name}.json" for name in ("train", "dev"))
    train.write_text(json.dumps({"version": data["version"], "data": data["data"][:1]}))
    dev.write_text(json.dumps({"version": data["version"], "data": data["data"][1:2]}))
    run = tmp_path / "run"  # 15 questions in 117 windows of 64 tokens: the shards (60 + 57) split question 7's windows
    train_tiny("lora", "--task", "squad", "--model", tiny_bert_dir, "--train-file", train, "--validation-file", dev,
               "--output-dir", run, "--max-steps", "2", "--batch-size", "8", "--max-train-samples", "16",
               "--max-eval-samples", "15", "--max-seq-length", "64", "--doc-stride", "24",
               "--set", "eval_batch_size=4")
    metrics = check_eval_on_two_processes(run, tmp_path)
    assert metrics["total"] == 15
