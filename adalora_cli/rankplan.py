"""Rank plans: a short AdaLoRA pass decides each adapted matrix's rank under the budget, and plain LoRA trains
with those ranks (`adalora plan ... --out PLAN.json`, then `adalora train --method lora --rank-plan PLAN.json`).

The plan file is JSON (`kind`, `version`, `model`, `model_type`, `budget`, `params`: its cost as plain LoRA,
`targets`: every target matrix with `name`, `d_in`, `d_out`, `layer`, `kind`, `rank`, and `made_by`: how the pass
ran); PLAN.png beside it is the heat map of `adalora inspect`. A finished run folder serves as a plan too (its
adapter_config.json records every target's shape and kept rank).

Two ways to make a plan (`--plan-mode`), both on AdaLoRA's importance scores:
- `schedule`: AdaLoRA's cubic schedule compressed into the pass: its warm-up and decay (the configured t_init /
  delta_t as shares of the full run) fill the pass, which ends at the final budget. The final phase, in which the
  kept set no longer changes, is not run: it cannot change the plan.
- `scores`: no pruning during the pass; at its last step one allocation keeps the best-scoring triplets that fit
  the final budget.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adalora_cli import files
from adalora_cli.budget import Target, format_count
from adalora_cli.errors import UserError
from adalora_cli.methods.base import RankPlan

logger = logging.getLogger("adalora_cli")

KIND = "adalora-cli rank plan"
VERSION = 1
MODES = ("schedule", "scores")
DEFAULT_MODE = "schedule"
# The pass's length as a share of the optimizer steps the given train options describe: measured in
# docs/methods.md ("Rank plans").
DEFAULT_FRACTION = 0.1
MAKE_ONE = "make one with `adalora plan [your train options] --out PLAN.json`"


@dataclass(frozen=True)
class PlannedTarget:
    """One target matrix of a plan and the rank it gets."""

    name: str
    d_in: int
    d_out: int
    layer: int
    kind: str
    rank: int

    @property
    def lora_params(self) -> int:
        return self.rank * (self.d_in + self.d_out)


@dataclass(frozen=True)
class RankPlanFile:
    """A rank plan as read back (from a plan file or a finished run folder)."""

    source: str  # the file or folder it was read from, for messages
    model: str
    model_type: str | None
    budget: int | None  # the parameter budget the plan was made for; None: made in ranks (adalora.target_r)
    targets: list[PlannedTarget]
    made_by: dict[str, Any]

    @property
    def ranks(self) -> dict[str, int]:
        return {t.name: t.rank for t in self.targets}

    @property
    def params(self) -> int:
        """Its cost as plain LoRA: rank * (d_in + d_out) summed over the targets."""
        return sum(t.lora_params for t in self.targets)

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "version": VERSION, "model": self.model, "model_type": self.model_type,
                "budget": self.budget, "params": self.params,
                "targets": [dataclasses.asdict(t) for t in self.targets], "made_by": self.made_by}


# -- reading and writing ---------------------------------------------------------------------------------------

def write_plan(plan: RankPlanFile, path: Path) -> tuple[Path, Path]:
    """PLAN.json and the heat map PLAN.png beside it, each written atomically; returns both paths."""
    path = Path(path)
    files.write_json(path, plan.to_json())
    return path, plot_plan(plan, heat_map_path(path))


def heat_map_path(path: Path) -> Path:
    return Path(path).with_suffix(".png")


def read_plan(path: str | Path) -> RankPlanFile:
    """A plan file, or a finished run folder (its adapter_config.json and config.yaml); a UserError in one line
    for anything else."""
    path = Path(path)
    if path.is_dir():
        return _plan_of_run(path)
    if not path.is_file():
        raise UserError(f"rank plan {path} does not exist; {MAKE_ONE}, or give a finished run folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"rank plan {path} is not readable JSON ({type(exc).__name__}); {MAKE_ONE}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UserError(f"{path} is not a rank plan (no \"kind\": \"{KIND}\"); {MAKE_ONE}")
    if data.get("version") != VERSION:
        raise UserError(f"rank plan {path} has version {data.get('version')!r}, this adalora-cli reads version "
                        f"{VERSION}; make it again with this version")
    try:
        targets = [PlannedTarget(str(t["name"]), _count(t["d_in"]), _count(t["d_out"]), _count(t["layer"]),
                                 str(t["kind"]), _count(t["rank"])) for t in data["targets"]]
        budget = None if data.get("budget") is None else _count(data["budget"])
        plan = RankPlanFile(str(path), str(data["model"]), data.get("model_type"), budget, targets,
                            dict(data.get("made_by") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"rank plan {path} is damaged ({type(exc).__name__}: {exc}); {MAKE_ONE}") from None
    if not targets:
        raise UserError(f"rank plan {path} lists no target matrices; {MAKE_ONE}")
    return plan


def _count(value: Any) -> int:
    """A whole number >= 0 (JSON may hold 3.0); anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return int(value)


def _plan_of_run(folder: Path) -> RankPlanFile:
    """The kept ranks of a finished run as a plan: its modules' shapes and ranks, its model and budget."""
    from adalora_cli.rundir import RunDir

    run = RunDir(folder).require()
    if not (run / run.RANK_PATTERN).is_file():
        raise UserError(f"{folder} has no {run.RANK_PATTERN}: the run did not finish; give a finished run folder "
                        "or a plan file")
    pattern = files.read_json(run / run.RANK_PATTERN)
    saved, cfg = run.adapter, run.config
    if not saved.modules:
        raise UserError(f"{folder} is a {saved.method} run with no adapted matrices; give a run of an adapter method")
    try:
        targets = [PlannedTarget(name, int(info["d_in"]), int(info["d_out"]), int(info["layer"]), str(info["kind"]),
                                 int(pattern[name])) for name, info in saved.modules.items()]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{folder}: {run.RANK_PATTERN} and {run.ADAPTER_CONFIG} disagree; the run folder is "
                        "damaged, re-run training") from None
    return RankPlanFile(str(folder), cfg.model, None, cfg.budget, targets,
                        {"method": saved.method, "task": saved.task, "run": str(Path(folder).resolve())})


# -- using a plan ----------------------------------------------------------------------------------------------

def plan_for_targets(plan: RankPlanFile, targets: list[Target], budget: int | None) -> RankPlan:
    """The RankPlan a `takes_rank_plan` method trains with: the plan's rank for each of `targets`. Refuses (one
    line, with the fix) a plan made for other target matrices (names or shapes differ) or one over `budget`."""
    ours = {t.name: t for t in targets}
    planned = {t.name: t for t in plan.targets}
    remake = "make a plan with this run's --model and target_modules: adalora plan [these options] --out PLAN.json"
    missing, extra = sorted(set(ours) - set(planned)), sorted(set(planned) - set(ours))
    if missing or extra:
        example = f"this model's {missing[0]!r} is not in it" if missing else f"its {extra[0]!r} is not in this model"
        raise UserError(f"rank plan {plan.source} was made for other target matrices ({plan.model}: "
                        f"{len(planned)} matrices, this run adapts {len(ours)}; {example}); {remake}")
    for name, target in ours.items():
        p = planned[name]
        if (p.d_in, p.d_out) != (target.d_in, target.d_out):
            raise UserError(f"rank plan {plan.source} was made for another model ({plan.model}): {name} is "
                            f"{p.d_out}x{p.d_in} there and {target.d_out}x{target.d_in} here; {remake}")
    if budget is not None and plan.params > budget:
        raise UserError(f"rank plan {plan.source} costs {plan.params:,} parameters as LoRA, over --budget "
                        f"{budget:,}; raise --budget to at least {plan.params:,}, or make a plan with --budget "
                        f"{budget}")
    ranks = {name: planned[name].rank for name in ours}  # in the model's target order
    notes = {"rank plan": plan.source, "total rank": sum(ranks.values()),
             "pruned to 0": sum(1 for r in ranks.values() if r == 0), "params": plan.params}
    return RankPlan(ranks, budget, notes=notes)


# -- the heat map ----------------------------------------------------------------------------------------------

def plot_plan(plan: RankPlanFile, path: Path) -> Path:
    """The heat map of `adalora inspect`, drawn from the plan."""
    from adalora_cli.report import allocation_of, plot_allocation

    modules = {t.name: dataclasses.asdict(t) for t in plan.targets}
    mode = plan.made_by.get("mode")
    alloc = allocation_of(f"plan{', ' + mode if mode else ''}", modules, plan.params, plan.budget, plan.source)
    budget = f" of {format_count(plan.budget)}" if plan.budget else ""
    # two short lines: the heat map of a 6-layer model is narrow, and one long title was cut off at both sides
    title = f"{Path(path).stem}\nrank plan for {Path(plan.model).name}: {format_count(plan.params)} LoRA parameters" \
            f"{budget}"
    return plot_allocation(alloc, path, title)


# -- making a plan ---------------------------------------------------------------------------------------------

def pass_steps(cfg, fraction: float | None, steps: int | None) -> tuple[int, int]:
    """(optimizer steps of the pass, optimizer steps of the full run the options describe). The full run's are
    --max-steps, else --epochs over the training rows (counted by reading the data, as `run_train` will)."""
    from adalora_cli import distributed
    from adalora_cli.rundata import read_data

    if fraction is not None and steps is not None:
        raise UserError("give --plan-fraction or --plan-steps, not both")
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"--plan-fraction must be in (0, 1], got {fraction}; e.g. 0.1 for a tenth of the run")
    if steps is not None and steps < 1:
        raise UserError(f"--plan-steps must be at least 1, got {steps}")
    if cfg.max_steps:
        full = cfg.max_steps
    else:
        _, train_raw, _ = read_data(copy.deepcopy(cfg))
        full = cfg.optimizer_steps(len(train_raw), distributed.world_size())
    if steps is None:
        steps = max(1, round((DEFAULT_FRACTION if fraction is None else fraction) * full))
    return steps, full


def pass_schedule(method_cfg, mode: str, steps: int, full: int) -> dict[str, float]:
    """adalora's t_init / t_final / delta_t for a pass of `steps` optimizer steps (in steps: no rescaling).

    scores: warm-up through the last step but one, where the one allocation to the final budget takes place.
    schedule: the full run's warm-up and decay, as shares of it (a step count is read as a share of `full`),
    stretched over the pass; the pass ends where the final phase would begin.
    """
    if mode == "scores":
        return {"t_init": steps - 1, "t_final": 0, "delta_t": 1}
    from adalora_cli.methods.adalora import RESCALED_SHARE

    share = lambda value: value / full if value >= 1 else value  # noqa: E731
    t_init, t_final, delta_t = share(method_cfg.t_init), share(method_cfg.t_final), share(method_cfg.delta_t)
    if t_init + t_final >= 1:  # the full run would shrink it so (adalora.resolve_schedule): the same proportions
        factor = RESCALED_SHARE / (t_init + t_final)
        t_init, t_final, delta_t = t_init * factor, t_final * factor, delta_t * factor
    span = 1.0 - t_final  # warm-up plus decay, as a share of the full run
    warmup = min(steps - 1, round(steps * t_init / span))
    return {"t_init": warmup, "t_final": 0, "delta_t": max(1, round(steps * delta_t / span))}


def make_plan(cfg, out: Path, fraction: float | None = None, steps: int | None = None, mode: str = DEFAULT_MODE,
              overwrite: bool = False) -> RankPlanFile:
    """Run the short AdaLoRA pass for the run `cfg` describes and write the plan to `out` (and its heat map).

    The pass goes through `pipeline.run_train` with the method set to adalora, `steps` (or `fraction` of the
    full run's) optimizer steps, no evaluation, and its run folder in a temporary folder unless `cfg.output_dir`
    names one.
    """
    from adalora_cli.pipeline import run_train

    from adalora_cli import distributed

    started = time.time()
    if distributed.world_size() > 1:
        raise UserError("adalora plan runs in one process (its pass is short); run it without torchrun")
    if mode not in MODES:
        raise UserError(f"unknown --plan-mode {mode!r}; choose one of: {', '.join(MODES)}")
    out = Path(out)
    if out.is_dir() or heat_map_path(out) == out:
        raise UserError(f"--out {out} must be a file path ending in .json, e.g. --out plan.json")
    if not overwrite and (out.exists() or heat_map_path(out).exists()):
        raise UserError(f"--out {out} already exists; pass --overwrite or choose another --out")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it or choose another --out")
    if cfg.method != "adalora":
        logger.info("plan: the pass trains adalora (--method %s applies to the training with the plan)", cfg.method)
    if cfg.rank_plan is not None:
        raise UserError("--rank-plan applies to `adalora train --method lora`; drop it from `adalora plan`")
    pass_cfg = copy.deepcopy(cfg)
    _adapt_the_same_matrices(pass_cfg)
    pass_cfg.method = "adalora"
    pass_cfg.validate()
    n_steps, full = pass_steps(pass_cfg, fraction, steps)
    pass_cfg.max_steps = n_steps
    pass_cfg.eval_every, pass_cfg.keep_best, pass_cfg.early_stopping, pass_cfg.metric = None, False, None, None
    pass_cfg.save_steps = n_steps  # one checkpoint, at the end: the pass is short
    pass_cfg.report_to = "none"
    schedule = pass_schedule(pass_cfg.method_config(), mode, n_steps, full)
    pass_cfg.method_args.setdefault("adalora", {}).update(schedule)
    logger.info("plan: an adalora pass of %d optimizer steps (of %d in the full run), mode %s (t_init=%d, "
                "delta_t=%d steps)", n_steps, full, mode, schedule["t_init"], schedule["delta_t"])
    with tempfile.TemporaryDirectory(prefix="adalora-plan-") as scratch:
        given = pass_cfg.output_dir is not None
        if not given:
            pass_cfg.output_dir = str(Path(scratch) / "pass")
        run_train(pass_cfg, overwrite=overwrite and given, evaluation=False)
        ran = _plan_of_run(Path(pass_cfg.output_dir))
    plan = RankPlanFile(str(out), cfg.model, _model_type(pass_cfg), cfg.budget, ran.targets, {
        "method": "adalora", "task": cfg.task, "mode": mode, "steps": n_steps, "of_steps": full,
        "seconds": round(time.time() - started, 1), "seed": cfg.seed, **({"run": ran.made_by["run"]} if given else {})})
    json_path, png = write_plan(plan, out)
    logger.info("plan: %d matrices, total rank %d (%d at rank 0), %s LoRA parameters%s; wrote %s and %s",
                len(plan.targets), sum(plan.ranks.values()), sum(1 for r in plan.ranks.values() if r == 0),
                f"{plan.params:,}", f" of a budget of {plan.budget:,}" if plan.budget else "", json_path, png)
    return plan


def _adapt_the_same_matrices(cfg) -> None:
    """Given the options of a run of another method (`--method lora --set lora.target_modules=...`), the pass
    adapts the matrices that run will, unless adalora's own target_modules are set."""
    chosen = cfg.method_args.get(cfg.method, {}).get("target_modules")
    if cfg.method != "adalora" and chosen is not None:
        cfg.method_args.setdefault("adalora", {}).setdefault("target_modules", chosen)


def _model_type(cfg) -> str | None:
    """The model's `model_type` (from its config, already cached by the pass)."""
    try:
        from transformers import AutoConfig

        from adalora_cli.models import resolve_model

        return AutoConfig.from_pretrained(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code).model_type
    except Exception:  # informative only: a plan is checked against target names and shapes
        return None


def summary(plan: RankPlanFile, out: Path) -> str:
    """The end of `adalora plan`: where the plan is, what it holds, and the command that uses it."""
    ranks = plan.ranks
    budget = f" (budget {format_count(plan.budget)})" if plan.budget else ""
    made, unadapted = plan.made_by, sum(1 for r in ranks.values() if r == 0)
    rows = [("plan", f"{out}, heat map {heat_map_path(out)}"),
            ("ranks", f"{len(ranks)} matrices, total rank {sum(ranks.values())}, {unadapted} at rank 0, max "
                      f"{max(ranks.values())}"),
            ("cost", f"{plan.params:,} LoRA parameters{budget}"),
            ("pass", f"{made['mode']} mode, {made['steps']:,} of {made['of_steps']:,} optimizer steps in "
                     f"{math.ceil(made['seconds'])} s"),
            ("next", f"adalora train --method lora --rank-plan {out} [the same options]")]
    return "\n".join(f"{name:8s}{text}" for name, text in rows)
