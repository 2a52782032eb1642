"""Safe loading: adapters, heads and allocator state load through safetensors and JSON only; the Trainer's own
checkpoint files (optimizer, scheduler, RNG) load with `torch.load(weights_only=True)`, so a pickle that would
run code is refused, never executed; remote model code runs only when asked for with --trust-remote-code."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from adalora_cli import rundir
from adalora_cli.cli import app

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "adalora_cli"


def train(model, glue_dir, out, *extra):
    args = ["train", "--task", "sst2", "--method", "dylora", "--model", model, "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--budget", "4k", "--max-steps", "4", "--batch-size", "4",
            "--max-train-samples", "32", "--max-eval-samples", "8", "--max-seq-length", "16", "--set", "save_steps=2",
            *map(str, extra)]
    return runner.invoke(app, args)


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint or adapter file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def spy_torch_load(monkeypatch):
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.fixture
def stopped_run(tiny_bert_dir, glue_dir, tmp_path):
    """A DyLoRA run as a crash after checkpoint-2 would leave it: config.yaml and checkpoints/checkpoint-2."""
    out = tmp_path / "run"
    result = train(tiny_bert_dir, glue_dir, out)
    assert result.exit_code == 0, result.stderr
    for path in out.iterdir():
        if path.name not in (rundir.CONFIG, rundir.CHECKPOINTS):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out / rundir.CHECKPOINTS / "checkpoint-4")
    return out


def test_resume_loads_pickles_only_with_weights_only(stopped_run, spy_torch_load):
    result = runner.invoke(app, ["train", "--output-dir", str(stopped_run), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert spy_torch_load and all(w is True for w in spy_torch_load), spy_torch_load  # optimizer, scheduler, RNG


def test_a_checkpoint_that_would_run_code_is_refused(stopped_run, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, stopped_run / rundir.CHECKPOINTS / "checkpoint-2" / "optimizer.pt")
    result = runner.invoke(app, ["train", "--output-dir", str(stopped_run), "--resume"])
    assert result.exit_code == 2 and "holds a file that is not plain tensors" in result.stderr, result.stderr
    assert not marker.exists()


def test_an_adapter_file_that_would_run_code_is_refused(tiny_bert_dir, glue_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    assert train(tiny_bert_dir, glue_dir, out).exit_code == 0
    for name in (rundir.ADAPTER, rundir.HEAD):
        torch.save({"w": _Payload(marker)}, out / name)
        result = runner.invoke(app, ["eval", str(out)])
        assert result.exit_code == 2 and "is corrupt or truncated" in result.stderr, result.stderr
        assert not marker.exists()


def test_the_package_never_unpickles():
    """No pickle.load(s) or Unpickler anywhere in the package, and torch.load only with weights_only=True."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner, name = getattr(node.func.value, "id", None), node.func.attr
            assert not (owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads", "Unpickler")), \
                f"{path}:{node.lineno} unpickles"
            if owner == "torch" and name == "load":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                assert weights_only and getattr(weights_only[0].value, "value", None) is True, \
                    f"{path}:{node.lineno} calls torch.load without weights_only=True"


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_remote_code_only_when_asked_for(tiny_bert_dir, glue_dir, tmp_path, monkeypatch, flag, expected):
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    result = train(tiny_bert_dir, glue_dir, tmp_path / "run", *flag)
    assert result.exit_code == 0, result.stderr
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(value is expected for _, value in seen), seen
