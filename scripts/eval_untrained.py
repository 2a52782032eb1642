"""Evaluate a model before any training: the pretrained model with its freshly initialised task head.

This is the "0 steps" reference point for a training run: with the same --seed, the head is initialised
exactly as `adalora train` initialises it (adapters start as a zero update, so they change nothing yet).
Settings are those of `adalora train` (same names, same defaults), given as key=value:

    python scripts/eval_untrained.py task=squad model=minilm-l6 validation_file=/tmp/squad/v1-eval-10.json \
        max_seq_length=256 seed=0

prints the metrics as JSON (for SQuAD: exact_match and f1 on the 0-100 scale).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    from transformers import set_seed

    from adalora_cli import evaluation, models, rundata
    from adalora_cli.config import make_config
    from adalora_cli.errors import UserError

    try:
        cfg = make_config(None, argv)
        cfg.validate()
        rundata.quiet_datasets()
        task, _, evals = rundata.read_data(cfg)  # the training data tells the columns and classes
        task, hf_config, tokenizer = models.for_task(cfg.model, task, cfg.trust_remote_code)
        set_seed(cfg.seed)  # as run_train does just before loading the model: the same fresh head
        model, _ = models.load_model(cfg.model, hf_config, task.auto_model, cfg.trust_remote_code)
        import torch

        if torch.cuda.is_available():
            model.to("cuda")
        metrics = evaluation.evaluate(model, tokenizer, task, evals, cfg, cfg.compute_precision())
    except UserError as exc:
        print(f"eval_untrained: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"task": task.name, "model": cfg.model, "steps": 0, "eval": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
