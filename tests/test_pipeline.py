"""`adalora train` then `adalora eval` for every registered method on a tiny local BERT: the run directory
is complete, the saved adapter holds the kept ranks only, and reloading reproduces the metrics exactly."""

import json

import pytest
from typer.testing import CliRunner

from adalora_cli import files, rundir
from adalora_cli.cli import app
from adalora_cli.methods import available_methods, get_method
from conftest import auto_precision, train_tiny

runner = CliRunner()


def train(tiny_bert_dir, glue_dir, out, method, *extra):
    train_tiny(method, "--task", "sst2", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out,
               "--max-steps", "6", "--batch-size", "8", "--max-train-samples", "64", "--max-eval-samples", "48",
               "--max-seq-length", "32", "--set", "logging_steps=2", *extra)
    return json.loads((out / rundir.METRICS).read_text())


def sst2_cut(tokenizer_dir, glue_dir, file: str, rows: int) -> dict[str, int]:
    """How many of the first `rows` SST-2 sentences --max-seq-length 32 cuts, from their whole tokenization."""
    from transformers import AutoTokenizer

    from adalora_cli.tasks.glue import read_tsv
    from adalora_cli.tasks import get_task

    sentences = read_tsv(glue_dir / "SST-2" / file, get_task("sst2").spec)["sentence"][:rows]
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(tokenizer_dir)(sentences)["input_ids"]]
    return {"inputs": sum(n > 32 for n in lengths), "targets": 0}


@pytest.mark.parametrize("method", available_methods())
def test_train_then_eval_reproduces_metrics(tiny_bert_dir, glue_dir, tmp_path, method):
    out = tmp_path / method
    metrics = train(tiny_bert_dir, glue_dir, out, method, "--set", "adalora.t_init=1", "--set", "adalora.t_final=2")
    assert set(metrics) == {"task", "method", "model", "budget", "adapter_params", "nonzero_adapter_params", "steps",
                            "precision", "train_runtime_s", "eval", "truncated"}
    assert metrics["truncated"] == {"train": sst2_cut(tiny_bert_dir, glue_dir, "train.tsv", 64),
                                    "validation": sst2_cut(tiny_bert_dir, glue_dir, "dev.tsv", 48)}
    assert metrics["steps"] == 6 and metrics["precision"] == auto_precision()
    assert set(metrics["eval"]) == {"accuracy"}
    for name in (rundir.CONFIG, rundir.ADAPTER_CONFIG, rundir.HEAD, rundir.RANK_PATTERN, rundir.TRAIN_LOG):
        assert (out / name).is_file(), name
    assert (out / rundir.TOKENIZER).is_dir()
    pattern = json.loads((out / rundir.RANK_PATTERN).read_text())
    if get_method(method).adapter:
        assert len(pattern) == 12 and metrics["adapter_params"] <= metrics["budget"] == 4000
        saved = files.load_tensors(out / rundir.ADAPTER)
        for name, rank in pattern.items():
            assert saved[f"{name}.lora_A"].shape[0] == rank  # only the kept components are stored
    else:
        assert pattern == {} and metrics["budget"] is None and (out / rundir.FULL_WEIGHTS).is_file()

    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.stderr
    reloaded = json.loads((out / "eval.json").read_text())["eval"]
    assert reloaded == pytest.approx(metrics["eval"], abs=1e-6)


def test_adaptive_run_records_history(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "ada"
    train(tiny_bert_dir, glue_dir, out, "adalora", "--set", "adalora.t_init=1", "--set", "adalora.t_final=2")
    history = json.loads((out / rundir.RANK_HISTORY).read_text())
    assert history[0]["step"] == 0 and history[-1]["budget"] == 4000
    assert all(h["adapter_params"] <= h["budget"] for h in history[1:])
    log = json.loads((out / rundir.TRAIN_LOG).read_text())
    assert any("regulariser" in entry and "task_loss" in entry for entry in log)


def test_overwrite_replaces_a_run(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_bert_dir, glue_dir, out, "lora")
    (out / "stale.txt").write_text("old")
    train(tiny_bert_dir, glue_dir, out, "lora", "--overwrite")
    assert not (out / "stale.txt").exists()


def test_any_rank_evaluation_of_a_dylora_run(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "dy"
    metrics = train(tiny_bert_dir, glue_dir, out, "dylora")
    r_max = max(json.loads((out / rundir.RANK_PATTERN).read_text()).values())
    assert r_max == 4  # 4000 // 896

    result = runner.invoke(app, ["eval", str(out), "--rank", "2"])
    assert result.exit_code == 0, result.stderr
    at_two = json.loads((out / "eval.json").read_text())
    assert at_two["rank"] == 2

    result = runner.invoke(app, ["eval", str(out), "--rank-sweep"])
    assert result.exit_code == 0, result.stderr
    sweep = json.loads((out / "eval_ranks.json").read_text())
    assert sorted(sweep, key=int) == ["1", "2", "3", "4"]
    assert sweep["2"] == at_two["eval"]
    assert sweep[str(r_max)] == pytest.approx(metrics["eval"], abs=1e-6)  # training ends at r_max
    assert (out / "eval_ranks.png").stat().st_size > 5000

    result = runner.invoke(app, ["eval", str(out), "--rank", "9"])
    assert result.exit_code == 2 and "outside 1..4" in result.stderr


def test_rank_options_need_an_any_rank_method(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "lora"
    train(tiny_bert_dir, glue_dir, out, "lora")
    result = runner.invoke(app, ["eval", str(out), "--rank", "2"])
    assert result.exit_code == 2 and "need an adapter trained for any rank" in result.stderr


def test_config_yaml_records_the_values_used(tiny_bert_dir, glue_dir, tmp_path):
    """Defaults are written resolved into config.yaml: the method's learning rate, the task's sequence length capped
    by the tokenizer's limit (100 here, under SST-2's 128), and the checkpoint interval scaled to the run (64 rows in
    batches of 4, one epoch: 16 optimizer steps, a checkpoint every 2). `adalora eval` reproduces the metrics from it,
    and from the same config written the old way, with nulls. (Before, config.yaml held lr: null, max_seq_length:
    null, and every run checkpointed every 500 steps: this one would have kept no checkpoint.)"""
    import shutil

    import yaml

    from adalora_cli.config import from_dict

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 100}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--task", "sst2", "--method", "lora", "--model", str(model), "--data-dir",
                                 str(glue_dir), "--output-dir", str(out), "--budget", "4k", "--epochs", "1",
                                 "--batch-size", "4", "--max-train-samples", "64", "--max-eval-samples", "48"])
    assert result.exit_code == 0, result.stderr
    config = yaml.safe_load((out / rundir.CONFIG).read_text())
    assert config["lr"] == get_method("lora").default_lr == 1e-3
    assert config["max_seq_length"] == 100 and config["save_steps"] == 2
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert metrics["steps"] == 16 == from_dict(config).optimizer_steps(64)  # counted as the Trainer counts
    checkpoints = sorted((out / rundir.CHECKPOINTS).iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-14", "checkpoint-16"]  # every 2 steps; the last two kept
    assert f"training done; last checkpoint: {out / rundir.CHECKPOINTS / 'checkpoint-16'}" in result.stderr

    assert runner.invoke(app, ["eval", str(out)]).exit_code == 0
    assert json.loads((out / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], abs=1e-6)
    (out / "eval.json").unlink()
    old = {**config, "lr": None, "max_seq_length": None, "save_steps": None, "num_beams": None}
    (out / rundir.CONFIG).write_text(yaml.safe_dump(old, sort_keys=False))
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], abs=1e-6)
