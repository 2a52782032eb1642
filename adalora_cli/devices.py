"""Where a run computes and in what precision: `--precision`, TF32, and one GPU per process.

Master weights (the base model, adapters, optimizer state, allocator statistics) are always float32; mixed
precision is autocast around the forward pass (bf16, or fp16 with loss scaling), never half-precision
parameters. `auto` picks bf16 on GPUs that have it (Ampere and newer), fp16 on older GPUs, fp32 on CPUs.

A run's precision is resolved once per command into a `Precision` (autocast dtype and TF32), and every command
computes under it the same way: training, evaluation during and after training, `adalora eval` and `adalora
predict`. So `metrics.json` and `eval.json` come from the same arithmetic.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from adalora_cli.errors import UserError

logger = logging.getLogger("adalora_cli")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Trainer settings that --precision owns; giving them through trainer.* would fight it.
PRECISION_KEYS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval", "half_precision_backend")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` is fp32, bf16 or fp16 (never auto); `tf32` whether float32 matmuls run on
    TF32 tensor cores (GPUs of compute capability 8 and newer: the float32 parts of every mode)."""

    name: str
    tf32: bool = False

    def __str__(self) -> str:
        return self.name

    def autocast_dtype(self):
        """The autocast dtype of the forward pass, or None (fp32: no autocast)."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def trainer_settings(self, trainer: dict) -> dict:
        """TrainingArguments fields for this precision: the autocast flags. TF32 is not handed to the Trainer
        (it would switch it on for the rest of the process, and only in training): `applied` sets it."""
        clash = sorted(key for key in PRECISION_KEYS if key in trainer)
        if clash:
            raise UserError(f"trainer.{clash[0]} is set by --precision {{{', '.join(PRECISIONS)}}}; drop "
                            f"trainer.{clash[0]} and pass --precision instead")
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}

    @contextlib.contextmanager
    def applied(self):
        """The process-wide float32 matmul setting of this precision (TF32 or not), restored on exit."""
        import torch

        wanted = "high" if self.tf32 else "highest"  # "high": TF32 tensor cores for float32 matmuls
        try:
            before = torch.get_float32_matmul_precision()
        except RuntimeError:  # set through torch's per-backend API by other code: put back the default
            before = "highest"
        torch.set_float32_matmul_precision(wanted)
        try:
            yield self
        finally:
            torch.set_float32_matmul_precision(before)

    @contextlib.contextmanager
    def computing(self, device):
        """What a forward pass outside the Trainer runs under (evaluation, prediction): `applied` and the
        autocast of this precision on `device`, as training's forward."""
        import torch

        dtype = self.autocast_dtype()
        with self.applied(), (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                              else contextlib.nullcontext()):
            yield


def tf32_available() -> bool:
    """Whether this machine's GPU has TF32 tensor cores (compute capability 8.0 and newer: Ampere, Hopper...)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(requested: str, on_cpu: bool = False) -> Precision:
    """The precision a run uses on this machine: fp32, bf16 or fp16 (never auto), with TF32 where available.
    `on_cpu`: the run computes on the CPU although a GPU is there (`trainer.use_cpu`), so the GPU is not counted."""
    import torch

    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available() and not on_cpu
    name = requested
    if requested == "auto":
        name = "fp32" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif requested == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU (its loss scaling runs there); on this machine use "
                        "--precision bf16 or fp32")
    elif requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU ({torch.cuda.get_device_name()}) has no bfloat16; use --precision fp16 "
                        "(with loss scaling) or fp32")
    return Precision(name, not on_cpu and tf32_available())


def autocast(precision: Precision | str, device):
    """The context a forward pass outside the Trainer runs in: `Precision.computing` (TF32 setting and autocast,
    as in training). A plain name (fp32, bf16, fp16) means that precision without TF32 (benchmark scripts)."""
    if isinstance(precision, str):
        precision = Precision(precision)
    return precision.computing(device)


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
