"""Evaluate a plain LoRA run truncated to its first b components: the baseline DyLoRA's any-rank claim
is measured against (a LoRA adapter is not trained to work below its rank).

    python scripts/truncated_lora_eval.py runs/sst2-lora --rank 1 [--data-dir DIR]

Each layer keeps A[:b] and B[:, :b]; the scale is alpha / b, DyLoRA's rule at rank b (`--keep-scale` keeps
the trained alpha / r instead). Prints the metrics for every rank asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adalora_cli import rundir  # noqa: E402
from adalora_cli.evaluation import evaluate  # noqa: E402
from adalora_cli.rundata import read_data  # noqa: E402


def truncate(layers: dict, rank: int, alpha: float | None) -> None:
    """Cut every LoRA layer to its first `rank` components, in place."""
    with torch.no_grad():
        for layer in layers.values():
            trained_rank = layer.lora_A.shape[0]
            if rank > trained_rank:
                raise SystemExit(f"rank {rank} is above the run's rank {trained_rank}")
            layer.lora_A.data = layer.lora_A.data[:rank].clone()
            layer.lora_B.data = layer.lora_B.data[:, :rank].clone()
            if alpha is not None:
                layer.scaling = alpha / rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--rank", type=int, nargs="+", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--keep-scale", action="store_true", help="keep alpha / r instead of alpha / b")
    args = parser.parse_args()
    results = {}
    for rank in args.rank:
        cfg, saved, model, tokenizer, layers, _ = rundir.load_run(Path(args.run), args.data_dir)
        if saved.method != "lora":
            raise SystemExit(f"{args.run} is a {saved.method} run; this baseline is for plain LoRA runs")
        truncate(layers, rank, None if args.keep_scale else cfg.method_config().alpha)
        task, _, evals = read_data(cfg, training=False)
        results[rank] = evaluate(model, tokenizer, task, evals, cfg, cfg.compute_precision())
        print(f"rank {rank}: {results[rank]}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
