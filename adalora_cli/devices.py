"""Where a run computes and in what precision: `--precision`, TF32, and one GPU per process.

Master weights (the base model, adapters, optimizer state, allocator statistics) are always float32; mixed
precision is autocast around the forward pass (bf16, or fp16 with loss scaling), never half-precision
parameters. `auto` picks bf16 on GPUs that have it (Ampere and newer), fp16 on older GPUs, fp32 on CPUs.
"""

from __future__ import annotations

import contextlib
import logging

from adalora_cli.errors import UserError

logger = logging.getLogger("adalora_cli")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Trainer settings that --precision owns; giving them through trainer.* would fight it.
PRECISION_KEYS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval", "half_precision_backend")


def resolve_precision(requested: str) -> str:
    """The precision a run uses on this machine: fp32, bf16 or fp16 (never auto)."""
    import torch

    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU (its loss scaling runs there); on this machine use "
                        "--precision bf16 or fp32")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU ({torch.cuda.get_device_name()}) has no bfloat16; use --precision fp16 "
                        "(with loss scaling) or fp32")
    return requested


def trainer_settings(precision: str, trainer: dict) -> dict:
    """TrainingArguments fields for `precision` (resolved): autocast dtype, and TF32 matmuls on Ampere+."""
    import torch

    clash = sorted(key for key in PRECISION_KEYS if key in trainer)
    if clash:
        raise UserError(f"trainer.{clash[0]} is set by --precision {{{', '.join(PRECISIONS)}}}; drop "
                        f"trainer.{clash[0]} and pass --precision instead")
    settings = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        settings["tf32"] = True  # float32 matmuls on tensor cores: the fp32 parts of a mixed-precision step
    return settings


def autocast(precision: str, device):
    """The autocast context of `precision` on `device` (evaluation runs under the same one as training)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def keep_one_gpu(args) -> None:
    """A process that sees several GPUs without torchrun trains on the first one only.

    The Trainer would wrap the model in `nn.DataParallel`, which replicates it on every GPU at each forward:
    the logged loss becomes a vector (our log fails on it) and forward hooks (PRILoRA's input statistics) run
    on the replicas. Several GPUs are used through DDP, one process per GPU.
    """
    if args.n_gpu > 1:
        logger.warning("this process sees %d GPUs but was not started by torchrun: training on one GPU; to use "
                       "all of them run `torchrun --nproc_per_node %d -m adalora_cli train ...` with the same "
                       "options", args.n_gpu, args.n_gpu)
        args._n_gpu = 1
