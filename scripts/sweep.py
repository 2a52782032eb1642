"""Grid search over `--set` values with `adalora train`, in parallel: how the method defaults were chosen.

    python scripts/sweep.py --method prilora --tasks sst2 mrpc --seeds 0 1 \\
        --grid prilora.prune_ratio=0.1,0.25,0.5 --grid prilora.prune_interval=10,50 --workers 4

Every grid point (the product of the `--grid` value lists) is one `adalora sweep` (adalora_cli/sweep.py: the same
cell runner, parallel workers, finished runs skipped) of the method on every task and seed, its `--set` items added;
the table gives the mean task score (`Task.headline`: GLUE metrics x 100) per point, task and on average.
Scores come from a held-out slice of each task's *training* file (`--holdout` rows, drawn with a fixed
seed), never from the GLUE dev sets, so that choosing defaults does not tune on the numbers we report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import add_run_options, score  # noqa: E402

from adalora_cli.sweep import Sweep, run_sweep  # noqa: E402
from adalora_cli.tasks.glue import SPECS  # noqa: E402


def holdout_split(data_dir: Path, work_dir: Path, tasks: list[str], rows: int) -> Path:
    """A GLUE-layout folder whose dev.tsv is `rows` random training rows and whose train.tsv is the rest."""
    target = work_dir / f"holdout{rows}"
    for spec in SPECS:
        if spec.name not in tasks:
            continue
        lines = (data_dir / spec.folder / "train.tsv").read_text(encoding="utf-8-sig").splitlines(keepends=True)
        header, body = (lines[:1], lines[1:]) if spec.has_header else ([], lines)
        order = list(range(len(body)))
        random.Random(0).shuffle(order)
        held = set(order[:rows])
        folder = target / spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.tsv").write_text("".join(header + [r for i, r in enumerate(body) if i not in held]))
        (folder / "dev.tsv").write_text("".join(header + [body[i] for i in sorted(held)]))
    return target


def grid_points(grids: list[str]) -> list[dict[str, str]]:
    keys, values = [], []
    for item in grids:
        key, _, listed = item.partition("=")
        keys.append(key)
        values.append(listed.split(","))
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)] if keys else [{}]


def train_point(point: dict[str, str], tag: str, args) -> list[dict]:
    """Every task and seed at one grid point: one sweep, in WORK_DIR/<method>/<tag>/; the cells' results."""
    options = {"model": args.model, "data_dir": str(args.eval_data), "max_steps": args.steps,
               "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
               "max_train_samples": args.steps * args.batch_size}  # one pass; no tokenising unused rows
    sets = [f"save_steps={10 * args.steps}"] + [f"{key}={value}" for key, value in point.items()]
    sweep = Sweep(args.tasks, [args.method], [args.budget], args.seeds, Path(args.work_dir) / args.method / tag,
                  args.workers, options=options, sets=sets)
    cells = run_sweep(sweep, echo=lambda line: print(f"{tag}: {line}", flush=True))
    failed = [c for c in cells if c["status"] == "failed"]
    if failed:
        sys.exit(f"{len(failed)} run(s) failed: " + "; ".join(f"{c['folder']}: {c['error']}" for c in failed))
    results = []
    for cell in cells:
        metrics = {"task": cell["task"], "seed": cell["seed"], "eval": cell["metrics"], "folder": cell["folder"],
                   "adapter_params": cell["params"]}
        if args.rank_sweep:  # score an any-rank adapter by its mean over ranks 1..r_max (every rank printed)
            out = Path(cell["folder"])
            if not (out / "eval_ranks.json").is_file():
                subprocess.run([sys.executable, "-m", "adalora_cli", "eval", str(out), "--rank-sweep"], check=True,
                               capture_output=True, text=True, cwd=ROOT)
            metrics["by_rank"] = {r: score(cell["task"], m)
                                  for r, m in json.loads((out / "eval_ranks.json").read_text()).items()}
            print(f"{cell['task']:6s} seed {cell['seed']} {point}: ranks " +
                  " ".join(f"{r}:{v:.1f}" for r, v in metrics["by_rank"].items()), flush=True)
        results.append(metrics)
    return results


def run_score(metrics: dict) -> float:
    """A run's task score; for a rank sweep, the mean over its ranks."""
    return statistics.mean(metrics["by_rank"].values()) if "by_rank" in metrics else \
        score(metrics["task"], metrics["eval"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable)")
    parser.add_argument("--tasks", nargs="+", default=["sst2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    add_run_options(parser, steps=300, work_dir=ROOT / "runs" / "sweep")
    parser.add_argument("--holdout", type=int, default=1000, help="training rows held out for scoring (0: dev set)")
    parser.add_argument("--out", help="write every run's metrics here (JSON)")
    parser.add_argument("--rank-sweep", action="store_true",
                        help="any-rank methods (dylora): score each run by its mean over ranks 1..r_max")
    args = parser.parse_args()
    args.eval_data = Path(args.data_dir)
    if args.holdout:
        args.eval_data = holdout_split(Path(args.data_dir), Path(args.work_dir), args.tasks, args.holdout)
    points = grid_points(args.grid)
    jobs, results = [], []
    for i, point in enumerate(points):  # point by point, each a sweep with --workers runs at once
        tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()) or "default"
        for metrics in train_point(point, tag, args):
            jobs.append({"point": point, "index": i, "task": metrics["task"], "seed": metrics["seed"]})
            results.append(metrics)
    scored_on = f"{args.holdout} held-out training rows" if args.holdout else "the dev sets"
    print(f"{args.method}, {args.steps} steps, budget {args.budget}, seeds {args.seeds}, scored on {scored_on}")
    print("point".ljust(40) + "".join(f"{t:>9s}" for t in args.tasks) + "  average")
    for i, point in enumerate(points):
        by_task = {t: statistics.mean(run_score(r) for j, r in zip(jobs, results)
                                      if j["index"] == i and j["task"] == t) for t in args.tasks}
        label = " ".join(f"{k}={v}" for k, v in point.items()) or "defaults"
        print(label.ljust(40) + "".join(f"{by_task[t]:9.2f}" for t in args.tasks) +
              f"  {statistics.mean(by_task.values()):7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps([{**j, **r} for j, r in zip(jobs, results)], indent=1))


if __name__ == "__main__":
    main()
