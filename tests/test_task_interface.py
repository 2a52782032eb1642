"""The task interface owns everything task-specific: no module outside `tasks/` asks which kind of task it holds,
task settings live in a section under the task's name in config.yaml (flat keys of old files and of the command
line still load), and a task family is one file: a task registered here, and nowhere else, trains, evaluates and
predicts through the pipeline."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from adalora_cli import rundir
from adalora_cli.cli import app
from adalora_cli.config import from_dict, make_config
from adalora_cli.errors import UserError
from adalora_cli.tasks import Task, TaskSettings, get_task, setting
from conftest import train_tiny

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "adalora_cli"
GENERIC_MODULES = ("pipeline", "evaluation", "inference", "rundata", "commands", "export", "models", "config", "cli",
                   "rundir")
# What code outside tasks/ used to branch on: the task's kind or name, attributes only some tasks have, the tables
# from a kind to a model class or a PEFT task type, the flat list of task settings.
KIND_TESTS = re.compile(r"\bmodel_kind\b|\.generates\b|plain_lm|hasattr\(task|getattr\(task|task\.name ==|"
                        r"PEFT_TASK_TYPES|MODEL_CLASSES|TASK_SETTINGS")


def test_no_module_outside_the_tasks_branches_on_a_tasks_kind():
    found = [f"{name}.py:{number}: {line.strip()}" for name in GENERIC_MODULES
             for number, line in enumerate((PACKAGE / f"{name}.py").read_text().splitlines(), start=1)
             if KIND_TESTS.search(line)]
    assert found == []


# -- task settings in config.yaml -----------------------------------------------------------------------------

def test_a_task_section_round_trips_through_config_yaml(tmp_path):
    cfg = make_config(None, ["task=squad", "squad.doc_stride=64", "squad.null_threshold=0.5"])
    data = cfg.to_dict()
    assert data["squad"] == {"doc_stride": 64, "n_best": 20, "max_answer_length": 30, "null_threshold": 0.5}
    assert "doc_stride" not in data  # settings leave the flat keys
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    again = from_dict(yaml.safe_load(path.read_text()))
    assert again.task_config() == cfg.task_config() and again.to_dict() == data
    assert "sst2" not in make_config(None, ["task=sst2"]).to_dict()  # GLUE has no settings: no section


def test_an_old_flat_config_yaml_still_loads():
    """Before task settings had sections, config.yaml held every task's settings as flat keys (here a SQuAD run's,
    with the other tasks' settings unset or at their defaults)."""
    old = {"task": "squad", "method": "lora", "model": "minilm-l6", "doc_stride": 64, "n_best": 20,
           "max_answer_length": 30, "null_threshold": 0.5, "text_column": None, "text_pair_column": None,
           "label_column": None, "label_names": None, "dataset": None, "dataset_config": None,
           "dataset_train_split": "train", "dataset_eval_split": "validation", "source_column": None,
           "target_column": None, "prompt_column": None, "completion_column": None, "max_target_length": None,
           "num_beams": None, "length_penalty": None, "max_new_tokens": None, "min_new_tokens": None,
           "no_repeat_ngram_size": None, "lora": {"r": 8}}
    cfg = from_dict(old)
    assert (cfg.task_config().doc_stride, cfg.task_config().null_threshold) == (64, 0.5)
    assert cfg.to_dict()["squad"]["doc_stride"] == 64
    generation = from_dict({**old, "task": "xsum", "doc_stride": 128, "null_threshold": 0.0, "max_new_tokens": 8})
    assert generation.task_config().max_new_tokens == 8
    # an old run recorded options that did not apply to its task (sst2 took --doc-stride 64 and ignored it)
    glue = from_dict({**old, "task": "sst2"})
    assert "squad" not in glue.to_dict() and glue.task_args == {}


def test_a_setting_of_another_task_is_refused_on_the_command_line(tmp_path):
    result = runner.invoke(app, ["train", "--task", "sst2", "--doc-stride", "64", "--model", "minilm-l6",
                                 "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("adalora: error: --doc-stride does not apply to sst2 runs; it is a setting of "
                                     "squad, squad_v2 (drop it, or choose one of those tasks)")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="--source-column does not apply to text-classification runs"):
        make_config(None, ["task=text-classification", "source_column=document"])


def test_the_later_layer_wins_between_a_flat_key_and_a_section(tmp_path):
    """An option (flat, as the command line passes it) beats the config file's section; a `--set` section beats the
    config file's flat key."""
    sectioned, flat = tmp_path / "sectioned.yaml", tmp_path / "flat.yaml"
    sectioned.write_text("task: squad\nsquad: {doc_stride: 100, n_best: 5}\n")
    flat.write_text("task: squad\ndoc_stride: 100\n")
    cfg = make_config(sectioned, options={"doc_stride": 64})
    assert (cfg.task_config().doc_stride, cfg.task_config().n_best) == (64, 5)
    assert make_config(flat, ["squad.doc_stride=32"]).task_config().doc_stride == 32


def test_set_squad_doc_stride_reaches_the_task(minilm_path):
    """`--set squad.doc_stride=64` is the stride of the SQuAD windows: consecutive windows share 64 tokens."""
    import datasets
    from transformers import AutoTokenizer

    from adalora_cli.rundata import configured_task

    task = configured_task(make_config(None, ["task=squad", "squad.doc_stride=64"]))
    assert task.settings.doc_stride == 64
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    context = " ".join(f"word{i}" for i in range(300))
    raw = datasets.Dataset.from_dict({"id": ["q"], "title": ["t"], "context": [context], "question": ["which?"],
                                      "answers": [{"text": ["word1"], "answer_start": [0]}]})
    features = task.preprocess(raw, tokenizer, 160, training=False)
    windows = [[i for i, o in zip(ids, offsets) if o is not None] for ids, offsets in
               zip(features["input_ids"], features["offset_mapping"])]
    assert len(windows) > 2
    for first, second in zip(windows, windows[1:]):
        assert first[-64:] == second[:64]  # the shared stride
        assert first[-65:] != second[:65]


# -- a task family is one file ----------------------------------------------------------------------------------

@dataclass
class ShoutSettings(TaskSettings):
    uppercase: bool = setting("Upper-case every text before tokenising it.", False)


class ShoutTask(Task):
    """A task that exists only in this test: is a text loud (does it hold "!")? Rows as JSON lines {text, loud}."""

    name = "shout-test"
    num_labels = 2
    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    settings_class = ShoutSettings
    metric_names = ("accuracy",)

    def local_path(self, split, data_dir, files):
        return Path(files[split]) if split in files else None

    def load(self, split, data_dir, files):
        from adalora_cli.data import read_table, to_dataset

        return to_dataset(read_table(self.local_path(split, data_dir, files)))

    def preprocess(self, raw, tokenizer, max_seq_length, training):
        def tokenize(batch):
            texts = [t.upper() if self.settings.uppercase else t for t in batch["text"]]
            features = tokenizer(texts, truncation=True, max_length=max_seq_length)
            if "loud" in batch:
                features["labels"] = [int(v) for v in batch["loud"]]
            return features

        return raw.map(tokenize, batched=True, remove_columns=raw.column_names)

    def compute_metrics(self, predictions, raw, features):
        return {"accuracy": float(np.mean(predictions[0].argmax(-1) == np.asarray(raw["loud"], dtype=int)))}

    def prediction_inputs(self, path):
        from adalora_cli.data import read_table, row_ids, to_dataset

        columns = read_table(path)
        return to_dataset({"text": columns["text"]}), row_ids(columns)

    def prediction_records(self, predictions, raw, features):
        return [{"loud": bool(row.argmax())} for row in predictions[0]]


def write_rows(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    words = ["the", "film", "was", "great", "dull", "long", "short", "story"]
    rows = []
    for _ in range(count):
        loud = bool(rng.integers(2))
        text = " ".join(rng.choice(words, size=5)) + (" !" if loud else " .")
        rows.append(json.dumps({"text": text, "loud": loud}))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_task_registered_in_one_place_trains_evaluates_and_predicts(tiny_bert_dir, tmp_path, monkeypatch):
    from adalora_cli.tasks import registry

    monkeypatch.setitem(registry._TASKS, ShoutTask.name, ShoutTask())
    train, dev = write_rows(tmp_path / "train.jsonl", 64, 0), write_rows(tmp_path / "dev.jsonl", 24, 1)
    out = tmp_path / "run"
    train_tiny("lora", "--task", "shout-test", "--model", tiny_bert_dir, "--train-file", train, "--validation-file",
               dev, "--output-dir", out, "--max-steps", "4", "--batch-size", "8", "--max-seq-length", "16",
               "--set", "shout-test.uppercase=true")
    config = yaml.safe_load((out / rundir.CONFIG).read_text())
    assert config["shout-test"] == {"uppercase": True}
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert metrics["task"] == "shout-test" and set(metrics["eval"]) == {"accuracy"}

    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], abs=1e-6)
    result = runner.invoke(app, ["predict", str(out), "--input", str(dev)])
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == list(range(24)) and all(isinstance(x["loud"], bool) for x in lines)
    assert get_task("shout-test").column_settings == ()


def test_a_benchmark_becomes_the_generation_class_that_fits_the_model():
    """xsum runs on an encoder-decoder or a decoder-only model: `for_model` returns the class for that model, with
    the run's settings and the model's context; the user-data tasks take only their own kind."""
    from transformers import BartConfig, GPT2Config

    from adalora_cli.tasks.generation import CausalData, CausalGeneration, Seq2SeqGeneration

    xsum = get_task("xsum").with_settings(source_column="document", max_new_tokens=8)
    seq2seq, causal = xsum.for_model(BartConfig()), xsum.for_model(GPT2Config(n_positions=64))
    assert type(seq2seq) is Seq2SeqGeneration and type(causal) is CausalGeneration
    assert (seq2seq.auto_model, seq2seq.peft_task_type) == ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM")
    assert (causal.auto_model, causal.peft_task_type) == ("AutoModelForCausalLM", "CAUSAL_LM")
    assert causal.settings == seq2seq.settings == xsum.settings and causal.decoding()["max_new_tokens"] == 8
    assert causal.length_limits(96) == "--max-seq-length 96, the model's 64-position context"
    assert type(get_task("causal-lm").for_model(GPT2Config())) is CausalData
    with pytest.raises(UserError, match="--task causal-lm needs a causal-lm model, and bart is a seq2seq-lm model"):
        get_task("causal-lm").for_model(BartConfig())
