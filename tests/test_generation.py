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


@pytest.mark.parametrize("method", ["adalora", "lora", "dylora", "eva"])
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
    merged_model = auto.from_pretrained(tmp_path / "merged").eval()
    loaded = rundir.load_run(run)
    # one decoding for the three (the run's, which the merged export ships): the weights are what is compared
    loaded.model.generation_config = merged_model.generation_config
    ours = greedy(loaded.model, loaded.tokenizer, causal)
    base = auto.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    base.generation_config = merged_model.generation_config
    untrained = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    theirs = greedy(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval(), loaded.tokenizer, causal)
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


def test_a_model_that_does_not_fit_is_refused_before_any_data_is_read(generators, tmp_path):
    """The training file does not even exist: the model's config alone decides, before data is read or printed."""
    result = runner.invoke(app, ["train", "--task", "seq2seq", "--model", generators["gpt2"], "--budget", "4k",
                                 "--train-file", str(tmp_path / "absent.jsonl"), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "adalora: error: --task seq2seq needs a seq2seq-lm model, and gpt2 is a causal-lm model; use --task causal-lm "
        "with --prompt-column and --completion-column"]


@pytest.mark.parametrize("task, fits", [("seq2seq", "an encoder-decoder model (BART, T5)"),
                                        ("causal-lm", "a decoder-only model (GPT-2, Llama, Qwen, Mistral)"),
                                        ("xsum", "an encoder-decoder model (BART, T5) or a decoder-only model")])
def test_offline_advice_fits_a_generation_task(tmp_path, monkeypatch, task, fits):
    """Offline with the default model (an encoder): the embedded MiniLM-L6 is no advice for a task that generates."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"source": "a", "target": "b", "prompt": "a", "completion": "b"}\n')
    result = runner.invoke(app, ["train", "--task", task, "--train-file", str(data), "--validation-file", str(data),
                                 "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "the local cache lacks model microsoft/deberta-v3-base" in result.stderr
    assert f"give --model with a local folder of {fits}" in result.stderr and "minilm" not in result.stderr


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


# -- long rows, truncation and decoding ----------------------------------------------------------------------

SMALL_CONTEXT = ["--max-seq-length", "512", "--set", "max_target_length=24", "--set", "max_new_tokens=8"]


@pytest.fixture(scope="module")
def gpt2_64(generators, tmp_path_factory):
    """The tiny GPT-2 with a 64-position context: the SQuAD prompts (answer + paragraph) are 75-234 tokens long."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gpt2-64")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(generators["gpt2"], n_positions=64)).save_pretrained(out)
    AutoTokenizer.from_pretrained(generators["gpt2"]).save_pretrained(out)
    return str(out)


def expected_cuts(tokenizer, rows, context, max_target, max_new, training):
    """(inputs, targets) a causal-lm task must cut, from the token counts of the whole rows: a completion (with its
    EOS) over max_target_length; a prompt + completion over the context; for evaluation also a generation prompt
    that leaves fewer than max_new_tokens positions."""
    inputs = targets = 0
    for row in rows:
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        completion = len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + 1
        targets += completion > max_target
        inputs += prompt + min(completion, max_target) > context or (not training and prompt > context - max_new)
    return {"inputs": inputs, "targets": targets}


def test_gpt2_with_a_small_context_trains_evaluates_and_predicts_long_prompts(gpt2_64, question_generation, tmp_path):
    """Prompts of up to 234 tokens on a 64-position GPT-2 (an IndexError in the position embedding before): the
    training sequences fit the context, generation prompts leave room for max_new_tokens, eval and predict feed
    the same prompt for a row, and the cut rows are counted in metrics.json."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from adalora_cli.rundata import max_length

    run = tmp_path / "run"
    train_tiny("lora", "--task", "causal-lm", "--model", gpt2_64, "--train-file", question_generation["causal-train"],
               "--validation-file", question_generation["causal-dev"], "--output-dir", run, "--max-steps", "2",
               "--batch-size", "8", "--eval-every", "2", *SMALL_CONTEXT)
    metrics = json.loads((run / rundir.METRICS).read_text())
    tokenizer = AutoTokenizer.from_pretrained(gpt2_64)
    train_rows, dev_rows = ([json.loads(line) for line in question_generation[f"causal-{s}"].read_text().splitlines()]
                            for s in ("train", "dev"))
    assert metrics["truncated"] == {"train": expected_cuts(tokenizer, train_rows, 64, 24, 8, True),
                                    "validation": expected_cuts(tokenizer, dev_rows, 64, 24, 8, False)}
    assert metrics["truncated"]["train"]["inputs"] > 100 and metrics["truncated"]["validation"]["inputs"] == 16
    assert metrics["decoding"] == {"do_sample": False, "num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 0,
                                   "no_repeat_ngram_size": 0, "eos_token_id": tokenizer.eos_token_id,
                                   "pad_token_id": tokenizer.eos_token_id}
    assert runner.invoke(app, ["eval", str(run)]).exit_code == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["eval"] == pytest.approx(metrics["eval"], rel=1e-5, abs=1e-5)
    assert evaluated["decoding"] == metrics["decoding"]
    predicted = runner.invoke(app, ["predict", str(run), "--input", str(question_generation["causal-dev"])])
    assert predicted.exit_code == 0, predicted.stderr
    assert len(predicted.stdout.splitlines()) == 16

    loaded = rundir.load_run(run)
    task, limit = loaded.task, max_length(loaded.cfg, loaded.task, loaded.tokenizer)
    labelled = Dataset.from_list(dev_rows)
    evaluated_prompts = task.generation_inputs(task.preprocess(labelled, loaded.tokenizer, limit, training=False))
    predicted_prompts = task.generation_inputs(task.preprocess(labelled.remove_columns("completion"),
                                                               loaded.tokenizer, limit, training=False))
    assert evaluated_prompts == predicted_prompts  # the same prompt whatever the reference's length
    for row, prompt in zip(dev_rows, evaluated_prompts):
        whole = tokenizer(row["prompt"])["input_ids"]
        assert len(prompt) == min(len(whole), 64 - 8)
        assert prompt[:28] == whole[:28] and prompt[-28:] == whole[-28:]  # the middle gives way
    trained = task.preprocess(Dataset.from_list(train_rows), loaded.tokenizer, limit, training=True)
    assert max(len(ids) for ids in trained["input_ids"]) == 64


@pytest.mark.parametrize("arch", ["bart", "t5", "gpt2"])
def test_a_target_cut_short_keeps_its_eos(generators, arch):
    """Completions and targets longer than max_target_length (Cyrillic, CJK) end with the end-of-text token, which
    generation stops on; the cut rows are counted."""
    from datasets import Dataset

    from adalora_cli.models import for_task
    from adalora_cli.tasks import get_task, take_truncation

    causal = arch == "gpt2"
    columns = ("prompt", "completion") if causal else ("source", "target")
    settings = dict(zip(("prompt_column", "completion_column") if causal else ("source_column", "target_column"),
                        columns))
    task = get_task("causal-lm" if causal else "seq2seq").with_settings(**settings, max_target_length=6)
    task, _, tokenizer = for_task(generators[arch], task)
    rows = Dataset.from_dict({columns[0]: ["Где родился физик?", "物理学家出生在哪里", "When?"],
                              columns[1]: ["Он родился в 1879 году в деревне под Ульмом", "他出生于1879年的乌尔姆附近的一个村庄",
                                           "1879"]})
    features, cut = take_truncation(task.preprocess(rows, tokenizer, 96, training=True))
    targets = [[t for t in labels if t != -100] for labels in features["labels"]]
    assert [len(t) for t in targets[:2]] == [6, 6] and all(t[-1] == tokenizer.eos_token_id for t in targets)
    assert cut == {"inputs": 0, "targets": 2}


def test_the_checkpoints_generation_config_does_not_change_decoding(generators, tmp_path):
    """A BART that ends every answer at once, saved with generation_config.json's min_length=30 and max_length=65
    (as summarisation checkpoints ship): greedy decoding with the task's settings still writes the empty answer,
    as the same model without those defaults does."""
    from datasets import Dataset
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from adalora_cli.models import for_task, load_model
    from adalora_cli.tasks import get_task

    plain, shipped = tmp_path / "plain", tmp_path / "shipped"
    model = AutoModelForSeq2SeqLM.from_pretrained(generators["bart"])
    tokenizer = AutoTokenizer.from_pretrained(generators["bart"])
    with torch.no_grad():
        model.final_logits_bias[0, tokenizer.eos_token_id] = 100.0  # end-of-text is always the likeliest token
    for folder, defaults in ((plain, {}), (shipped, {"min_length": 30, "max_length": 65, "no_repeat_ngram_size": 3})):
        for key, value in defaults.items():
            setattr(model.generation_config, key, value)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    assert json.loads((shipped / "generation_config.json").read_text())["min_length"] == 30
    rows = Dataset.from_dict({"source": ["answer: Denver context: The Broncos won", "answer: 1879 context: born"]})
    texts = {}
    for folder in (plain, shipped):
        task = get_task("seq2seq").with_settings(source_column="source", target_column="target", max_new_tokens=40)
        task, config, tokenizer = for_task(str(folder), task)
        model, _ = load_model(str(folder), config, task.auto_model)
        features = task.preprocess(rows, tokenizer, 64, training=False)
        texts[folder] = task.outputs(model, features, tokenizer, batch_size=2)["texts"]
    assert texts[shipped] == texts[plain] == ["", ""]


def test_max_new_tokens_beyond_the_context_is_refused(gpt2_64, question_generation, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--task", "causal-lm", "--model", gpt2_64, "--budget", "4k", "--train-file",
                                 str(question_generation["causal-train"]), "--validation-file",
                                 str(question_generation["causal-dev"]), "--output-dir", str(out),
                                 "--set", "max_new_tokens=64"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip() == ("adalora: error: max_new_tokens=64 does not fit the 64-position context of this "
                                     "gpt2 model; use --set max_new_tokens=16 (or another value below 64)")
    assert not out.exists()


def test_a_named_source_column_is_never_detected_as_the_target():
    """`--source-column summary` on a file with `document` and `summary`: the target is not `summary` again (it was:
    each summary was trained to copy itself); with no other target column the run says which option to give."""
    from adalora_cli.data import to_dataset
    from adalora_cli.errors import UserError
    from adalora_cli.tasks import get_task

    rows = to_dataset({"summary": ["a b"], "document": ["c d"]})
    task = get_task("seq2seq").with_settings(source_column="summary")
    with pytest.raises(UserError, match="no target column .*pick one with --target-column"):
        task.settings_from_data(rows, "f.jsonl")
    rows = to_dataset({"summary": ["a b"], "document": ["c d"], "output": ["e"]})
    assert task.settings_from_data(rows, "f.jsonl") == {"source_column": "summary", "target_column": "output"}
    causal = get_task("causal-lm").with_settings(prompt_column="completion")
    with pytest.raises(UserError, match="no completion column"):
        causal.settings_from_data(to_dataset({"completion": ["x"], "prompt": ["y"]}), "f.jsonl")


def test_predict_on_a_file_without_the_source_column_lists_its_columns(tmp_path):
    from adalora_cli.errors import UserError
    from adalora_cli.tasks import get_task

    path = tmp_path / "rows.jsonl"
    path.write_text('{"article": "x", "notes": "y"}\n')
    task = get_task("seq2seq").with_settings(source_column="document", target_column="summary")
    with pytest.raises(UserError, match=r"has no column 'document' \(columns: article, notes\); pick one with "
                                        "--source-column"):
        task.prediction_inputs(path)


def test_config_yaml_records_the_decoding_used(runs):
    """A generation run's config.yaml holds the target length and decoding settings it used: those given (SHORT) and
    the task's defaults for the rest (seq2seq: greedy), so that the file alone says how its texts were generated."""
    import yaml

    config = yaml.safe_load((runs("bart", "lora") / rundir.CONFIG).read_text())
    settings = config[config["task"]]  # the task's section
    assert settings["max_target_length"] == 24 and settings["max_new_tokens"] == 8  # given
    assert settings["num_beams"] == 1 and config["max_seq_length"] == 96 and config["lr"] == 1e-3  # resolved
    assert settings["length_penalty"] is None  # not a setting of this task's decoding: generate's own default


def test_a_merged_generator_carries_the_runs_decoding(runs, tmp_path):
    """The merged export's generation_config.json is the decoding the run was evaluated with (metrics.json
    "decoding"), not the base checkpoint's, so `generate` on the plain model writes what `adalora predict` writes."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = runs("bart", "lora")
    result = runner.invoke(app, ["export-adapter", str(run), "--format", "merged", "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.stderr
    decoding = json.loads((run / rundir.METRICS).read_text())["decoding"]
    shipped = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert {key: shipped.get(key) for key in decoding} == decoding
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        written = model.generate(**tokenizer(PROMPTS[:1], return_tensors="pt"))
    predicted = tmp_path / "prompt.jsonl"
    predicted.write_text(json.dumps({"source": PROMPTS[0]}) + "\n")
    ours = runner.invoke(app, ["predict", str(run), "--input", str(predicted)])
    assert ours.exit_code == 0, ours.stderr
    assert tokenizer.decode(written[0], skip_special_tokens=True).strip() == json.loads(ours.stdout)["text"]
