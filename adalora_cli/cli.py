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

from adalora_cli.errors import UserError

app = typer.Typer(
    help="Fine-tune Transformer encoders with adaptive-rank low-rank adapters under a parameter budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)

RunDirArg = Annotated[Path, typer.Argument(help="A run directory written by `adalora train`.")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Local data folder (GLUE TSVs, SQuAD JSON); default: the hub.")]


def user_errors(command):
    """Print a UserError as one line on stderr and exit with code 2; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"adalora: error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _setup_logging() -> None:
    logger = logging.getLogger("adalora_cli")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("adalora: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
@user_errors
def train(
    task: Annotated[Optional[str], typer.Option(help="sst2, mnli, ..., squad, squad_v2 (see `adalora tasks`).")] = None,
    method: Annotated[Optional[str], typer.Option(help="lora, adalora or full (see `adalora methods`).")] = None,
    budget: Annotated[Optional[str], typer.Option(help="Adapter parameters at the end: 300000, 300k, 0.3M.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Hub id, local folder, or minilm-l6 (embedded).")] = None,
    data_dir: DataDirOpt = None,
    train_file: Annotated[Optional[str], typer.Option(help="Local training file, instead of --data-dir.")] = None,
    validation_file: Annotated[Optional[str], typer.Option(help="Local evaluation file.")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Run directory to write.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file of settings; options override it.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Training epochs (default 3).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per device per micro-batch.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the method's).")] = None,
    max_seq_length: Annotated[Optional[int], typer.Option(help="Tokens per example (default: the task's).")] = None,
    doc_stride: Annotated[Optional[int], typer.Option(help="SQuAD: tokens shared by context windows (default 128).")] = None,
    gradient_accumulation_steps: Annotated[Optional[int], typer.Option(help="Micro-batches per step.")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(help="Use only the first N training rows.")] = None,
    max_eval_samples: Annotated[Optional[int], typer.Option(help="Use only the first N evaluation rows.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default 0).")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(help="Recompute activations.")] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option(help="Allow model code from the hub.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="key=value, e.g. adalora.t_init=200 (repeatable).")] = None,
) -> None:
    """Fine-tune a model on a task with an adapter method, then evaluate it."""
    options = {key: value for key, value in locals().items() if key not in ("config", "set_", "overwrite")}
    from adalora_cli.config import make_config
    from adalora_cli.pipeline import run_train

    cfg = make_config(config, set_, options)

    metrics = run_train(cfg, overwrite=overwrite)
    typer.echo(json.dumps(metrics, indent=2))


@app.command("eval")
@user_errors
def eval_(run: RunDirArg, data_dir: DataDirOpt = None) -> None:
    """Reload a trained run (base model, adapter, head) and evaluate it; writes RUN/eval.json."""
    from adalora_cli.pipeline import run_eval

    typer.echo(json.dumps(run_eval(run, data_dir), indent=2))


@app.command()
@user_errors
def methods() -> None:
    """List the registered methods."""
    from adalora_cli.methods import _METHODS

    for name, method in sorted(_METHODS.items()):
        typer.echo(f"{name:10s} {method.summary}")


@app.command()
@user_errors
def tasks() -> None:
    """List the registered tasks."""
    from adalora_cli.tasks import _TASKS

    for name, task in sorted(_TASKS.items()):
        typer.echo(f"{name:10s} {', '.join(task.metric_names)}")


if __name__ == "__main__":
    app()
