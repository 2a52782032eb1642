"""Hostile inputs, one table: every mistake a user can make ends in exactly one line on stderr that names the
problem and the fix, exit code 2, no traceback, and no file created, changed or removed anywhere under the
working folder (the run folders the cases start from included).

Each case builds its command line inside a fresh folder (tmp_path, also the working directory), from
shared material: a tiny local BERT, the real SST-2 files, and two finished tiny runs (LoRA and DyLoRA).
Most cases run in-process through typer's CliRunner; a few also run as real processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from adalora_cli import rundir
from adalora_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Env:
    """What a case may build on: the folder it runs in and the shared material."""

    tmp: Path
    model: str
    glue: Path
    lora_run: Path
    dylora_run: Path

    def train(self, *extra, out="run", method="adalora", budget="4k", task="sst2", data=True) -> list[str]:
        args = ["train", "--task", task, "--method", method, "--model", self.model, "--output-dir", str(self.tmp / out),
                "--max-steps", "2", "--batch-size", "4", "--max-train-samples", "16", "--max-eval-samples", "8",
                "--max-seq-length", "16"]
        if data:
            args += ["--data-dir", str(self.glue)]
        if budget is not None:
            args += ["--budget", budget]
        return args + [str(a) for a in extra]

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def own(self, name: str, text: str, *extra, dev: str | None = None, task="text-classification") -> list[str]:
        """A generic-task run on a training file holding `text` (and a validation file holding `dev`)."""
        files = ["--train-file", self.write(name, text)]
        if dev is not None:
            files += ["--validation-file", self.write("dev" + Path(name).suffix, dev)]
        return self.train(*files, *extra, task=task, data=False)

    def train_on(self, train_text: str | bytes, dev: Path | None = None) -> list[str]:
        """A run whose SST-2 training file has `train_text` (the real dev file unless `dev` is given)."""
        path = self.tmp / "train.tsv"
        path.write_bytes(train_text if isinstance(train_text, bytes) else train_text.encode("utf-8"))
        args = self.train("--train-file", path, "--validation-file", dev or self.glue / "SST-2" / "dev.tsv")
        i = args.index("--data-dir")
        return args[:i] + args[i + 2:]

    def yaml(self, text: str) -> list[str]:
        path = self.tmp / "settings.yaml"
        path.write_text(text)
        return self.train("--config", path)

    def copy_run(self, run: Path, name="copied") -> Path:
        return Path(shutil.copytree(run, self.tmp / name))

    def started_run(self, name="started") -> Path:
        """A run stopped after its checkpoints: config.yaml and checkpoints/ only (no metrics.json)."""
        out = self.tmp / name
        out.mkdir()
        shutil.copy(self.dylora_run / rundir.CONFIG, out / rundir.CONFIG)
        shutil.copytree(self.dylora_run / rundir.CHECKPOINTS, out / rundir.CHECKPOINTS)
        return out


def _damaged_adapter(env: Env, damage: Callable[[bytes], bytes]) -> list[str]:
    run = env.copy_run(env.lora_run)
    path = run / rundir.ADAPTER
    path.write_bytes(damage(path.read_bytes()))
    return ["eval", str(run)]


def _existing_output(env: Env) -> list[str]:
    (env.tmp / "run").mkdir()
    (env.tmp / "run" / "notes.txt").write_text("mine")
    return env.train()


def _missing_head(env: Env) -> list[str]:
    run = env.copy_run(env.lora_run)
    (run / rundir.HEAD).unlink()
    return ["eval", str(run)]


def _export_over_existing(env: Env) -> list[str]:
    (env.tmp / "exported").mkdir()
    (env.tmp / "exported" / "notes.txt").write_text("mine")
    return ["export-adapter", str(env.copy_run(env.lora_run)), "--format", "peft", "--out", str(env.tmp / "exported")]


def _resume_changed(env: Env) -> list[str]:
    run = env.started_run()
    return ["train", "--output-dir", str(run), "--resume", "--lr", "0.5"]


def _resume_without_checkpoint(env: Env) -> list[str]:
    run = env.started_run()
    shutil.rmtree(run / rundir.CHECKPOINTS)
    return ["train", "--output-dir", str(run), "--resume"]


def _model_without_tokenizer(env: Env) -> Path:
    folder = env.tmp / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(env.model) / name, folder / name)
    return folder


def _deepspeed_file(env: Env, stage: int) -> list[str]:
    path = env.tmp / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_batch_size": "auto"}))
    return env.train("--set", f"trainer.deepspeed={path}")


SST2_HEADER = "sentence\tlabel\n"
CASES: dict[str, tuple[Callable[[Env], list[str]], str]] = {
    # command-line options
    "unknown option": (lambda e: e.train("--bugdet", "4k"), "No such option: --bugdet"),
    "option of the wrong type": (lambda e: e.train("--epochs", "three"), "Invalid value for '--epochs'"),
    "unknown command": (lambda e: ["trian"], "No such command 'trian'"),
    "unknown task": (lambda e: e.train("--task", "sst3"), "unknown task 'sst3'"),
    "unknown method": (lambda e: e.train(method="adaloora"), "unknown method 'adaloora'"),
    "zero batch size": (lambda e: e.train("--batch-size", "0"), "batch_size must be at least 1"),
    "negative learning rate": (lambda e: e.train("--lr", "-1e-3"), "lr must be positive"),
    "missing model folder": (lambda e: e.train("--model", e.tmp / "no-model"), "no such folder"),
    "unknown trainer setting": (lambda e: e.train("--set", "trainer.warmup_stepz=3"), "invalid Trainer setting"),
    "--set without a value": (lambda e: e.train("--set", "lr"), "is not key=value"),
    # --config files
    "config: unknown key": (lambda e: e.yaml("bacth_size: 8\n"), "unknown config key 'bacth_size'"),
    "config: wrong type": (lambda e: e.yaml("warmup_ratio: lots\n"), "'warmup_ratio' expects float"),
    "config: unknown method key": (lambda e: e.yaml("adalora:\n  t_innit: 5\n"), "unknown config key 'adalora.t_innit'"),
    "config: method value out of range": (lambda e: e.yaml("adalora:\n  beta1: 1.5\n"), "adalora.beta1 must be in"),
    "config: not YAML": (lambda e: e.yaml("task: [sst2\n"), "is not valid YAML"),
    "config: not a mapping": (lambda e: e.yaml("- sst2\n- lora\n"), "must hold a mapping"),
    "config: missing file": (lambda e: e.train("--config", e.tmp / "nope.yaml"), "config file"),
    # data files
    "data: missing folder": (lambda e: e.train("--data-dir", e.tmp / "no-glue"), "does not exist"),
    "data: wrong columns": (lambda e: e.train_on("text\ttarget\ngood\t1\n"), "lacks the column(s) 'sentence', 'label'"),
    "data: empty file": (lambda e: e.train_on(""), "is empty"),
    "data: header only": (lambda e: e.train_on(SST2_HEADER), "holds no examples"),
    "data: not UTF-8": (lambda e: e.train_on(SST2_HEADER.encode() + "très bien\t1\n".encode("latin-1")), "is not UTF-8"),
    "data: label out of range": (lambda e: e.train_on(SST2_HEADER + "fine\t1\nawful\t7\n"), "label 7 is outside 0..1"),
    "data: label not a class": (lambda e: e.train_on(SST2_HEADER + "fine\tpositive\n"), "label 'positive' is not 0..1"),
    "data: short row": (lambda e: e.train_on(SST2_HEADER + "no label here\n"), "has 1 column(s)"),
    # budgets
    "budget: not a count": (lambda e: e.train(budget="0.3X"), "not a parameter count"),
    "budget: too small": (lambda e: e.train(budget="100"), "below one rank per adapted matrix"),
    "budget: above the initial ranks": (lambda e: e.train("--set", "adalora.init_r=1", budget="20k"),
                                        "above what the initial rank holds"),
    "budget: both budget and target_r": (lambda e: e.train("--set", "adalora.target_r=2"), "give either --budget"),
    # DyLoRA ranks
    "dylora: r_max above the budget": (lambda e: e.train("--set", "dylora.r_max=99", method="dylora"),
                                       "dylora.r_max=99 does not fit --budget"),
    "dylora: eval rank above r_max": (lambda e: ["eval", str(e.copy_run(e.dylora_run)), "--rank", "9"], "outside 1..4"),
    "eval --rank of a fixed-rank run": (lambda e: ["eval", str(e.copy_run(e.lora_run)), "--rank", "2"],
                                        "need an adapter trained for any rank"),
    # output folders
    "existing output folder": (_existing_output, "is not empty; pass --overwrite"),
    "output path is a file": (lambda e: (e.tmp.joinpath("run").write_text("x"), e.train())[1], "is a file"),
    # adapter files
    "adapter: corrupt": (lambda e: _damaged_adapter(e, lambda b: b"\x00garbage" * 50), "is corrupt or truncated"),
    "adapter: truncated": (lambda e: _damaged_adapter(e, lambda b: b[: len(b) // 2]), "is corrupt or truncated"),
    "adapter: empty": (lambda e: _damaged_adapter(e, lambda b: b""), "is corrupt or truncated"),
    "head file missing": (_missing_head, "is missing"),
    "eval: not a run folder": (lambda e: ["eval", str(e.tmp)], "is not a run directory"),
    # exports
    "export: over an existing folder": (_export_over_existing, "--overwrite"),
    "export: unknown format": (lambda e: ["export-adapter", str(e.copy_run(e.lora_run)), "--format", "onnx",
                                          "--out", str(e.tmp / "x")], "onnx"),
    "export: rank above r_max": (lambda e: ["export-adapter", str(e.copy_run(e.dylora_run)), "--rank", "9",
                                            "--format", "peft", "--out", str(e.tmp / "x")], "outside 1..4"),
    # resuming
    "resume: settings changed": (_resume_changed, "setting 'lr' is 0.5 but the run"),
    "resume: no checkpoint": (_resume_without_checkpoint, "no complete checkpoint"),
    "resume: finished run": (lambda e: ["train", "--output-dir", str(e.copy_run(e.dylora_run)), "--resume"],
                             "already finished"),
    "resume: no such folder": (lambda e: ["train", "--output-dir", str(e.tmp / "none"), "--resume"], "does not exist"),
    "resume and overwrite": (lambda e: ["train", "--output-dir", str(e.started_run()), "--resume", "--overwrite"],
                             "pass only one"),
    # your own data
    "own data: no training file": (lambda e: e.train(task="text-classification", data=False), "pass --train-file"),
    "own data: unknown file type": (lambda e: e.own("rows.xlsx", "text,label\nfine,good\n"), "unknown file type .xlsx"),
    "own data: no text column": (lambda e: e.own("rows.csv", "words,label\nfine,good\nbad,poor\n"),
                                 "has no text column (text / sentence / sentence1; columns: words, label); "
                                 "pick one with --text-column"),
    "own data: missing named column": (lambda e: e.own("rows.csv", "text,label\nfine,good\nbad,poor\n",
                                                       "--label-column", "stars"),
                                       "has no column 'stars' (columns: text, label); pick one with --label-column"),
    "own data: empty text": (lambda e: e.own("rows.jsonl", '{"text": "fine", "label": 1}\n{"text": " ", "label": 0}\n'),
                             "row 2: 'text' is empty"),
    "own data: label unseen in training": (lambda e: e.own("rows.csv", "text,label\nfine,good\nbad,poor\n",
                                                           dev="text,label\nso so,neutral\n"),
                                           "label 'neutral' was not seen in the training data"),
    "own data: empty label in validation": (lambda e: e.own("rows.csv", "text,label\nfine,good\nbad,poor\n",
                                                            dev="text,label\nso so,good\nmeh,\n"),
                                            "dev.csv row 2: the label ('label') is empty; every row needs a label"),
    "own data: empty label in training": (lambda e: e.own("rows.jsonl", '{"text": "fine", "label": 1}\n'
                                                          '{"text": "bad", "label": 0}\n{"text": "meh", "label": null}\n'),
                                          "rows.jsonl row 3: the label ('label') is empty"),
    "own data: regression target not a number": (lambda e: e.own("rows.csv", "text,score\nfine,4.5\nbad,low\n",
                                                                 task="text-regression"), "is 'low', not a number"),
    "own data: one class only": (lambda e: e.own("rows.csv", "text,label\nfine,good\nbad,good\n"),
                                 "classification needs at least two classes"),
    "own data: ragged CSV row": (lambda e: e.own("rows.csv", "text,label\nfine,good\nbad,poor,extra\n"),
                                 "line 3 has 3 field(s), the header has 2"),
    # evaluation during training
    "--keep-best without --eval-every": (lambda e: e.train("--keep-best"), "add --eval-every"),
    "--eval-every not a count": (lambda e: e.train("--eval-every", "often"), "--eval-every must be"),
    "--metric of another task": (lambda e: e.train("--eval-every", "2", "--metric", "pearson"),
                                 "--metric 'pearson' is not a metric of sst2"),
    "--report-to unknown": (lambda e: e.train("--report-to", "comet"), "unknown --report-to 'comet'"),
    # the hub, offline
    "offline: model and data from the hub": (lambda e: ["train", "--task", "sst2", "--output-dir", str(e.tmp / "run"),
                                                        "--budget", "0.3M"],
                                             "HF_HUB_OFFLINE is set and the local cache lacks model "
                                             "microsoft/deberta-v3-base, dataset nyu-mll/glue (sst2)"),
    # predict
    "predict: input without the text column": (lambda e: ["predict", str(e.copy_run(e.lora_run)), "--input",
                                                          str(e.write("rows.csv", "words\nfine\n"))],
                                               "has no column 'sentence'"),
    "predict: a column option of another task": (lambda e: ["predict", str(e.copy_run(e.lora_run)), "--input",
                                                          str(e.write("rows.csv", "words\nfine\n")),
                                                          "--text-column", "words"],
                                                 "--text-column does not apply to sst2 runs"),
    "predict: glue format for own data": (lambda e: ["predict", str(e.copy_run(e.lora_run)), "--input",
                                                     str(e.write("rows.csv", "sentence\nfine\n")), "--format", "tsv"],
                                          "unknown prediction format 'tsv'"),
    "predict: missing input file": (lambda e: ["predict", str(e.copy_run(e.lora_run)), "--input",
                                               str(e.tmp / "none.csv")], "does not exist"),
    # eval --input
    "eval --input: a file without the run's columns": (lambda e: ["eval", str(e.copy_run(e.lora_run)), "--input",
                                                                 str(e.write("test.tsv", "words\tlabel\nfine\t1\n"))],
                                                        "lacks the column(s) 'sentence' that GLUE sst2 needs (found "
                                                        "'words', 'label')"),
    "eval --input: no such file": (lambda e: ["eval", str(e.copy_run(e.lora_run)), "--input", str(e.tmp / "no.tsv")],
                                   "no.tsv does not exist; give the file to read"),
    "eval: a column option without --input": (lambda e: ["eval", str(e.copy_run(e.lora_run)), "--text-column", "x"],
                                              "give --input or drop them"),
    "eval --input with --rank-sweep": (lambda e: ["eval", str(e.copy_run(e.dylora_run)), "--rank-sweep", "--input",
                                                  str(e.write("test.tsv", "sentence\tlabel\nfine\t1\n"))],
                                       "use --rank B with --input"),
    # precision
    "precision: fp16 on a CPU": (lambda e: e.train("--precision", "fp16", "--set", "trainer.use_cpu=true"),
                                 "fp16 needs a CUDA GPU"),
    "precision: unknown": (lambda e: e.train("--precision", "fp8"), "unknown precision 'fp8'"),
    "precision: set through trainer.*": (lambda e: e.train("--set", "trainer.bf16=true"),
                                         "trainer.bf16 is set by --precision"),
    # model folders
    "model folder without a tokenizer": (lambda e: e.train("--model", _model_without_tokenizer(e)),
                                         "holds no tokenizer files"),
    # DeepSpeed
    "deepspeed: ZeRO-3": (lambda e: _deepspeed_file(e, 3), "ZeRO-3 partitions the weights"),
    "deepspeed: ZeRO-2 with AdaLoRA": (lambda e: _deepspeed_file(e, 2), "ZeRO-2 is not supported by adalora"),
    "deepspeed: missing config file": (lambda e: e.train("--set", "trainer.deepspeed=nope.json"),
                                       "DeepSpeed config nope.json does not exist"),
}


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: path -> (size, mtime in ns), to see any creation or change."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def _train_tiny(out: Path, model: str, glue: Path, method: str, *extra) -> Path:
    args = ["train", "--task", "sst2", "--method", method, "--model", model, "--data-dir", str(glue),
            "--output-dir", str(out), "--budget", "4k", "--max-steps", "4", "--batch-size", "4",
            "--max-train-samples", "32", "--max-eval-samples", "8", "--max-seq-length", "16",
            "--set", "save_steps=2", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, glue_dir):
    base = tmp_path_factory.mktemp("hostile-runs")
    return (_train_tiny(base / "lora", tiny_bert_dir, glue_dir, "lora"),
            _train_tiny(base / "dylora", tiny_bert_dir, glue_dir, "dylora"))


@pytest.fixture
def env(tmp_path, tiny_bert_dir, glue_dir, runs, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written relative to the working folder shows up in the tree too
    return Env(work, tiny_bert_dir, glue_dir, *runs)


def test_the_table_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(env, runs, case):
    build, fragment = CASES[case]
    args = build(env)
    before, runs_before = tree(env.tmp), [tree(r) for r in runs]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash caught by the runner
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalora: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert tree(env.tmp) == before, "files were created, changed or removed"
    assert [tree(r) for r in runs] == runs_before
    print(f"| {case} | {lines[0]} |")  # the table of cases and messages, with `pytest -s`


@pytest.mark.parametrize("case", ["unknown option", "data: not UTF-8", "adapter: truncated", "budget: too small"])
def test_hostile_input_in_a_real_process(env, case):
    build, fragment = CASES[case]
    args = build(env)
    before = tree(env.tmp)
    proc = subprocess.run([sys.executable, "-m", "adalora_cli", *args], capture_output=True, text=True, cwd=env.tmp,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalora: error: ") and fragment in lines[0], proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert tree(env.tmp) == before
