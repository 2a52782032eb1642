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


def test_plan_agreement_compares_two_plans(tmp_path):
    """scripts/plan_agreement.py: rank correlations against scipy on two hand-made plans, the shares by kind."""
    from scipy.stats import spearmanr

    from adalora_cli import files
    from adalora_cli.rankplan import PlannedTarget, RankPlanFile

    def plan(ranks, name):
        targets = [PlannedTarget(f"layer.{i // 2}.{kind}", 8, 8, i // 2, kind, r)
                   for i, (kind, r) in enumerate(zip(["Wq", "Wv"] * 3, ranks))]
        path = tmp_path / f"{name}.json"
        files.write_json(path, RankPlanFile(str(path), "tiny", "bert", 96, targets, {}).to_json())
        return path, ranks

    (a, ra), (b, rb) = plan([1, 0, 2, 3, 1, 2], "a"), plan([2, 0, 1, 3, 0, 3], "b")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "plan_agreement.py"), str(a), str(b)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "6 matrices; total rank 9 vs 9; at rank 0: 1 vs 2" in proc.stdout
    assert f"Spearman {spearmanr(ra, rb).statistic:.3f}" in proc.stdout
    assert "Wq 44% vs 33%, Wv 56% vs 67%" in proc.stdout  # Wq: 4 of 9 against 3 of 9


def test_plan_modes_tiny(glue_dir, tiny_bert_dir, tmp_path):
    """scripts/plan_modes.py end to end at a tiny size: a plan per mode, LoRA with each and uniform LoRA, scored on
    held-out training rows (it once failed at its first score: bench_quality's `score` had changed signature)."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "plan_modes.py"), "--tasks", "sst2", "--model", tiny_bert_dir,
                           "--data-dir", str(glue_dir), "--budget", "4k", "--steps", "4", "--batch-size", "4",
                           "--max-seq-length", "32", "--holdout", "16", "--plan-fraction", "0.5", "--baselines", "lora",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"plan-schedule", "plan-scores", "lora"} <= set(rows)
    for mode in ("schedule", "scores"):
        plan = json.loads((tmp_path / f"sst2-plan-{mode}-s0.plan.json").read_text())
        assert plan["made_by"]["mode"] == mode and plan["made_by"]["steps"] == 2
        trained = json.loads((tmp_path / f"sst2-plan-{mode}-s0" / "rank_pattern.json").read_text())
        assert trained == {t["name"]: t["rank"] for t in plan["targets"] if t["rank"]}
