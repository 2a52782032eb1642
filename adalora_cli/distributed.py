"""Several processes (torchrun / accelerate launch): who writes, when to wait, and what DeepSpeed may do.

Training itself is the Trainer's DDP: gradients are all-reduced before `optimizer.step()`, so every
allocator sees the same gradients and takes the same decision on every process (PRILoRA all-reduces its
input statistics itself). What is left to us: the run directory is written by the main process only,
the other processes wait for it at the two points where it changes under them, evaluation is shared out
(each process runs the model over its shard of the rows, `shard_bounds`, and every process gets every part,
`gather_parts`), and DeepSpeed ZeRO configurations that would hide the tensors an allocator reads or edits
are refused.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from adalora_cli.errors import UserError


def world_size() -> int:
    """Processes of this run, from the launcher's environment (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _group():
    """torch.distributed when a process group is running (torchrun: started by the Trainer or by
    `across_processes`), else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the running process group; (0, 1) without one."""
    dist = _group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank_and_size()[0] == 0


def shard_bounds(n: int, unit: int = 1) -> tuple[int, int]:
    """This process's contiguous [start, end) of `n` rows: rank r of w processes gets the r-th of w balanced,
    consecutive runs of whole units of `unit` rows (the last unit may be short); a process may get none.

    With `unit` = the batch size, every batch a process runs is a batch the single process would run, so the
    outputs are the single process's, bit for bit on the same device (a batch's padding width and float
    rounding depend on which rows share it)."""
    rank, size = rank_and_size()
    units = -(-n // unit)
    share, extra = divmod(units, size)
    first = rank * share + min(rank, extra)
    last = first + share + (1 if rank < extra else 0)
    return min(first * unit, n), min(last * unit, n)


def gather_parts(part) -> list:
    """Every process's `part`, in rank order, on every process ([part] in a single process). The parts travel
    pickled (`all_gather_object`): with NCCL through this process's current CUDA device, which the Trainer and
    `across_processes` set to the process's own GPU."""
    dist = _group()
    if dist is None:
        return [part]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def across_processes(command):
    """Run `command` (`adalora eval` / `predict`) on every process that torchrun started: the process group is
    started first (NCCL with one GPU per process, `LOCAL_RANK`, where there are GPUs; gloo on CPUs) and ended
    after; the other processes log warnings only. In a single process `command` runs as it is."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        import torch
        import torch.distributed as dist

        if world_size() == 1 or _group() is not None:
            return command(*args, **kwargs)
        if torch.cuda.is_available():
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= gpus:
                raise UserError(f"torchrun started more processes on this machine than it has GPUs ({gpus}); use "
                                f"--nproc_per_node {gpus} or fewer, one GPU per process")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if not is_main():
            logging.getLogger("adalora_cli").setLevel(logging.WARNING)
        try:
            return command(*args, **kwargs)
        finally:
            dist.destroy_process_group()

    return run


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """`tensor` summed over every process (in place; unchanged in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_object(value):
    """The main process's `value` on every process (unchanged in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


# -- DeepSpeed ---------------------------------------------------------------------------------------
def _read_deepspeed_config(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        text, source = value, "trainer.deepspeed"
    else:
        path = Path(str(value))
        if not path.is_file():
            raise UserError(f"DeepSpeed config {path} does not exist; pass a JSON file or a mapping as trainer.deepspeed")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path)
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise UserError(f"DeepSpeed config {source} is not valid JSON ({exc}); fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {source} must be a JSON object")
    return config


def zero_stage(trainer_settings: dict[str, Any]) -> int | None:
    """The DeepSpeed ZeRO stage this run would use (None: no DeepSpeed), from `trainer.deepspeed` or
    `accelerate launch --use_deepspeed --zero_stage N` (which passes it through the environment)."""
    if trainer_settings.get("deepspeed"):
        stage = _read_deepspeed_config(trainer_settings["deepspeed"]).get("zero_optimization", {}).get("stage", 0)
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2)
    else:
        return None
    try:
        return int(stage)
    except (TypeError, ValueError):
        raise UserError(f"DeepSpeed zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}") from None


def check_deepspeed(trainer_settings: dict[str, Any], method) -> None:
    """Refuse, before any work, a ZeRO stage the method cannot train under; then require DeepSpeed itself.

    ZeRO-3 partitions the weights: the run directory (adapter, head) and every allocator read them whole, so
    it is refused for every method. ZeRO-1/2 keep the optimizer's own (partitioned) copy of the weights and
    ZeRO-2 also partitions the gradients: AdaLoRA's importance needs every gradient, and AdaLoRA's masking and
    PRILoRA's pruning edit the weights in place, which the optimizer's copy would undo at the next step.
    Such methods declare `max_zero_stage = 0`.
    """
    stage = zero_stage(trainer_settings)
    if stage is None:
        return
    if stage >= 3:
        fix = (f"use ZeRO stage {method.max_zero_stage} or lower, or plain DDP (torchrun) without DeepSpeed"
               if method.max_zero_stage > 0 else "drop trainer.deepspeed and use plain DDP (torchrun)")
        raise UserError(f"DeepSpeed ZeRO-3 partitions the weights, which {method.name} and the run directory need "
                        f"whole on every process; {fix}")
    if stage > method.max_zero_stage:
        raise UserError(f"DeepSpeed ZeRO-{stage} is not supported by {method.name}: its allocator reads every gradient "
                        "and edits the weights in place, which ZeRO's partitioned gradients and optimizer copy hide or "
                        "undo; drop trainer.deepspeed and use plain DDP (torchrun), which all-reduces full gradients")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("trainer.deepspeed is set but DeepSpeed is not installed; pip install deepspeed, "
                        "or drop trainer.deepspeed to train with plain DDP") from None
