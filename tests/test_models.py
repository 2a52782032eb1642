"""The default model's shape, end to end: a hub-style DeBERTa-v3 folder (float16 weights with no dtype in its
config, a SentencePiece tokenizer with no tokenizer.json) trains, evaluates and exports after a plain install;
everything that trains (base weights, adapters, optimizer state, allocator statistics) is float32; a folder
that cannot be loaded names the real cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adalora_cli import checkpoints, files, rundir
from adalora_cli.cli import app
from conftest import auto_precision, train_tiny

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "it is what it is"]


def test_the_folder_has_the_hub_checkpoint_shape(deberta_v3_dir):
    from safetensors import safe_open

    folder = Path(deberta_v3_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "spm.model",
                                                        "tokenizer_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert "dtype" not in config and "torch_dtype" not in config and config["model_type"] == "deberta-v2"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


@pytest.fixture(scope="module")
def deberta_run(deberta_v3_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deberta") / "run"
    train_tiny("adalora", "--task", "sst2", "--model", deberta_v3_dir, "--data-dir", glue_dir, "--output-dir", out,
               "--max-steps", "6", "--batch-size", "8", "--max-train-samples", "64", "--max-eval-samples", "48",
               "--max-seq-length", "32", "--set", "save_steps=3", "--set", "adalora.t_init=1",
               "--set", "adalora.t_final=2")
    return out


def test_float16_checkpoint_trains_with_float32_master_weights(deberta_run):
    """Every tensor the run saved is float32: the base weights in the Trainer's checkpoint, the adapter, the head,
    the optimizer's moments and AdaLoRA's importance averages (float16 scores would underflow to 0)."""
    checkpoint = checkpoints.last_complete_checkpoint(deberta_run, True)
    saved = {
        "checkpoint model": files.load_tensors(checkpoint / "model.safetensors"),
        "adapter": files.load_tensors(deberta_run / rundir.ADAPTER),
        "head": files.load_tensors(deberta_run / rundir.HEAD),
        "allocator statistics": files.load_tensors(checkpoint / checkpoints.ALLOCATOR_TENSORS),
    }
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    saved["optimizer state"] = {f"{i}.{k}": v for i, state in optimizer.items() for k, v in state.items()
                                if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0}
    for what, tensors in saved.items():
        assert tensors, what
        dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
        assert dtypes == {torch.float32}, (what, dtypes)
    ipt = [v for k, v in saved["allocator statistics"].items() if k.startswith("ipt")]
    assert ipt and all(torch.isfinite(v).all() for v in ipt) and any(v.abs().sum() > 0 for v in ipt)
    assert json.loads((deberta_run / rundir.METRICS).read_text())["precision"] == auto_precision()


def test_deberta_v3_run_evaluates_and_exports(deberta_run, tmp_path):
    """`eval` reproduces the run; the PEFT export (base loaded in float32) and the merged model give our logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    metrics = json.loads((deberta_run / rundir.METRICS).read_text())
    result = runner.invoke(app, ["eval", str(deberta_run)])
    assert result.exit_code == 0, result.stderr
    assert json.loads((deberta_run / "eval.json").read_text())["eval"] == pytest.approx(metrics["eval"], abs=1e-6)

    _, _, ours, tokenizer, *_ = rundir.load_run(deberta_run)
    assert type(tokenizer).__name__.startswith("DebertaV2Tokenizer")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(**batch).logits
    for fmt in ("peft", "merged"):
        result = runner.invoke(app, ["export-adapter", str(deberta_run), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert result.exit_code == 0, result.stderr
    base_path = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(merged(**merged_tokenizer(TEXTS, padding=True, return_tensors="pt")).logits,
                                   expected, atol=1e-4, rtol=0)
    assert merged.dtype == torch.float32


def _cli_without(packages: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a fresh Python in which `packages` cannot be imported (as after an install without them)."""
    block = "; ".join(f"sys.modules[{p!r}] = None" for p in packages)
    code = f"import sys; {block}; from adalora_cli.cli import app; app(prog_name='adalora')"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _train_args(model, glue_dir, out):
    return ["train", "--task", "sst2", "--model", str(model), "--data-dir", str(glue_dir), "--output-dir", str(out),
            "--budget", "4k", "--max-steps", "1", "--max-train-samples", "8", "--max-eval-samples", "8"]


def test_verify_export_builds_the_peft_base_in_float32(deberta_run):
    """scripts/verify_export.py on a float16 checkpoint: its PEFT client must load the base in float32, as training
    did; in the checkpoint's float16 its logits would differ from ours by float16 rounding and the check fail."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "verify_export.py"), str(deberta_run)],
                            capture_output=True, text=True)
    output = result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), output
    peft_line = next(line for line in result.stdout.splitlines() if line.startswith("peft ") and "all: " in line)
    # float32 against float32 on this tiny model: 1e-9; a float16 base gave 2.4e-5, inside the script's tolerance
    assert float(peft_line.split("all: ")[1].split()[0]) < 1e-6, peft_line


def test_a_sentencepiece_tokenizer_without_its_packages_names_them(deberta_v3_dir, glue_dir, tmp_path):
    proc = _cli_without(["sentencepiece", "google.protobuf"], _train_args(deberta_v3_dir, glue_dir, tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SentencePiece tokenizer" in lines[0], proc.stderr
    assert "pip install sentencepiece protobuf" in lines[0] and "tiktoken" not in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, fragment", [
    ("no tokenizer", "holds no tokenizer files"),
    ("no weights", "check that the folder holds a complete Transformers checkpoint"),
])
def test_a_broken_model_folder_names_the_cause(deberta_v3_dir, glue_dir, tmp_path, damage, fragment):
    import shutil

    folder = Path(shutil.copytree(deberta_v3_dir, tmp_path / "model"))
    if damage == "no tokenizer":
        (folder / "spm.model").unlink()
        (folder / "tokenizer_config.json").unlink()
    else:
        (folder / "model.safetensors").unlink()
    result = runner.invoke(app, _train_args(folder, glue_dir, tmp_path / "run"))
    assert result.exit_code == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("adalora: error: ") and fragment in line and str(folder) in line, line
    assert "hub id while online" not in line  # the folder exists: the fix is in it
