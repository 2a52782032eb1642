"""The benchmark scripts run end to end in their tiny modes, so they cannot rot (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
pytestmark = pytest.mark.slow


def test_bench_speed_tiny(glue_dir, tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_speed.py"), "--tiny", "--data-dir", str(glue_dir),
                           "--batch-size", "4", "--seq-len", "16", "--steps", "2", "--warmup", "1",
                           "--variants", "head-only", "lora", "adalora", "peft-lora", "peft-adalora",
                           "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"head-only", "lora", "adalora", "peft-lora", "peft-adalora"}
    assert all(r["ms"] > 0 and r["peak_mib"] >= 0 for r in results.values())
    assert results["lora"]["trainable"] == results["peft-lora"]["trainable"]  # same rank, same targets
    assert results["adalora"]["trainable"] == results["peft-adalora"]["trainable"]
    assert "adalora / peft-adalora: time" in proc.stdout


def test_bench_quality_tiny(glue_dir, tiny_bert_dir, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_quality.py"), "--tiny", "--model", tiny_bert_dir,
                           "--data-dir", str(glue_dir), "--budget", "4k", "--work-dir", str(tmp_path / "runs"),
                           "--out", str(report), "--methods", "lora", "adalora", "peft-adalora"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = report.read_text()
    for method in ("lora", "adalora", "peft-adalora"):
        assert f"| {method} |" in text
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs) == 3 and all(r["adapter_params"] <= 4000 for r in runs if r["method"] != "peft-adalora")


def test_bench_eval_processes_tiny(glue_dir, tiny_bert_dir, tmp_path):
    from conftest import train_tiny

    run, out = tmp_path / "run", tmp_path / "bench.json"
    train_tiny("lora", "--task", "sst2", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", run,
               "--max-steps", "1", "--max-train-samples", "8", "--max-eval-samples", "9", "--set", "eval_batch_size=2")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_eval_processes.py"), str(run), "--processes", "2",
                           "--cpu", "--threads", "1", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["equal"] and set(result["one"]) == {"accuracy"} and result["processes_s"] > 0
    assert "metrics equal" in proc.stdout
