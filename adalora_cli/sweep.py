"""`adalora sweep`: methods x budgets x seeds on one or more tasks, each cell one `adalora train` run.

Every cell is a run folder `OUT/<task>-<method>-<budget>-s<seed>/` trained by its own `python -m adalora_cli train`
process (the user's train options passed on, `--task --method --budget --seed --output-dir` set per cell), up to
`workers` at once, the CPU threads split between them. A cell already finished with the same settings is skipped;
an unfinished one with the same settings continues from its checkpoints (`--resume`); any other is trained again
(`--overwrite`). `plan+lora` is `adalora plan` (the same options, the plan in OUT/plans/) then `adalora train
--method lora --rank-plan`, timed together. A failed cell is reported (its log kept in OUT/logs/) and the others go
on. The results: OUT/sweep.json (every cell), OUT/sweep.md (per task: methods x budgets, mean +- sd over seeds and
the mean adapter parameters) and OUT/sweep.png (quality against adapter parameters, one line per method, one panel
per task: the shape of the AdaLoRA paper's budget figure).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adalora_cli import files
from adalora_cli.budget import format_count, parse_budget
from adalora_cli.errors import UserError

PLAN_LORA = "plan+lora"  # a rank plan from a short AdaLoRA pass, then plain LoRA with those ranks
RECORD = "sweep_cell.json"  # in a finished cell: the commands that made it and their seconds
KIND = "adalora-cli sweep"

# Runs `adalora ARGV`, appending its output to the log file, in the environment given; returns the exit code.
Runner = Callable[[list[str], Path, dict[str, str]], int]


@dataclass(frozen=True)
class Cell:
    task: str
    method: str  # a registered method, or PLAN_LORA
    budget: str  # as the user wrote it (0.3M): the folder name keeps it
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}-{self.budget}-s{self.seed}"


@dataclass
class Sweep:
    """What to run. `config`, `sets` and `options` are the user's `adalora train` settings (a YAML file, `--set`
    items, the generated options given), passed to every cell; `plan_arguments` go to `adalora plan` only."""

    tasks: list[str]
    methods: list[str]
    budgets: list[str]
    seeds: list[int]
    out: Path
    workers: int = 1
    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    plan_arguments: list[str] = field(default_factory=list)
    rerun: bool = False  # train every cell again, finished or not

    def cells(self) -> list[Cell]:
        """Seed by seed, so that an interrupted sweep has every task, method and budget of its first seeds."""
        return [Cell(t, m, b, s) for s in self.seeds for t in self.tasks for m in self.methods for b in self.budgets]

    def folder(self, cell: Cell) -> Path:
        return self.out / cell.name

    def plan_file(self, cell: Cell) -> Path:
        """Outside the run folder: `adalora train --overwrite` empties that folder before it reads the plan."""
        return self.out / "plans" / f"{cell.name}.json"

    def log(self, cell: Cell) -> Path:
        return self.out / "logs" / f"{cell.name}.log"


# -- checking the inputs (before any run) -----------------------------------------------------------------

def check(sweep: Sweep) -> dict[Cell, dict[str, Any]]:
    """Refuse, in one line, a sweep that cannot run (no task, an unknown method, a budget that is no parameter count,
    a bad train option); returns each cell's settings as its config.yaml will record them (None: resolved by the
    run)."""
    from adalora_cli.methods import available_methods

    for name, values in (("--tasks", sweep.tasks), ("--methods", sweep.methods), ("--budgets", sweep.budgets),
                         ("--seeds", sweep.seeds)):
        if not values:
            raise UserError(f"no {name[2:]} given; pass {name} with at least one value")
        if len(set(values)) != len(values):
            raise UserError(f"{name} names {_first_repeat(values)} twice; give each value once")
    known = available_methods() + [PLAN_LORA]
    for method in sweep.methods:
        if method not in known:
            raise UserError(f"unknown method {method!r} in --methods; choose from: {', '.join(known)}")
    for budget in sweep.budgets:
        parse_budget(budget)
    if sweep.workers < 1:
        raise UserError(f"--workers must be at least 1, got {sweep.workers}")
    wanted: dict[Cell, dict[str, Any]] = {}
    for cell in sweep.cells():
        wanted[cell] = settings_of(sweep, cell)
    return wanted


def _first_repeat(values: list) -> str:
    seen = set()
    for value in values:
        if value in seen:
            return str(value)
        seen.add(value)
    return ""


def settings_of(sweep: Sweep, cell: Cell) -> dict[str, Any]:
    """The cell's settings as its config.yaml will record them, validated (a UserError names a bad option)."""
    from adalora_cli.config import make_config

    given = {**sweep.options, "task": cell.task, "method": _trained_method(cell), "budget": cell.budget,
             "seed": cell.seed, "output_dir": str(sweep.folder(cell))}
    cfg = make_config(sweep.config, sweep.sets, given)
    cfg.validate()
    settings = cfg.to_dict()
    if cell.method == PLAN_LORA:
        settings["rank_plan"] = str(sweep.plan_file(cell))
    return settings


def _trained_method(cell: Cell) -> str:
    return "lora" if cell.method == PLAN_LORA else cell.method


# -- the commands of a cell -------------------------------------------------------------------------------

def user_arguments(sweep: Sweep) -> list[str]:
    """The user's train settings as arguments (for `adalora train` and `adalora plan` alike)."""
    from adalora_cli.options import as_arguments

    arguments = ["--config", str(sweep.config)] if sweep.config is not None else []
    for item in sweep.sets:
        arguments += ["--set", item]
    return arguments + as_arguments(sweep.options)


def cell_arguments(sweep: Sweep, cell: Cell) -> list[str]:
    """What every command of the cell is given: the user's settings, then the cell's own."""
    return user_arguments(sweep) + ["--task", cell.task, "--budget", cell.budget, "--seed", str(cell.seed)]


def commands(sweep: Sweep, cell: Cell, how: str) -> list[list[str]]:
    """The `adalora` commands that train the cell, in order; `how` is --overwrite or --resume (a resumed plan+lora
    cell keeps its plan)."""
    shared = cell_arguments(sweep, cell)
    train = ["train", *shared, "--method", _trained_method(cell), "--output-dir", str(sweep.folder(cell))]
    if cell.method != PLAN_LORA:
        return [train + [how]]
    plan_file = sweep.plan_file(cell)
    train += ["--rank-plan", str(plan_file), how]
    if how == "--resume" and plan_file.is_file():
        return [train]
    return [["plan", *shared, *sweep.plan_arguments, "--out", str(plan_file), "--overwrite"], train]


def identity(sweep: Sweep, cell: Cell) -> list[list[str]]:
    """The commands as recorded in a finished cell: what a later sweep compares its own with."""
    return commands(sweep, cell, "--overwrite")


# -- the state of a cell ----------------------------------------------------------------------------------

def cell_state(sweep: Sweep, cell: Cell, wanted: dict[str, Any]) -> tuple[str, str]:
    """(what to do, why): ("skip", ...) for a cell finished with these settings, ("--resume", ...) for an unfinished
    one with these settings and a checkpoint, ("--overwrite", ...) for anything else."""
    folder = sweep.folder(cell)
    if not folder.is_dir() or not any(folder.iterdir()):
        return "--overwrite", "new"
    saved = _saved_settings(folder)
    same = saved is not None and same_settings(wanted, saved)
    if sweep.rerun:
        return "--overwrite", "--rerun"
    if not same:
        return "--overwrite", "settings changed" if saved is not None else "no config.yaml"
    if (folder / "metrics.json").is_file():
        record = _read_record(folder)
        if record is None:
            return "--overwrite", f"finished, but not by a sweep (no {RECORD})"
        if record.get("commands") == identity(sweep, cell):
            return "skip", "finished"
        return "--overwrite", "options changed"
    if any((folder / "checkpoints").glob("checkpoint-*")):
        return "--resume", "unfinished"
    return "--overwrite", "unfinished, no checkpoint"


def _saved_settings(folder: Path) -> dict[str, Any] | None:
    from adalora_cli.config import read_yaml

    path = folder / "config.yaml"
    if not path.is_file():
        return None
    try:
        return read_yaml(path)
    except UserError:
        return None


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        return files.read_json(folder / RECORD)
    except UserError:
        return None


def same_settings(wanted: Any, saved: Any) -> bool:
    """Whether a run saved with `saved` (its config.yaml) is the run `wanted` describes: every wanted value equal,
    where None means "resolved by the run" (the method's learning rate, the checkpoint interval, columns read off the
    data) and two texts naming the same file or folder are equal."""
    if wanted is None:
        return True
    if isinstance(wanted, dict):
        return isinstance(saved, dict) and all(same_settings(v, saved.get(k)) for k, v in wanted.items())
    if isinstance(wanted, str) and isinstance(saved, str) and wanted != saved:
        return _same_path(wanted, saved)
    if isinstance(wanted, bool) or isinstance(saved, bool):  # a bool is no number here
        return wanted is saved
    if isinstance(wanted, (int, float)) and isinstance(saved, (int, float)):  # 3 and 3.0
        return float(wanted) == float(saved)
    return wanted == saved


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# -- running ------------------------------------------------------------------------------------------------

def run_adalora(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """`python -m adalora_cli ARGV` in a process of its own, its output appended to `log`."""
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ adalora {' '.join(argv)}\n")
        out.flush()
        return subprocess.run([sys.executable, "-m", "adalora_cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env).returncode


def worker_environment(workers: int) -> dict[str, str]:
    """The environment of each cell's processes: the machine's cores split between the workers (on a GPU they share
    the device)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cores // workers))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}


def run_cell(sweep: Sweep, cell: Cell, how: str, runner: Runner, env: dict[str, str]) -> dict[str, Any]:
    """Train one cell; its result (status "finished" or "failed")."""
    log = sweep.log(cell)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    if cell.method == PLAN_LORA:
        sweep.plan_file(cell).parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for argv in commands(sweep, cell, how):
        code = runner(argv, log, env)
        if code != 0:
            return {**_describe(sweep, cell), "status": "failed", "exit_code": code,
                    "seconds": round(time.monotonic() - started, 1), "error": _error_line(log)}
    seconds = round(time.monotonic() - started, 1)
    try:
        result = _finished(sweep, cell, seconds, "trained" if how == "--overwrite" else "resumed")
    except (UserError, KeyError) as exc:  # exit 0 but no usable metrics.json: a failed cell all the same
        return {**_describe(sweep, cell), "status": "failed", "exit_code": 0, "seconds": seconds,
                "error": f"no score in {sweep.folder(cell) / 'metrics.json'} ({exc})"}
    files.write_json(sweep.folder(cell) / RECORD, {"commands": identity(sweep, cell), "seconds": seconds})
    return result


def _finished(sweep: Sweep, cell: Cell, seconds: float, ran: str) -> dict[str, Any]:
    from adalora_cli.tasks import get_task

    metrics = files.read_json(sweep.folder(cell) / "metrics.json")
    scores = metrics.get("eval", {})
    return {**_describe(sweep, cell), "status": "finished", "ran": ran, "params": metrics.get("adapter_params"),
            "score": round(get_task(cell.task).headline(scores), 4), "metrics": scores, "seconds": seconds,
            "model": metrics.get("model")}


def _describe(sweep: Sweep, cell: Cell) -> dict[str, Any]:
    return {"task": cell.task, "method": cell.method, "budget": cell.budget, "budget_params": parse_budget(cell.budget),
            "seed": cell.seed, "folder": str(sweep.folder(cell)), "log": str(sweep.log(cell))}


def _error_line(log: Path) -> str:
    """The `adalora: error:` line of a failed command's log, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("adalora: error:")]
    return (errors or lines or [""])[-1]


def run_sweep(sweep: Sweep, runner: Runner | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Check the inputs, run every cell that is not finished yet (through `runner`, default `run_adalora`), write
    sweep.json / sweep.md / sweep.png; the cells' results in cell order."""
    runner = runner or run_adalora
    sweep.out = Path(sweep.out).resolve()
    wanted = check(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    results: dict[Cell, dict[str, Any]] = {}
    todo: list[tuple[Cell, str]] = []
    for cell in sweep.cells():
        how, why = cell_state(sweep, cell, wanted[cell])
        if how == "skip":
            record = _read_record(sweep.folder(cell)) or {}
            results[cell] = _finished(sweep, cell, record.get("seconds", 0.0), "skipped")
        else:
            todo.append((cell, how))
            if why != "new":
                echo(f"{cell.name}: {why}, training with {how}")
    if results:
        echo(f"{len(results)} of {len(wanted)} cells finished before: skipped")
    env = worker_environment(sweep.workers)
    with ThreadPoolExecutor(max_workers=sweep.workers) as pool:
        running = {pool.submit(run_cell, sweep, cell, how, runner, env): cell for cell, how in todo}
        left = len(running)
        for done in as_completed(running):
            cell, left = running[done], left - 1
            results[cell] = done.result()
            echo(progress_line(results[cell], left))
            write_json_results(sweep, [results[c] for c in sweep.cells() if c in results])
    ordered = [results[cell] for cell in sweep.cells()]
    write_outputs(sweep, ordered)
    return ordered


def progress_line(result: dict[str, Any], left: int) -> str:
    name = Cell(result["task"], result["method"], result["budget"], result["seed"]).name
    if result["status"] == "failed":
        text = f"FAILED (exit {result['exit_code']}, {result['seconds']:.0f} s): {result['error']} [log {result['log']}]"
    else:
        text = f"{result['score']:.2f} ({result['params']:,} params, {result['seconds']:.0f} s, {result['ran']})"
    return f"{name}: {text}; {left} left"


# -- the results ----------------------------------------------------------------------------------------------

def write_json_results(sweep: Sweep, results: list[dict]) -> Path:
    path = sweep.out / "sweep.json"
    files.write_json(path, {"kind": KIND, "tasks": sweep.tasks, "methods": sweep.methods, "budgets": sweep.budgets,
                            "seeds": sweep.seeds, "cells": results})
    return path


def write_outputs(sweep: Sweep, results: list[dict]) -> list[Path]:
    json_path = write_json_results(sweep, results)
    md = sweep.out / "sweep.md"
    files.atomic_write_text(md, markdown(results, sweep.tasks, sweep.methods, sweep.budgets))
    return [json_path, md, plot(results, sweep.tasks, sweep.methods, sweep.budgets, sweep.out / "sweep.png")]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[dict], task: str, method: str, budget: str) -> dict[str, Any] | None:
    """Mean and sd of the score over the finished seeds of one (task, method, budget), their mean adapter
    parameters, and how many seeds failed; None when there is no such cell."""
    cells = [r for r in results if (r["task"], r["method"], r["budget"]) == (task, method, budget)]
    if not cells:
        return None
    done = [r for r in cells if r["status"] == "finished"]
    summary: dict[str, Any] = {"failed": len(cells) - len(done), "cells": len(cells)}
    if done:
        summary["score"], summary["sd"] = _mean_sd([r["score"] for r in done])
        summary["params"] = statistics.mean(r["params"] for r in done)
        summary["scores"] = [r["score"] for r in done]
        summary["all_params"] = [r["params"] for r in done]
    return summary


def markdown(results: list[dict], tasks: list[str], methods: list[str], budgets: list[str]) -> str:
    """Per task, methods as rows and budgets as columns: mean +- sd over seeds, and the mean adapter parameters."""
    from adalora_cli.tasks import get_task

    seeds = sorted({r["seed"] for r in results})
    models = sorted({r.get("model") for r in results if r.get("model")})
    failed = [r for r in results if r["status"] == "failed"]
    lines = ["# Sweep: quality against adapter parameters", "",
             f"{len(results)} runs ({len(failed)} failed), seeds {', '.join(map(str, seeds))}"
             + (f", model {', '.join(models)}" if models else "") + ". Each cell: the task's score (with several "
             "seeds: mean +- standard deviation over them), and in brackets the mean adapter parameters. Picture: "
             "`sweep.png`; every run: `sweep.json`.", ""]
    for task in tasks:
        lines += [f"## {task}: {get_task(task).headline_name}", "",
                  "| method | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        for method in methods:
            cells = [_markdown_cell(summarise(results, task, method, budget)) for budget in budgets]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {Cell(r['task'], r['method'], r['budget'], r['seed']).name}: {r['error']} (log `{r['log']}`)"
                  for r in failed]
        lines.append("")
    return "\n".join(lines)


def _markdown_cell(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return ""
    if "score" not in summary:
        return "failed"
    spread = f" +- {summary['sd']:.1f}" if len(summary["scores"]) > 1 else ""  # one seed has no spread to show
    text = f"{summary['score']:.1f}{spread} ({format_count(round(summary['params']))})"
    if summary["failed"]:
        text += f", {summary['failed']} of {summary['cells']} failed"
    return text


def plot(results: list[dict], tasks: list[str], methods: list[str], budgets: list[str], path: Path) -> Path:
    """One panel per task: score against adapter parameters (log scale), one line per method through the mean over
    seeds at each budget, error bars of one standard deviation and every seed's run as a faint dot."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless (Agg)
    from matplotlib.ticker import FuncFormatter, NullLocator

    from adalora_cli.tasks import get_task

    fig = Figure(figsize=(5.2 * len(tasks), 3.9), dpi=130, layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for i, method in enumerate(methods):
            color = f"C{i}"
            points = [s for s in (summarise(results, task, method, b) for b in budgets) if s and "score" in s]
            if not points:
                continue
            points.sort(key=lambda s: s["params"])
            ax.errorbar([s["params"] for s in points], [s["score"] for s in points], yerr=[s["sd"] for s in points],
                        marker="o", capsize=3, color=color, label=method)
            ax.scatter([p for s in points for p in s["all_params"]], [v for s in points for v in s["scores"]],
                       s=10, alpha=0.35, color=color, linewidths=0)
        ax.set_xscale("log")
        ax.set_xticks(sorted({parse_budget(b) for b in budgets}))  # ticks at the budgets: the runs sit at or below
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_count(int(round(x)))))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("adapter parameters (ticks: the budgets)")
        ax.set_ylabel(get_task(task).headline_name)
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8, frameon=False)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
