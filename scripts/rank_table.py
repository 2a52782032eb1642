"""DyLoRA rank by rank against LoRA truncated to the same rank: the shape of Table 2 of the DyLoRA paper.

    python scripts/rank_table.py --work-dir runs/bench_quality --tasks sst2 mrpc stsb rte cola --seeds 0 1 2

Reads the `dylora` and `lora` runs that `scripts/bench_quality.py` (or `adalora sweep`) trained
(`WORK_DIR/<task>-<method>-<budget>-s<seed>`) and,
for every rank b from 1 to r_max, scores (GLUE metrics x 100, as bench_quality.py does) on the GLUE dev sets:
- DyLoRA evaluated at rank b (`adalora eval --rank-sweep`, cached in each run's eval_ranks.json);
- the LoRA adapter cut to its first b components with the scale it was trained with (alpha / r_max): what one
  gets from a plain LoRA run without DyLoRA's rescaling;
- the same cut rescaled to alpha / b, DyLoRA's rule.
Each cell is the mean over tasks (and seeds); the per-task numbers go to the JSON file given by `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import score  # noqa: E402
from truncated_lora_eval import truncate  # noqa: E402


def dylora_by_rank(run: Path, task: str) -> dict[int, float]:
    if not (run / "eval_ranks.json").is_file():
        subprocess.run([sys.executable, "-m", "adalora_cli", "eval", str(run), "--rank-sweep"], check=True,
                       capture_output=True, text=True, cwd=ROOT)
    return {int(b): score(task, m) for b, m in json.loads((run / "eval_ranks.json").read_text()).items()}


def lora_by_rank(run: Path, task: str, ranks: list[int], rescale: bool) -> dict[int, float]:
    from adalora_cli import rundir
    from adalora_cli.evaluation import evaluate
    from adalora_cli.rundata import quiet_datasets, read_data

    quiet_datasets()
    cache = run / f"truncated_{'rescaled' if rescale else 'trained_scale'}.json"
    found = json.loads(cache.read_text()) if cache.is_file() else {}
    for rank in ranks:
        if str(rank) in found:
            continue
        cfg, _, model, tokenizer, layers, _ = rundir.load_run(run)
        truncate(layers, rank, cfg.method_config().alpha if rescale else None)
        task, _, evals = read_data(cfg, training=False)
        found[str(rank)] = evaluate(model, tokenizer, task, evals, cfg, cfg.compute_precision())
        cache.write_text(json.dumps(found, indent=1))
    return {int(b): score(task, m) for b, m in found.items() if int(b) in ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_quality"))
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb", "rte", "cola"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget", default="0.3M", help="the budget the runs were trained at, as written")
    parser.add_argument("--json", help="write every run's per-rank scores here")
    args = parser.parse_args()
    work = Path(args.work_dir)
    rows = {"dylora": {}, "lora, trained scale": {}, "lora, rescaled to alpha/b": {}}
    for task in args.tasks:
        for seed in args.seeds:
            dylora = dylora_by_rank(work / f"{task}-dylora-{args.budget}-s{seed}", task)
            ranks = sorted(dylora)
            lora = work / f"{task}-lora-{args.budget}-s{seed}"
            for name, scores in (("dylora", dylora), ("lora, trained scale", lora_by_rank(lora, task, ranks, False)),
                                 ("lora, rescaled to alpha/b", lora_by_rank(lora, task, ranks, True))):
                rows[name][f"{task}-{seed}"] = scores
                print(f"{task} seed {seed} {name}: " + " ".join(f"{b}:{v:.1f}" for b, v in scores.items()), flush=True)
    ranks = sorted({b for runs in rows.values() for scores in runs.values() for b in scores})
    print(f"\nmean over {', '.join(args.tasks)} (seeds {', '.join(map(str, args.seeds))}), GLUE metrics x 100\n")
    print("| rank | " + " | ".join(map(str, ranks)) + " |")
    print("|---|" + "---|" * len(ranks))
    for name, runs in rows.items():
        cells = [statistics.mean(scores[b] for scores in runs.values()) for b in ranks]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
