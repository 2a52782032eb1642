"""The one evaluation path: `evaluate` scores a model on a run's evaluation sets. It serves evaluation during
training, at the end of training and `adalora eval`; `adalora predict` runs the same inference (`inference`).
"""

from __future__ import annotations

from adalora_cli import devices
from adalora_cli.config import RunConfig
from adalora_cli.inference import sharded_outputs
from adalora_cli.rundata import EvalSet, features_for, max_length
from adalora_cli.tasks import Task


def evaluate(model, tokenizer, task: Task, evals: list[EvalSet], cfg: RunConfig,
             precision: devices.Precision) -> dict[str, float]:
    """Every evaluation set, metric names suffixed per set; features are built on first use and kept. Computes under
    `precision` (the run's, resolved once per command by the caller: `cfg.compute_precision()`). Under torchrun every
    process must call it: each runs the model over its shard of the rows, and all return the same metrics of all rows."""
    metrics = {}
    for eval_set in evals:
        if eval_set.features is None:
            eval_set.features, eval_set.truncated = features_for(task, eval_set.raw, tokenizer,
                                                                 max_length(cfg, task, tokenizer), False,
                                                                 f"evaluation set {eval_set.name}")
        outputs = sharded_outputs(lambda features: task.outputs(model, features, tokenizer, cfg.eval_batch_size,
                                                                precision),
                                  eval_set.features, cfg.eval_batch_size)  # each process its shard (torchrun)
        for name, value in task.compute_metrics(outputs, eval_set.raw, eval_set.features).items():
            metrics[name + eval_set.suffix] = round(float(value), 6)
    return metrics
