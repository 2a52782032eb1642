"""How `adalora plan` should make its plan: each `--plan-mode`, then LoRA trained with the plan, against uniform
LoRA and AdaLoRA at the same budget, scored on held-out *training* rows (never the GLUE dev sets).

    python scripts/plan_modes.py --tasks sst2 mrpc rte --seeds 0 1 2 --budget 0.3M --steps 600 --workers 2

Prints a markdown table: the mean task score (GLUE metrics x 100) per variant and task, their average, and the
plan's mean seconds (the pass, as `made_by.seconds` records it). Runs already finished in --work-dir are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import ROOT, add_run_options, score  # noqa: E402
from sweep import holdout_split  # noqa: E402

MODES = ("schedule", "scores")
BASELINES = ("lora", "adalora")


def run_options(job: dict, args) -> list[str]:
    """The train options every variant shares (a plan gets the same ones: its pass is a share of this run)."""
    options = ["--task", job["task"], "--budget", args.budget, "--model", args.model, "--data-dir", str(args.eval_data),
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-seq-length",
               str(args.max_seq_length), "--seed", str(job["seed"]), "--set", f"save_steps={10 * args.steps}",
               "--max-train-samples", str(args.steps * args.batch_size)]
    if args.max_eval_samples is not None:
        options += ["--max-eval-samples", str(args.max_eval_samples)]
    return options


def adalora(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "adalora_cli", *args], check=True, capture_output=True, text=True, cwd=ROOT)


def run_variant(job: dict, args) -> dict:
    """Train one variant (a plan first, for plan-<mode>); returns its metrics and the plan's seconds."""
    out = Path(job["out"])
    options = run_options(job, args)
    plan_seconds = None
    if job["variant"].startswith("plan-"):
        plan = out.parent / f"{out.name}.plan.json"
        if not plan.is_file():
            extra = ["--plan-fraction", str(args.plan_fraction)] if args.plan_fraction else []
            adalora("plan", *options, "--plan-mode", job["variant"].removeprefix("plan-"), "--out", str(plan),
                    "--overwrite", *extra)
        plan_seconds = json.loads(plan.read_text())["made_by"]["seconds"]
        method = ["--method", "lora", "--rank-plan", str(plan)]
    else:
        method = ["--method", job["variant"]]
    if not (out / "metrics.json").is_file():
        adalora("train", *options, *method, "--output-dir", str(out), "--overwrite")
    metrics = json.loads((out / "metrics.json").read_text())
    result = score(job["task"], metrics["eval"])
    print(f"{job['task']:6s} seed {job['seed']} {job['variant']:14s}: {result:.2f}", flush=True)
    return {"score": result, "plan_seconds": plan_seconds, "params": metrics["adapter_params"],
            "train_seconds": metrics["train_runtime_s"]}


def table(jobs: list[dict], results: list[dict], tasks: list[str], variants: list[str]) -> str:
    lines = ["| variant | " + " | ".join(tasks) + " | average | plan seconds | adapter parameters |",
             "|" + "---|" * (len(tasks) + 4)]
    for variant in variants:
        mine = [(j, r) for j, r in zip(jobs, results) if j["variant"] == variant]
        by_task = {t: statistics.mean(r["score"] for j, r in mine if j["task"] == t) for t in tasks}
        seconds = [r["plan_seconds"] for _, r in mine if r["plan_seconds"] is not None]
        params = sorted({r["params"] for _, r in mine})
        cells = [f"{by_task[t]:.2f}" for t in tasks] + [f"{statistics.mean(by_task.values()):.2f}",
                 f"{statistics.mean(seconds):.0f}" if seconds else "-",
                 f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,} - {params[-1]:,}"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "rte"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES)
    parser.add_argument("--plan-fraction", type=float, help="the pass's share of the run (default: the tool's)")
    parser.add_argument("--holdout", type=int, default=1000, help="training rows held out for scoring")
    parser.add_argument("--max-eval-samples", type=int, help="score only the first N held-out rows")
    add_run_options(parser, steps=600, work_dir=ROOT / "runs" / "plan_modes")
    args = parser.parse_args()
    args.eval_data = holdout_split(Path(args.data_dir), Path(args.work_dir), args.tasks, args.holdout)
    variants = [f"plan-{m}" for m in args.modes] + list(args.baselines)
    jobs = [{"task": t, "seed": s, "variant": v, "out": str(Path(args.work_dir) / f"{t}-{v}-s{s}")}
            for t in args.tasks for s in args.seeds for v in variants]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(lambda j: run_variant(j, args), jobs))
    print(f"\n{args.model}, {args.steps} steps of {args.batch_size}, budget {args.budget}, seeds {args.seeds}, "
          f"plan fraction {args.plan_fraction or 'default'}, scored on {args.holdout} held-out training rows\n")
    print(table(jobs, results, args.tasks, variants))


if __name__ == "__main__":
    main()
