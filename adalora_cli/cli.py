"""The `adalora` command line. Thin: parse options into a RunConfig and hand it to the pipeline."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from typer.core import TyperCommand, TyperGroup

from adalora_cli.config import RunConfig
from adalora_cli.errors import Interrupted, TrainingFailed, UserError
from adalora_cli.options import with_field_options

# The click that typer parses with and whose exceptions it raises: its own copy (`typer._click`, recent typer) or
# the click package (older typer)
_click = getattr(typer.core, "_click", None) or typer.core.click
ClickException = _click.exceptions.ClickException
NoArgsIsHelpError = getattr(_click.exceptions, "NoArgsIsHelpError", ())  # click < 8.2 exits 0 with the help instead


class OneLineErrors(TyperGroup):
    """Command-line mistakes (unknown option or command, a value of the wrong type) as one line on stderr
    with exit code 2, like every other user error, instead of click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:  # typer's Abort, or click's where typer re-exports it
            typer.echo("adalora: aborted", err=True)
            sys.exit(130)
        except NoArgsIsHelpError as exc:  # no arguments at all: the help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"adalora: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)  # an int is the code of a typer.Exit


class PlainHelp(TyperCommand):
    """Help as plain text: a boxed table squeezes long option names into "--gradient-accu…" at 80 columns, while
    plain text puts a long name on a line of its own. Options stay grouped under their panels (Data, ...)."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = "Arguments" if param.param_type_name == "argument" else \
                    getattr(param, "rich_help_panel", None) or "Options"
                sections.setdefault(title, []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


app = typer.Typer(
    cls=OneLineErrors,
    rich_markup_mode=None,  # plain help (PlainHelp), readable at any width
    help="Fine-tune Transformer models with adaptive-rank low-rank adapters under a parameter budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)

RunDirArg = Annotated[Path, typer.Argument(help="A run directory written by `adalora train`.")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Local data folder (GLUE TSVs, SQuAD JSON); default: the hub.")]


def user_errors(command):
    """Print a UserError as one line on stderr and exit with code 2 (TrainingFailed: code 1); no traceback.
    A run stopped by a signal prints where it stopped and exits with 128 + the signal number."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return command(*args, **kwargs)
        except (UserError, TrainingFailed) as exc:
            typer.echo(f"adalora: error: {exc}", err=True)
            raise typer.Exit(2 if isinstance(exc, UserError) else 1) from None
        except Interrupted as exc:
            typer.echo(f"adalora: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("adalora: aborted", err=True)
            raise typer.Exit(130) from None

    return wrapper


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (a test runner may swap it between commands), through tqdm: a progress
    bar on the terminal is cleared, the line written, the bar redrawn below it, so no message lands on its line."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _setup_logging() -> None:
    logger = logging.getLogger("adalora_cli")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("adalora: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _settings_classes() -> tuple[type, ...]:
    """Every task family's settings class (`Task.settings_class`): their fields are `train` options too."""
    from adalora_cli.tasks import settings_classes

    return tuple(settings_classes())


@app.command(cls=PlainHelp)
@user_errors
@with_field_options((RunConfig, *_settings_classes()))
def train(
    config: Annotated[Optional[Path], typer.Option(help="YAML file of settings; options override it.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value, e.g. adalora.t_init=200 (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output-dir from its last checkpoint.")] = False,
    **options,
) -> None:
    """Fine-tune a model on a task with an adapter method, then evaluate it."""
    from adalora_cli.config import make_config
    from adalora_cli.pipeline import run_train

    result = run_train(make_config(config, set_, options, resume=resume), overwrite=overwrite, resume=resume)
    if result is not None:  # None on the other processes of a multi-process run
        typer.echo(result.summary)


PLAN = "Rank plan"


@app.command(cls=PlainHelp)
@user_errors
@with_field_options((RunConfig, *_settings_classes()), where=lambda cls, f: f.name != "rank_plan")
def plan(
    out: Annotated[Path, typer.Option(help="The plan to write (JSON); its heat map goes beside it as .png.",
                                      rich_help_panel=PLAN)],
    plan_fraction: Annotated[Optional[float], typer.Option(
        help="Length of the AdaLoRA pass as a share of the optimizer steps these options describe.  [default: 0.1]",
        show_default=False, rich_help_panel=PLAN)] = None,
    plan_steps: Annotated[Optional[int], typer.Option(help="Length of the pass in optimizer steps, instead.",
                                                      rich_help_panel=PLAN)] = None,
    plan_mode: Annotated[str, typer.Option(help="schedule (AdaLoRA's cubic schedule compressed into the pass) or "
                                           "scores (one allocation at its end, from importance over the pass).",
                                           rich_help_panel=PLAN)] = "schedule",
    config: Annotated[Optional[Path], typer.Option(help="YAML file of settings; options override it.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value, e.g. adalora.init_r=12 (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out (and a non-empty --output-dir).")] = False,
    **options,
) -> None:
    """Choose each adapted matrix's rank with a short AdaLoRA pass (the options of `train`; --output-dir keeps the
    pass's run folder), for `adalora train --method lora --rank-plan PLAN`."""
    from adalora_cli.config import make_config
    from adalora_cli.rankplan import make_plan, summary

    made = make_plan(make_config(config, set_, options), out, plan_fraction, plan_steps, plan_mode, overwrite)
    typer.echo(summary(made, out))


COLUMNS = "Columns of the file, where they differ from the run's"
column_options = with_field_options(_settings_classes(), where=lambda cls, f: f.metadata.get("column"), panel=COLUMNS,
                                    shown="the run's")  # the options of `eval --input` and `predict`


@app.command("eval", cls=PlainHelp)
@user_errors
@column_options
def eval_(
    run: RunDirArg,
    data_dir: DataDirOpt = None,
    input_: Annotated[Optional[Path], typer.Option("--input", help="Score this labelled file instead of the run's "
                                                   "evaluation data: the task's format (own data: .csv .tsv .json "
                                                   ".jsonl; GLUE TSV; SQuAD JSON); writes RUN/eval-<file stem>.json."
                                                   )] = None,
    rank: Annotated[Optional[int], typer.Option(help="Evaluate an any-rank (DyLoRA) adapter at this rank.")] = None,
    rank_sweep: Annotated[bool, typer.Option(help="Evaluate an any-rank adapter at every rank 1..r_max.")] = False,
    **columns: Optional[str],
) -> None:
    """Reload a trained run (base model, adapter, head) and evaluate it; writes RUN/eval.json."""
    from adalora_cli.commands import run_eval

    result = run_eval(run, data_dir, rank=rank, rank_sweep=rank_sweep, input_path=input_, columns=columns)
    if result is None:  # another process of torchrun: the main one prints
        return
    if rank_sweep:
        names = sorted({name for metrics in result.values() for name in metrics})
        typer.echo("rank  " + "  ".join(f"{n:>10s}" for n in names))
        for b, metrics in result.items():
            typer.echo(f"{b:>4d}  " + "  ".join(f"{metrics[n]:>10.4f}" for n in names))
    else:
        typer.echo(json.dumps(result, indent=2))


@app.command(cls=PlainHelp)
@user_errors
@column_options
def predict(
    run: RunDirArg,
    input_: Annotated[Path, typer.Option("--input", help="Rows to predict: the task's input columns (.csv .tsv .json "
                                         ".jsonl; SQuAD-format JSON for squad tasks); a label column is ignored.")],
    output: Annotated[Optional[Path], typer.Option(help="File to write.", show_default="stdout")] = None,
    format_: Annotated[str, typer.Option("--format", help="jsonl (one {id, ...} per row), or glue (the GLUE "
                                         "leaderboard's TSV, GLUE tasks).")] = "jsonl",
    rank: Annotated[Optional[int], typer.Option(help="Predict with an any-rank (DyLoRA) adapter at this rank.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per batch.", show_default="the run's "
                                                      "eval_batch_size")] = None,
    **columns: Optional[str],
) -> None:
    """Predict new rows with a trained run: one JSON line per input row, in input order."""
    from adalora_cli.commands import run_predict

    run_predict(run, input_, output, format_, rank, batch_size, columns=columns)


@app.command("export-adapter", cls=PlainHelp)
@user_errors
def export_adapter(
    run: RunDirArg,
    format_: Annotated[Optional[str], typer.Option("--format", help="native (our files), peft (a PEFT LoRA adapter) "
                                                   "or merged (a plain Transformers model).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder to write.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    rank: Annotated[Optional[int], typer.Option(help="Export an any-rank (DyLoRA) adapter at this rank.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="peft: the base model the adapter names "
                                                      "(base_model_name_or_path), e.g. another copy of it.",
                                                      show_default="the run's model: its hub id where known, "
                                                      "else its folder")] = None,
) -> None:
    """Export a trained run as native files, a PEFT adapter, or a model with the adapter merged in."""
    from adalora_cli.export import run_export

    written = run_export(run, format_, out, overwrite, rank, base_model)
    typer.echo(f"wrote the {format_} export of {run} to {written}")


@app.command(cls=PlainHelp)
@user_errors
def inspect(run: RunDirArg) -> None:
    """Print the final rank of every adapted matrix and write RUN/rank_allocation.png."""
    from adalora_cli.report import write_report

    table, png = write_report(run)
    typer.echo(table)
    typer.echo(f"wrote {png}")


class ListOptions(PlainHelp):
    """`--tasks sst2 mrpc` as well as `--tasks sst2 --tasks mrpc`: the words after a list option, up to the next
    option, are its values (click gives an option one value per occurrence)."""

    list_options = ("--tasks", "--methods", "--budgets", "--seeds")

    def parse_args(self, ctx, args):
        spread, current = [], None
        for arg in args:
            if arg.startswith("-"):
                current = arg if arg in self.list_options else None
                if current is None or arg == current:
                    spread.append(arg)
                continue
            if current is not None and spread[-1] != current:
                spread.append(current)
            spread.append(arg)
        return super().parse_args(ctx, spread)


SWEPT = ("task", "method", "budget", "seed", "output_dir")  # set per cell by `adalora sweep`


@app.command(cls=ListOptions)
@user_errors
@with_field_options((RunConfig, *_settings_classes()), where=lambda cls, f: f.name not in SWEPT)
def sweep(
    tasks: Annotated[list[str], typer.Option("--tasks", help="Tasks to train on (sst2 mrpc ...).")],
    methods: Annotated[list[str], typer.Option("--methods", help="Methods (`adalora methods`), or plan+lora: "
                                               "`adalora plan` then lora with its ranks.")],
    budgets: Annotated[list[str], typer.Option("--budgets", help="Parameter budgets (0.1M 300k ...).")],
    out: Annotated[Path, typer.Option(help="Folder of the cells' run folders and of sweep.json, sweep.md and "
                                      "sweep.png.")],
    seeds: Annotated[list[int], typer.Option("--seeds", help="Seeds: each (task, method, budget) once per seed.")] = [0],
    workers: Annotated[int, typer.Option(help="Runs at once; the CPU threads are split between them (on a GPU "
                                         "they share it).")] = 1,
    rerun: Annotated[bool, typer.Option(help="Train every cell again, even one finished with the same settings.")
                     ] = False,
    plan_fraction: Annotated[Optional[float], typer.Option(help="plan+lora: `adalora plan --plan-fraction`.")] = None,
    plan_steps: Annotated[Optional[int], typer.Option(help="plan+lora: `adalora plan --plan-steps`.")] = None,
    plan_mode: Annotated[Optional[str], typer.Option(help="plan+lora: `adalora plan --plan-mode`.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file of train settings for every run.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value for every run (repeatable).")] = None,
    **options,
) -> None:
    """Train methods x budgets x seeds on one or more tasks (one `adalora train` per cell, the other options passed
    to each); write OUT/sweep.json, sweep.md and sweep.png. Finished cells are skipped."""
    from adalora_cli.options import as_arguments
    from adalora_cli.sweep import Sweep, run_sweep

    plan_arguments = as_arguments({"plan_fraction": plan_fraction, "plan_steps": plan_steps, "plan_mode": plan_mode})
    grid = Sweep(tasks, methods, budgets, seeds, out, workers, config, list(set_ or []), options, plan_arguments,
                 rerun)
    results = run_sweep(grid, echo=typer.echo)
    failed = sum(r["status"] == "failed" for r in results)
    typer.echo(f"wrote {grid.out / 'sweep.json'}, sweep.md and sweep.png ({len(results)} cells, {failed} failed)")
    if failed:
        raise typer.Exit(1)


@app.command(cls=PlainHelp)
@user_errors
def methods() -> None:
    """List the registered methods."""
    from adalora_cli.methods import available_methods, get_method

    _table([(name, get_method(name).summary) for name in available_methods()])


@app.command(cls=PlainHelp)
@user_errors
def tasks() -> None:
    """List the registered tasks."""
    from adalora_cli.tasks import available_tasks, get_task

    _table([(name, ", ".join(get_task(name).metric_names)) for name in available_tasks()])


def _table(rows: list[tuple[str, str]]) -> None:
    """Two columns, the second starting where the longest name ends."""
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        typer.echo(f"{name:{width}s}  {text}")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("adalora-cli")
        except PackageNotFoundError:
            from adalora_cli import __version__ as number
        typer.echo(f"adalora-cli {number}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Fine-tune Transformer models with adaptive-rank low-rank adapters under a parameter budget."""


if __name__ == "__main__":
    app()
