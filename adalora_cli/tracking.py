"""Experiment tracking (`--report-to tensorboard|wandb|mlflow`), with its files in `OUTPUT_DIR/logs`.

The Trainer's own integration callbacks send every logged number (task loss, regulariser, budget, kept
adapter parameters, learning rate, evaluation metrics) as a scalar; at the end of training the run's pictures
(learning curve, rank allocation) follow as images. Each tracker is an optional extra: a missing package is one
line with the install command, before any work.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from adalora_cli.errors import UserError

logger = logging.getLogger("adalora_cli")

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(report_to: str) -> None:
    if report_to == "none":
        return
    try:
        importlib.import_module(PACKAGES[report_to])
    except ImportError:
        raise UserError(f"--report-to {report_to} needs the {PACKAGES[report_to]} package; run: "
                        f'pip install "adalora-cli[{report_to}]"') from None


def callbacks(report_to: str, log_dir: Path) -> list:
    """The Trainer callback that sends the logs to the tracker, writing its local files under `log_dir`."""
    if report_to == "none":
        return []
    log_dir.mkdir(parents=True, exist_ok=True)
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(SummaryWriter(log_dir=str(log_dir)))]
    if report_to == "wandb":
        from transformers.integrations import WandbCallback

        os.environ.setdefault("WANDB_DIR", str(log_dir))
        return [WandbCallback()]
    from transformers.integrations import MLflowCallback

    os.environ.setdefault("MLFLOW_TRACKING_URI", (log_dir / "mlruns").resolve().as_uri())
    return [MLflowCallback()]


def log_images(report_to: str, log_dir: Path, pictures: list[Path], trainer) -> None:
    """Send the run's pictures to the tracker, at the last optimizer step."""
    if report_to == "none" or not pictures:
        return
    step = trainer.state.global_step
    if report_to == "tensorboard":
        import numpy as np
        from matplotlib.image import imread
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(log_dir)) as writer:
            for path in pictures:
                image = imread(path)[..., :3]
                writer.add_image(Path(path).stem, (image * 255).astype(np.uint8), step, dataformats="HWC")
    elif report_to == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.log({**{Path(path).stem: wandb.Image(str(path)) for path in pictures}, "train/global_step": step})
    else:
        import mlflow

        run = mlflow.last_active_run()
        if run is not None:
            for path in pictures:
                mlflow.MlflowClient().log_artifact(run.info.run_id, str(path))
    logger.info("sent %s to %s", ", ".join(Path(p).name for p in pictures), report_to)
