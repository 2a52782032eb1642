"""Generation with adaptive ranks: tiny BART and T5 (encoder-decoder) and GPT-2 (decoder-only, Conv1D projections)
with tokenizers trained in the tests, on question generation from SQuAD. Every method trains, evaluates
(loss, perplexity, ROUGE, BLEU), predicts and exports; our model, the PEFT client and the merged model generate
the same tokens; DyLoRA sweeps its ranks; models that do not fit the task are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import rundir
from adalora_cli.cli import app
from conftest import ON_CPU, train_tiny

runner = CliRunner()
KINDS = {"bart": "seq2seq", "t5": "seq2seq", "gpt2": "causal"}
TASKS = {"seq2seq": "seq2seq", "causal": "causal-lm"}
SHORT = ["--max-steps", "6", "--batch-size", "8", "--max-seq-length", "96", "--set", "max_target_length=24",
         "--set", "max_new_tokens=8", "--set", "adalora.t_init=1", "--set", "adalora.t_final=2"]
PROMPTS = ["answer: Denver Broncos context: The American Football Conference champion Denver Broncos won",
           "answer: 1879 context: The physicist was born in 1879 in a village"]


@pytest.fixture(scope="module")
def runs(generators, question_generation, tmp_path_factory):
    cache = {}

    def get(arch, method):
        if (arch, method) not in cache:
            data = KINDS[arch]
            out = tmp_path_factory.mktemp("generation") / f"{arch}-{method}"
            train_tiny(method, "--task", TASKS[data], "--model", generators[arch], "--train-file",
                       question_generation[f"{data}-train"], "--validation-file", question_generation[f"{data}-dev"],
                       "--output-dir", out, *SHORT)
            cache[(arch, method)] = out
        return cache[(arch, method)]

    return get


def greedy(model, tokenizer, causal: bool):
    tokenizer.padding_side = "left" if causal else "right"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=6, min_new_tokens=6,
                              pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("method", ["adalora", "lora", "dylora"])
@pytest.mark.parametrize("arch", ["bart", "t5", "gpt2"])
def test_train_eval_predict_and_export(runs, question_generation, tmp_path, arch, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    run, data = runs(arch, method), KINDS[arch]
    metrics = json.loads((run / rundir.METRICS).read_text())
    assert {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"} <= set(metrics["eval"])
    assert metrics["eval"]["perplexity"] == pytest.approx(2.718281828 ** metrics["eval"]["loss"], rel=1e-4)
    assert metrics["adapter_params"] <= 4000
    assert runner.invoke(app, ["eval", str(run)]).exit_code == 0
    assert json.loads((run / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], rel=1e-5, abs=1e-5)

    predicted = runner.invoke(app, ["predict", str(run), "--input", str(question_generation[f"{data}-dev"])])
    assert predicted.exit_code == 0, predicted.stderr
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [r["id"] for r in lines] == list(range(16)) and all(isinstance(r["text"], str) for r in lines)

    for fmt in ("peft", "merged"):
        result = runner.invoke(app, ["export-adapter", str(run), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    causal = data == "causal"
    assert config["task_type"] == ("CAUSAL_LM" if causal else "SEQ_2_SEQ_LM")
    assert config["fan_in_fan_out"] == (arch == "gpt2")  # GPT-2's Conv1D stores its weight transposed
    auto = AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM
    loaded = rundir.load_run(run)
    ours = greedy(loaded.model, loaded.tokenizer, causal)
    base = auto.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    untrained = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    theirs = greedy(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval(), loaded.tokenizer, causal)
    merged_model = auto.from_pretrained(tmp_path / "merged").eval()
    merged = greedy(merged_model, loaded.tokenizer, causal)
    assert torch.equal(ours, theirs) and torch.equal(ours, merged)
    # the agreement is not that of three untouched models: the trained update is in the merged weights
    changed = [name for name, tensor in merged_model.state_dict().items()
               if name in untrained and not torch.equal(tensor, untrained[name])]
    assert changed, "the merged model equals the base model"


def test_the_rank_heat_map_shows_cross_attention(runs):
    table = runner.invoke(app, ["inspect", str(runs("bart", "adalora"))]).stdout
    header = table.splitlines()[1].split()
    assert header[:11] == ["layer", "Wq", "Wk", "Wv", "Wo", "Cq", "Ck", "Cv", "Co", "Wf1", "Wf2"]
    rows = [line.split() for line in table.splitlines()[2:6]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]  # encoder blocks 0-1, then decoder blocks 2-3
    assert rows[0][5:9] == ["-"] * 4 and "-" not in rows[2][5:9]  # cross-attention only in the decoder


def test_dylora_rank_sweep_on_a_generation_run(generators, question_generation, tmp_path):
    run = tmp_path / "run"
    train_tiny("dylora", "--task", "seq2seq", "--model", generators["t5"], "--train-file",
               question_generation["seq2seq-train"], "--validation-file", question_generation["seq2seq-dev"],
               "--output-dir", run, "--budget", "10k", *SHORT)
    result = runner.invoke(app, ["eval", str(run), "--rank-sweep"])
    assert result.exit_code == 0, result.stderr
    by_rank = json.loads((run / "eval_ranks.json").read_text())
    assert list(by_rank) == [str(b) for b in range(1, len(by_rank) + 1)] and len(by_rank) >= 2
    assert all({"rougeL", "bleu", "perplexity"} <= set(m) for m in by_rank.values())
    assert (run / "eval_ranks.png").is_file()


PIPELINE = """
import sys
from transformers import pipeline
generate = pipeline("text-generation", model=sys.argv[1])
print(generate("answer: 1879 context: The physicist was born in 1879", max_new_tokens=5, do_sample=False)[0]["generated_text"])
"""


def test_merged_gpt2_runs_in_the_text_generation_pipeline(runs, tmp_path):
    result = runner.invoke(app, ["export-adapter", str(runs("gpt2", "lora")), "--format", "merged", "--out",
                                 str(tmp_path / "merged")])
    assert result.exit_code == 0
    proc = subprocess.run([sys.executable, "-c", PIPELINE, str(tmp_path / "merged")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("answer: 1879 context:")


@pytest.mark.parametrize("arch, task, fragment", [
    ("gpt2", "seq2seq", "--task seq2seq needs a seq2seq-lm model, and gpt2 is a causal-lm model; use --task causal-lm"),
    ("bart", "causal-lm", "--task causal-lm needs a causal-lm model, and bart is a seq2seq-lm model; use --task seq2seq"),
])
def test_a_model_that_does_not_fit_the_task_is_refused(generators, question_generation, tmp_path, arch, task, fragment):
    data = "seq2seq" if task == "seq2seq" else "causal"
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--task", task, "--model", generators[arch], "--budget", "4k",
                                 "--train-file", str(question_generation[f"{data}-train"]), "--output-dir", str(out)])
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert not out.exists()


def test_an_encoder_cannot_generate(tiny_bert_dir, question_generation, tmp_path):
    result = runner.invoke(app, ["train", "--task", "seq2seq", "--model", tiny_bert_dir, "--budget", "4k",
                                 "--train-file", str(question_generation["seq2seq-train"]),
                                 "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "seq2seq generates text, which a bert model cannot" in result.stderr


@pytest.mark.parametrize("rows, flags, fragment", [
    ('{"question": "q?", "context": "c"}\n', [], "has no source column (source / input / document / article"),
    ('{"source": "a", "target": " "}\n{"source": "b", "target": "t"}\n', [], "row 1: 'target' is empty"),
    ('{"source": "a", "target": "t"}\n', ["--target-column", "question"], "has no column 'question'"),
])
def test_bad_generation_data_is_one_line(generators, tmp_path, rows, flags, fragment):
    data = tmp_path / "rows.jsonl"
    data.write_text(rows)
    result = runner.invoke(app, ["train", "--task", "seq2seq", "--model", generators["bart"], "--budget", "4k",
                                 "--train-file", str(data), "--output-dir", str(tmp_path / "run"), *flags])
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_plain_language_modelling_reports_perplexity(generators, question_generation, tmp_path):
    texts = tmp_path / "texts.jsonl"
    rows = [json.loads(line) for line in question_generation["causal-train"].read_text().splitlines()]
    texts.write_text("".join(json.dumps({"text": r["prompt"] + " " + r["completion"]}) + "\n" for r in rows))
    out = tmp_path / "run"
    train_tiny("lora", "--task", "causal-lm", "--model", generators["gpt2"], "--train-file", texts,
               "--output-dir", out, "--max-steps", "4", "--batch-size", "8", "--max-seq-length", "64")
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert set(metrics["eval"]) == {"loss", "perplexity"}  # held out: 10% of the texts
    assert json.loads(json.dumps(metrics))["eval"]["perplexity"] > 1


def test_a_generation_run_resumes_exactly(generators, question_generation, tmp_path):
    """SIGKILL after a checkpoint, then --resume: the same adapter, bit for bit, and the same metrics."""
    from adalora_cli import files
    from test_resume import run_cli, run_in_process

    def args(out):
        return ["train", "--task", "seq2seq", "--method", "adalora", "--model", generators["bart"], "--train-file",
                question_generation["seq2seq-train"], "--validation-file", question_generation["seq2seq-dev"],
                "--output-dir", out, "--budget", "4k", *SHORT, "--set", "save_steps=3", "--seed", "2", *ON_CPU]

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_in_process(args(reference))
    assert run_cli(args(resumed), ADALORA_TEST_KILL_AFTER_SAVE="3").returncode != 0
    again = run_cli(["train", "--output-dir", resumed, "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    ours, theirs = (json.loads((d / rundir.METRICS).read_text()) for d in (resumed, reference))
    assert ours["eval"] == pytest.approx(theirs["eval"], rel=1e-6, abs=1e-6)
    a, b = files.load_tensors(resumed / rundir.ADAPTER), files.load_tensors(reference / rundir.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_on_two_processes(generators, question_generation, tmp_path):
    from test_distributed import check_same_decisions_and_one_writer, torchrun

    out = tmp_path / "ddp"
    args = ["train", "--task", "causal-lm", "--method", "dylora", "--model", generators["gpt2"], "--train-file",
            question_generation["causal-train"], "--validation-file", question_generation["causal-dev"],
            "--output-dir", out, "--budget", "4k", *SHORT, "--batch-size", "4", "--max-steps", "4"]
    proc, traces = torchrun(args, tmp_path / "trace")
    check_same_decisions_and_one_writer(proc, traces, out, 4)


def test_bf16_autocast_on_a_generation_run(generators, question_generation, tmp_path):
    out = tmp_path / "run"
    train_tiny("lora", "--task", "causal-lm", "--model", generators["gpt2"], "--train-file",
               question_generation["causal-train"], "--validation-file", question_generation["causal-dev"],
               "--output-dir", out, *SHORT, "--max-steps", "3", "--precision", "bf16")
    metrics = json.loads((out / rundir.METRICS).read_text())
    assert metrics["precision"] == "bf16" and metrics["eval"]["loss"] > 0


def test_config_yaml_records_the_decoding_used(runs):
    """A generation run's config.yaml holds the target length and decoding settings it used: those given (SHORT) and
    the task's defaults for the rest (seq2seq: greedy), so that the file alone says how its texts were generated."""
    import yaml

    config = yaml.safe_load((runs("bart", "lora") / rundir.CONFIG).read_text())
    assert config["max_target_length"] == 24 and config["max_new_tokens"] == 8  # given
    assert config["num_beams"] == 1 and config["max_seq_length"] == 96 and config["lr"] == 1e-3  # resolved
    assert config["length_penalty"] is None  # not a setting of this task's decoding: generate's own default
