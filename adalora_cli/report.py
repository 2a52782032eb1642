"""The rank-allocation report: which rank each adapted matrix kept, as a table and as a picture.

`adalora inspect RUN` prints a table (layers x matrix types Wq Wk Wv Wo Wf1 Wf2, with totals and the adapter
parameters against the budget) and writes RUN/rank_allocation.png: on the left a heat map of the final ranks,
matrix types by layers with the rank written in every cell, in the manner of Figure 3 of the AdaLoRA paper;
on the right, for adaptive methods, the scheduled budget and the kept adapter parameters over training steps.
Training draws the same picture at the end of every adaptive run.

Everything comes from the run's files (adapter_config.json, rank_history.json, metrics.json, config.yaml):
no model is loaded, so the report takes a second and works on a native export as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adalora_cli import files
from adalora_cli.budget import format_count
from adalora_cli.errors import UserError
from adalora_cli.inject import MATRIX_KINDS
from adalora_cli.rundir import RunDir

# Tick labels as the paper writes them.
_KIND_LABELS = {"Wq": "$W_q$", "Wk": "$W_k$", "Wv": "$W_v$", "Wo": "$W_o$", "Wf1": "$W_{f_1}$", "Wf2": "$W_{f_2}$"}


@dataclass
class Allocation:
    """The final ranks of a run, laid out by layer and matrix type, and what it spent against its budget."""

    method: str
    kinds: list[str]  # columns: the preset's matrix types in order, then any others the run adapted
    layers: list[int]  # rows
    ranks: dict[tuple[int, str], int]  # (layer, kind) -> final rank; absent where no matrix was adapted
    adapter_params: int
    nonzero_params: int | None  # parameters not exactly zero, where the method prunes entries (PRILoRA)
    budget: int | None  # parameters; None when the run was planned in ranks
    history: list[dict[str, float]] = field(default_factory=list)  # rank_history.json (adaptive methods)
    steps: int | None = None  # optimizer steps of the run

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())


def read_allocation(run: Path | RunDir) -> Allocation:
    """Read a run's allocation from its files; a full fine-tuning run has none to show."""
    run = RunDir.of(run).require()
    saved = run.adapter
    if not saved.modules:
        raise UserError(f"{run} is a {saved.method} run with no adapted matrices, so it has no rank allocation")
    metrics = run.metrics
    params = metrics.get("adapter_params")
    if params is None:
        params = _stored_params(run)
    return allocation_of(saved.method, saved.modules, int(params), run.config.budget,
                         f"{run / run.ADAPTER_CONFIG}: the run folder is damaged, re-run training",
                         nonzero_params=metrics.get("nonzero_adapter_params"), history=run.rank_history,
                         steps=metrics.get("steps"))


def allocation_of(method: str, modules: dict[str, dict], adapter_params: int, budget: int | None, damaged: str,
                  **extra) -> Allocation:
    """An Allocation from per-module records ({name: {"layer", "kind", "rank", ...}}: a run's adapter_config.json
    modules, or a rank plan's targets); `damaged` is the error's text where a record lacks one of them."""
    ranks, kinds = {}, []
    for name, info in modules.items():
        try:
            key, rank = (int(info["layer"]), str(info["kind"])), int(info["rank"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"no layer, kind or rank for {name} in {damaged}") from None
        ranks[key] = ranks.get(key, 0) + rank
        if key[1] not in kinds:
            kinds.append(key[1])
    kinds = [k for k in MATRIX_KINDS if k in kinds] + [k for k in kinds if k not in MATRIX_KINDS]
    return Allocation(method, kinds, sorted({layer for layer, _ in ranks}), ranks, adapter_params,
                      extra.pop("nonzero_params", None), budget, **extra)


def _stored_params(run: RunDir) -> int:
    """Adapter parameters counted from the saved tensors' shapes (when metrics.json is absent)."""
    from safetensors import safe_open

    path = run / run.ADAPTER
    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(_numel(f.get_slice(key).get_shape()) for key in f.keys())
    except Exception as exc:  # missing or corrupt file: safetensors raises its own types
        raise UserError(f"cannot read {path} ({type(exc).__name__}); the run folder is damaged, "
                        "re-run training") from None


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


# -- the table -------------------------------------------------------------------------------------------

def format_table(alloc: Allocation, title: str = "") -> str:
    """Layers as rows, matrix types as columns, row and column totals, then the parameters against the budget."""
    width = max(6, *(len(k) + 1 for k in alloc.kinds))
    cell = lambda value: f"{value:>{width}}"  # noqa: E731
    lines = [title] if title else []
    lines.append(f"{'layer':>5} " + "".join(cell(k) for k in alloc.kinds) + " |" + cell("total"))
    for layer in alloc.layers:
        row = [alloc.ranks.get((layer, kind)) for kind in alloc.kinds]
        lines.append(f"{layer:>5} " + "".join(cell("-" if r is None else r) for r in row) + " |"
                     + cell(sum(r or 0 for r in row)))
    lines.append("-" * len(lines[-1]))
    totals = [sum(alloc.ranks.get((layer, kind), 0) for layer in alloc.layers) for kind in alloc.kinds]
    lines.append(f"{'total':>5} " + "".join(cell(t) for t in totals) + " |" + cell(alloc.total_rank))
    lines.extend(_spending(alloc))
    return "\n".join(lines)


def _spending(alloc: Allocation) -> list[str]:
    pruned = sum(1 for r in alloc.ranks.values() if r == 0)
    lines = [f"matrices: {len(alloc.ranks)} adapted, {pruned} pruned to rank 0; total rank {alloc.total_rank}"]
    text = f"adapter parameters: {alloc.adapter_params:,}"
    if alloc.budget:
        text += f" of a budget of {alloc.budget:,} ({100 * alloc.adapter_params / alloc.budget:.1f}%)"
    else:
        text += " (no parameter budget: the run was planned in ranks)"
    if alloc.nonzero_params is not None and alloc.nonzero_params != alloc.adapter_params:
        text += f", {alloc.nonzero_params:,} of them nonzero"
    if alloc.history:
        text += f"; {int(alloc.history[0]['adapter_params']):,} at the start of training"
    return lines + [text]


# -- the picture -----------------------------------------------------------------------------------------

def plot_allocation(alloc: Allocation, path: Path, title: str = "") -> Path:
    """Write the heat map (and, with a history, the budget curve) as a PNG, atomically."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless (Agg)

    grid = np.full((len(alloc.kinds), len(alloc.layers)), np.nan)
    for (layer, kind), rank in alloc.ranks.items():
        grid[alloc.kinds.index(kind), alloc.layers.index(layer)] = rank
    heat_w = max(3.6, 0.62 * len(alloc.layers) + 2.2)
    height = max(3.4, 0.55 * len(alloc.kinds) + 1.9)
    with_history = len(alloc.history) > 0
    fig = Figure(figsize=(heat_w + (5.4 if with_history else 0), height), dpi=130,
                 layout="constrained")
    if with_history:
        ax_heat, ax_hist = fig.subplots(1, 2, width_ratios=[heat_w, 5.0])
    else:
        ax_heat, ax_hist = fig.subplots(1, 1), None
    _draw_heat_map(fig, ax_heat, alloc, grid)
    if ax_hist is not None:
        _draw_history(ax_hist, alloc)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save_png(fig, path)


def _save_png(fig, path: Path) -> Path:
    path = Path(path)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _draw_heat_map(fig, ax, alloc: Allocation, grid) -> None:
    import numpy as np
    from matplotlib import colormaps

    cmap = colormaps["YlGnBu"].with_extremes(bad="#e6e6e6")  # grey: a matrix that was not adapted
    top = max(1, int(np.nanmax(grid)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=top, aspect="auto",
                      interpolation="nearest")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value = grid[i, j]
            if np.isnan(value):
                continue
            dark = value > 0.6 * top
            ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(alloc.layers)), [str(layer) for layer in alloc.layers])
    ax.set_yticks(range(len(alloc.kinds)), [_KIND_LABELS.get(k, k) for k in alloc.kinds])
    ax.set_xticks(np.arange(-0.5, len(alloc.layers)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(alloc.kinds)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("matrix")
    ax.set_title(f"final rank ({alloc.method}, total {alloc.total_rank})", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
    bar.set_label("rank")
    bar.ax.yaxis.get_major_locator().set_params(integer=True)


def _draw_history(ax, alloc: Allocation) -> None:
    """Budget and kept parameters at each allocation, held constant between records (steps-post)."""
    from matplotlib.ticker import FuncFormatter

    steps = [int(h["step"]) for h in alloc.history]
    end = max(steps[-1], alloc.steps or 0)
    in_params = alloc.budget is not None
    kept_key = "adapter_params" if in_params else "total_rank"
    budget = [h["budget"] for h in alloc.history]
    kept = [h.get(kept_key, 0) for h in alloc.history]
    ax.plot(steps + [end], budget + budget[-1:], drawstyle="steps-post", color="#c0392b", linewidth=1.8,
            label="scheduled budget")
    ax.plot(steps + [end], kept + kept[-1:], drawstyle="steps-post", color="#2471a3", linewidth=1.4,
            linestyle="--", label="kept adapter parameters" if in_params else "kept rank")
    ax.set_xlim(0, max(end, 1))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("parameters" if in_params else "triplets (total rank)")
    if in_params:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_count(int(value))))
    ax.set_title("budget schedule", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, frameon=False)


# -- entry points ----------------------------------------------------------------------------------------

def write_report(run: Path | RunDir) -> tuple[str, Path]:
    """`adalora inspect`: the table as text, and the PNG written into the run folder."""
    run = RunDir.of(run)
    alloc = read_allocation(run)
    title = f"rank allocation of {run} ({alloc.method})"
    return format_table(alloc, title), plot_allocation(alloc, run / run.RANK_PLOT, _plot_title(run, alloc))


def write_rank_plot(run: Path | RunDir) -> Path:
    """The picture alone, drawn by training at the end of an adaptive run."""
    run = RunDir.of(run)
    alloc = read_allocation(run)
    return plot_allocation(alloc, run / run.RANK_PLOT, _plot_title(run, alloc))


def _plot_title(run: RunDir, alloc: Allocation) -> str:
    budget = f" of {format_count(alloc.budget)}" if alloc.budget else ""
    return (f"{run.path.resolve().name} ({alloc.method}): {format_count(alloc.adapter_params)} adapter "
            f"parameters{budget}")


def plot_rank_sweep(by_rank: dict[int, dict[str, float]], path: Path, title: str = "") -> Path:
    """Every metric against the rank an any-rank adapter was evaluated at (`adalora eval --rank-sweep`)."""
    from matplotlib.figure import Figure

    ranks = sorted(by_rank)
    fig = Figure(figsize=(5.6, 3.6), dpi=130, layout="constrained")
    ax = fig.subplots()
    for name in sorted({name for metrics in by_rank.values() for name in metrics}):
        ax.plot(ranks, [by_rank[r].get(name) for r in ranks], marker="o", label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("metric")
    ax.set_xticks(ranks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save_png(fig, path)


# -- the learning curve ------------------------------------------------------------------------------------

def write_learning_curve(run: Path | RunDir) -> Path:
    """RUN/learning_curve.png from train_log.json: the training loss (task loss and regulariser) over optimizer
    steps and, when the run evaluated during training, every evaluation metric, with evaluations before an
    adaptive method's final budget drawn hollow and the one --keep-best chose starred."""
    run = RunDir.of(run)
    return plot_learning_curve(run.train_log, run / run.LEARNING_CURVE, f"{run.path.resolve().name}: learning curve",
                               run.metrics.get("best"))


def plot_learning_curve(log: list[dict], path: Path, title: str = "", best: dict | None = None) -> Path:
    from matplotlib.figure import Figure

    train = [e for e in log if "loss" in e and "step" in e]
    evals = [e for e in log if any(k.startswith("eval_") for k in e) and "step" in e]
    fig = Figure(figsize=(10.5 if evals else 5.6, 3.8), dpi=130, layout="constrained")
    axes = fig.subplots(1, 2 if evals else 1)
    ax_loss = axes[0] if evals else axes
    for key, style in (("loss", "-"), ("task_loss", "--"), ("regulariser", ":")):
        points = [(e["step"], e[key]) for e in train if key in e]
        if points:
            ax_loss.plot(*zip(*points), style, label=key.replace("_", " "))
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if train:
        ax_loss.legend(fontsize=8, frameon=False)
    else:
        ax_loss.text(0.5, 0.5, "no loss logged (fewer steps than logging_steps)", ha="center", va="center",
                     transform=ax_loss.transAxes, fontsize=9, color="grey")
    ax_loss.set_title("training", fontsize=10)
    if evals:
        _draw_evaluations(axes[1], evals, best)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save_png(fig, path)


def _draw_evaluations(ax, evals: list[dict], best: dict | None) -> None:
    names = sorted({k.removeprefix("eval_") for e in evals for k, v in e.items()
                    if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")})
    for name in names:
        points = [(e["step"], e[f"eval_{name}"], e.get("eval_at_final_budget", True)) for e in evals
                  if f"eval_{name}" in e]
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, label=name)
        hollow = [(s, v) for s, v, final in points if not final]
        if hollow:
            ax.plot(*zip(*hollow), "o", markersize=6, markerfacecolor="white", color=line.get_color())
    if best:
        value = next((e[f"eval_{best['metric']}"] for e in evals if e["step"] == best["step"]
                      and f"eval_{best['metric']}" in e), best["value"])
        ax.plot([best["step"]], [value], "*", markersize=14, color="#c0392b", label=f"kept (step {best['step']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("evaluation metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("evaluation (hollow: before the final budget)" if any(not e.get("eval_at_final_budget", True)
                                                                     for e in evals) else "evaluation", fontsize=10)
