"""Quality at equal budget on real GLUE data: our methods and peft's AdaLoRA, same data, steps and seeds.

    python scripts/bench_quality.py                            # writes docs/BENCHMARKS.md
    python scripts/bench_quality.py --workers 4 --device cuda  # parallel runs on one GPU
    python scripts/bench_quality.py --tiny                     # smoke run (tests)

Every (task, method, seed) is one training run in its own process: ours are the cells of one `adalora sweep`
(adalora_cli/sweep.py: parallel workers, finished runs skipped, WORK_DIR/sweep.json, .md and .png), peft's
AdaLoRA runs through the Hugging Face Trainer with `update_and_allocate` called after every optimizer step (the
way peft documents it), on the same tokenised data, with the same budget, schedule fractions, learning
rate, alpha and regulariser weight as ours. A task's score is its headline (`Task.headline`: for GLUE the mean of
its GLUE metrics, MRPC accuracy and F1, STS-B Pearson and Spearman, CoLA Matthews correlation, others accuracy,
times 100).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["sst2", "mrpc", "stsb", "rte", "cola"]
METHODS = ["lora", "adalora", "plan+lora", "eva", "prilora", "dylora", "peft-adalora"]
NOTES = "\n## Notes"  # where the generated part of BENCHMARKS.md ends and the hand-written notes begin


def score(task: str, metrics: dict[str, float]) -> float:
    from adalora_cli.tasks import get_task

    return get_task(task).headline(metrics)


def run_ours(args) -> list[dict]:
    """Our methods: one `adalora sweep` over tasks x methods x seeds at the one budget; its finished cells as runs."""
    from adalora_cli.sweep import Sweep, run_sweep

    ours = [m for m in args.methods if m != "peft-adalora"]
    if not ours:
        return []
    options = {"model": args.model, "data_dir": args.data_dir, "max_steps": args.steps, "batch_size": args.batch_size,
               "max_seq_length": args.max_seq_length, "max_train_samples": args.max_train_samples,
               "max_eval_samples": args.max_eval_samples}
    sweep = Sweep(args.tasks, ours, [args.budget], args.seeds, Path(args.work_dir), args.workers, options=options,
                  sets=[f"logging_steps={max(1, args.steps // 5)}", f"save_steps={10 * args.steps}"], rerun=args.rerun)
    cells = run_sweep(sweep, echo=lambda line: print(line, flush=True))
    args.failed += [c for c in cells if c["status"] == "failed"]
    return [{"task": c["task"], "method": c["method"], "seed": c["seed"], "model": c["model"],
             "budget": c["budget_params"], "adapter_params": c["params"], "train_runtime_s": c["seconds"],
             "eval": c["metrics"]} for c in cells if c["status"] == "finished"]


def run_peft_adalora(job: dict, args) -> dict:
    """peft's AdaLoRA at the budget our AdaLoRA gets: same initial rank, final average rank, schedule."""
    import peft
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, set_seed

    from adalora_cli import models
    from adalora_cli.budget import parse_budget
    from adalora_cli.config import RunConfig
    from adalora_cli.inject import find_targets
    from adalora_cli.methods import get_method
    from adalora_cli.methods.adalora import AdaLoraConfig, resolve_schedule
    from adalora_cli.evaluation import evaluate
    from adalora_cli.rundata import features_for, max_length, read_data
    from adalora_cli.pipeline import training_arguments
    from adalora_cli.tasks import get_task

    budget = parse_budget(args.budget)
    cfg = RunConfig(task=job["task"], method="adalora", model=args.model, budget=budget, data_dir=args.data_dir,
                    output_dir=job["out"], seed=job["seed"], max_steps=args.steps, batch_size=args.batch_size,
                    max_seq_length=args.max_seq_length, logging_steps=max(1, args.steps // 5),
                    save_steps=10 * args.steps, max_train_samples=args.max_train_samples,
                    max_eval_samples=args.max_eval_samples)
    ours_cfg = AdaLoraConfig()
    method = get_method("adalora")
    task = get_task(job["task"])
    hf_config = models.load_config(cfg.model, task.num_labels, **task.config_overrides())
    targets = find_targets(models.skeleton(hf_config, task.auto_model), hf_config.model_type)
    plan = method.plan(targets, budget, ours_cfg)
    schedule = resolve_schedule(ours_cfg, args.steps)
    target_r = max(1, round(plan.notes["target_avg_rank"]))
    peft_config = peft.AdaLoraConfig(
        task_type="SEQ_CLS", target_modules=[t.name for t in targets], init_r=plan.notes["init_r"],
        target_r=target_r, tinit=schedule.t_init, tfinal=schedule.t_final, deltaT=schedule.delta_t,
        beta1=ours_cfg.beta1, beta2=ours_cfg.beta2, orth_reg_weight=ours_cfg.orth_reg,
        lora_alpha=int(ours_cfg.alpha), total_step=args.steps)
    tokenizer = models.load_tokenizer(cfg.model)
    task, train_raw, evals = read_data(cfg)
    features, _ = features_for(task, train_raw, tokenizer, max_length(cfg, task, tokenizer), True, "training data")
    set_seed(cfg.seed)
    model, _ = models.load_model(cfg.model, hf_config, task.auto_model)
    model = peft.get_peft_model(model, peft_config)

    class Allocate(TrainerCallback):
        def on_optimizer_step(self, args_, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    precision = cfg.compute_precision()
    arguments = training_arguments(cfg, Path(job["out"]) / "checkpoints", method.default_lr, precision, adapter=True)
    trainer = Trainer(model=model, args=arguments,
                      train_dataset=features, data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer, callbacks=[Allocate()])
    started = time.time()
    with precision.applied():  # TF32 as in our runs' training
        trainer.train()
    kept = 0
    for module in model.modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            rank = int(torch.count_nonzero(module.lora_E["default"]))
            kept += rank * (module.in_features + module.out_features + 1)
    metrics = {"task": task.name, "method": "peft-adalora", "model": cfg.model, "budget": budget,
               "adapter_params": kept, "steps": trainer.state.global_step,
               "train_runtime_s": round(time.time() - started, 2), "eval": evaluate(model, tokenizer, task, evals, cfg, precision)}
    Path(job["out"], "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run_peft_job(job: dict, args) -> dict:
    """A peft-AdaLoRA run in a process of its own (skipped when its metrics.json is there, unless --rerun)."""
    out = Path(job["out"])
    if not (out / "metrics.json").is_file() or args.rerun:
        command = [sys.executable, __file__, "--peft-job", json.dumps(job), *args.passthrough]
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return {"seed": job["seed"], **json.loads((out / "metrics.json").read_text())}


def write_report(results: dict, args) -> str:
    runs = list(results.values())
    commands = sorted({run["command"] for run in runs})
    machines = sorted({run["machine"] for run in runs})
    minutes = sum(run["train_runtime_s"] for run in runs) / 60
    lines = [
        "# Benchmarks: quality at equal budget",
        "",
        f"Measured {date.today().isoformat()} on {', '.join(machines)}, {len(runs)} training runs "
        f"({minutes:.0f} minutes of training in all), by:",
        "",
        *[f"    {command}" for command in commands],
        "",
        f"Model `{args.model}`, budget {args.budget} adapter parameters, {args.steps} optimizer steps of batch "
        f"{args.batch_size}, max length {args.max_seq_length}, seeds {', '.join(map(str, args.seeds))}; each "
        "method at its default learning rate and settings ([methods](methods.md)). Each run trains on the first "
        "steps x batch rows of the task's GLUE train file and is scored on the full GLUE dev set (mean of the task's "
        "GLUE metrics x 100; mean +- standard deviation over seeds).",
        "",
        "| method | " + " | ".join(args.tasks) + " | average | adapter params |",
        "|---|" + "---|" * (len(args.tasks) + 2),
    ]
    complete = [s for s in args.seeds if all((t, m, s) in results for t in args.tasks for m in args.methods)]
    if complete != list(args.seeds):  # an interrupted benchmark: say so above the table
        note = f"Only seeds {complete} finished for every task and method; the table uses those."
        lines[-2:-2] = [note, ""]
    for method in args.methods:
        cells, per_seed_average, params = [], [], set()
        for task in args.tasks:
            scores = [score(task, results[(task, method, s)]["eval"]) for s in complete]
            params.update(results[(task, method, s)]["adapter_params"] for s in complete)
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{statistics.mean(scores):.1f} +- {spread:.1f}")
        for s in complete:
            per_seed_average.append(statistics.mean(score(t, results[(t, method, s)]["eval"]) for t in args.tasks))
        spread = statistics.stdev(per_seed_average) if len(per_seed_average) > 1 else 0.0
        span = f"{min(params):,}" if len(params) == 1 else f"{min(params):,} - {max(params):,}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.mean(per_seed_average):.1f} +- "
                     f"{spread:.1f} | {span} |")
    lines += ["", "Raw metrics of every run: `runs.json` next to this file.", ""]
    return "\n".join(lines)


def machine(args) -> str:
    if args.device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def add_run_options(parser: argparse.ArgumentParser, steps: int, work_dir: Path) -> None:
    """The options every benchmark run shares (also used by sweep.py)."""
    parser.add_argument("--budget", default="0.3M")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    parser.add_argument("--work-dir", default=str(work_dir))
    parser.add_argument("--workers", type=int, default=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_run_options(parser, steps=600, work_dir=ROOT / "runs" / "bench_quality")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--max-train-samples", type=int, help="first N training rows only (default steps x batch)")
    parser.add_argument("--max-eval-samples", type=int, help="first N dev rows only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rerun", action="store_true", help="retrain runs that already have metrics.json")
    parser.add_argument("--tiny", action="store_true", help="one task, one seed, a few steps (smoke test)")
    parser.add_argument("--from-runs", nargs="+", help="write the report from runs.json files instead of training")
    parser.add_argument("--peft-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = sys.argv[1:]
    if args.tiny:
        args.tasks, args.seeds, args.steps, args.max_seq_length = args.tasks[:1], args.seeds[:1], 4, 32
        args.max_train_samples, args.max_eval_samples = 256, 128
    if args.max_train_samples is None:  # a run sees at most steps x batch rows: tokenise no more than that
        args.max_train_samples = args.steps * args.batch_size
    if args.peft_job:
        run_peft_adalora(json.loads(args.peft_job), args)
        return
    results = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args.failed = []
    if args.from_runs:
        runs = [run for path in args.from_runs for run in json.loads(Path(path).read_text())]
    else:
        runs = run_ours(args)  # our methods: the cells of one sweep (folders WORK_DIR/<task>-<method>-<budget>-s<seed>)
        jobs = [{"task": t, "method": "peft-adalora", "seed": s,
                 "out": str(Path(args.work_dir) / f"{t}-peft-adalora-{args.budget}-s{s}")}
                for s in args.seeds for t in args.tasks if "peft-adalora" in args.methods]
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for job, metrics in zip(jobs, pool.map(lambda j: run_peft_job(j, args), jobs)):
                print(f"{job['task']:6s} peft-adalora seed {job['seed']}: {score(job['task'], metrics['eval']):.1f} "
                      f"({metrics['adapter_params']:,} params)", flush=True)
                runs.append(metrics)
        stamp = {"command": "python scripts/bench_quality.py " + " ".join(args.passthrough), "machine": machine(args)}
        runs = [{**run, **stamp} for run in runs]
    for run in runs:
        results[(run["task"], run["method"], run["seed"])] = run
    save_runs(results, out)
    report = write_report(results, args)
    old = out.read_text() if out.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""  # hand-written analysis below the table survives
    out.write_text(report + ("\n" + notes if notes else ""))
    print(report)
    if args.failed:
        sys.exit(f"{len(args.failed)} run(s) failed: " + "; ".join(f"{c['folder']}: {c['error']}" for c in args.failed))


def save_runs(results: dict, out: Path) -> None:
    rows = [{**v, "task": k[0], "method": k[1], "seed": k[2]} for k, v in results.items()]
    (out.parent / "runs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
