"""The `adalora` command line with test-only hooks, switched on by environment variables (tests only).

    python tests/hooked_cli.py train ...              (or under torchrun)

    ADALORA_TEST_KILL_AFTER_SAVE=N   SIGKILL this process right after checkpoint-N is complete
    ADALORA_TEST_NAN_AT_STEP=N       poison the classifier with NaN just before optimizer step N (1-based)
    ADALORA_TEST_TRACE=DIR           write DIR/rank<R>.json at exit: a fingerprint of the adapter and the
                                     allocator after every optimizer step, the final rank of every adapter
                                     layer, and every run-directory file this process wrote
    ADALORA_TEST_SIGNAL_AT_STEP=N:SIG[:COUNT]
                                     send this process signal SIG (TERM or INT) COUNT times (default 1) right
                                     after optimizer step N (1-based)
    ADALORA_TEST_PAUSE_AT_STEP=N     after optimizer step N, create $ADALORA_TEST_GATE.paused and wait until
                                     the file $ADALORA_TEST_GATE is removed
    ADALORA_TEST_CPU_LOSS_SCALING=1  fp16 loss scaling as on a GPU (a real torch GradScaler, unscaling, skipped
                                     steps), with float32 arithmetic on the CPU
    ADALORA_TEST_INF_GRAD_AT=A[-B]   an infinite gradient on the first adapter parameter in optimizer steps A..B

The hooks wrap the package from outside (a callback added to every AdapterTrainer, wrappers around the
run-directory writers), so the package itself carries no test code.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def _fingerprint(tensors) -> str:
    """A digest of the exact bytes of `tensors`: equal digests mean bit-identical tensors."""
    import torch

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def install() -> None:
    import torch
    from transformers import TrainerCallback

    from adalora_cli import checkpoints, files, rundir, training

    kill_after = int(os.environ.get("ADALORA_TEST_KILL_AFTER_SAVE", "0"))
    nan_at = int(os.environ.get("ADALORA_TEST_NAN_AT_STEP", "0"))
    trace_dir = os.environ.get("ADALORA_TEST_TRACE")
    signal_at = os.environ.get("ADALORA_TEST_SIGNAL_AT_STEP", "")
    pause_at = int(os.environ.get("ADALORA_TEST_PAUSE_AT_STEP", "0"))
    gate = Path(os.environ.get("ADALORA_TEST_GATE", "gate"))
    inf_steps = _step_range(os.environ.get("ADALORA_TEST_INF_GRAD_AT", ""))
    rank = int(os.environ.get("RANK", "0"))
    trace = {"rank": rank, "steps": [], "rank_pattern": {}, "writes": []}

    class Hooks(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def _adapter_tensors(self):
            model = self.trainer.model
            return [t for n, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items())
                    if ".lora_" in n or n.endswith((".kept", ".input_norm"))]

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == nan_at:
                with torch.no_grad():
                    for name, p in self.trainer.model.named_parameters():
                        if "classifier" in name:
                            p.fill_(float("nan"))
            if state.global_step + 1 in inf_steps:
                param = next(p for n, p in self.trainer.model.named_parameters() if ".lora_" in n)
                self.inf_hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))

        def on_step_end(self, args, state, control, **kwargs):
            if getattr(self, "inf_hook", None) is not None:
                self.inf_hook.remove()
                self.inf_hook = None
            if signal_at:
                step, name, *count = signal_at.split(":")
                if state.global_step == int(step):
                    for _ in range(int(count[0]) if count else 1):
                        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
            if state.global_step == pause_at:
                gate.with_suffix(".paused").write_text(str(os.getpid()))
                while gate.exists():
                    time.sleep(0.05)

        def on_optimizer_step(self, args, state, control, **kwargs):  # after the allocator's own step
            if not trace_dir:
                return
            allocation = self.trainer.allocation
            held = {}
            if allocation is not None:
                checkpoints._split(allocation.allocator.state_dict(), "", held)
            state_tensors = [held[k] for k in sorted(held)]
            trace["steps"].append({"step": state.global_step, "adapter": _fingerprint(self._adapter_tensors()),
                                   "allocator": _fingerprint(state_tensors)})

        def on_train_end(self, args, state, control, **kwargs):
            model = self.trainer.model
            trace["rank_pattern"] = {n: m.rank for n, m in model.named_modules() if hasattr(m, "compact_state")}

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    original_init = training.AdapterTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Hooks(self))  # after the AllocationCallback: its on_save and on_optimizer_step run first

    training.AdapterTrainer.__init__ = init
    if os.environ.get("ADALORA_TEST_CPU_LOSS_SCALING"):
        _emulate_loss_scaling(training.AdapterTrainer)

    def recorded(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            path = next(a for a in args if isinstance(a, (str, os.PathLike)))
            trace["writes"].append(str(Path(path).resolve()))
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    for module, name in ((files, "atomic_path"), (files, "atomic_folder"), (rundir.RunDir, "reset")):
        recorded(module, name)

    if trace_dir:
        def dump():
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            (Path(trace_dir) / f"rank{rank}.json").write_text(json.dumps(trace, indent=1))

        atexit.register(dump)


def _step_range(text: str) -> set[int]:
    if not text:
        return set()
    first, _, last = text.partition("-")
    return set(range(int(first), int(last or first) + 1))


def _emulate_loss_scaling(trainer_class) -> None:
    """Give the Trainer's accelerator what `fp16=True` gives it on a GPU: a GradScaler (here torch's CPU one)
    and the state under which it scales the loss, unscales before clipping and skips steps with inf/NaN
    gradients. The arithmetic stays float32 (no fp16 autocast), which changes nothing in that logic."""
    import torch

    original = trainer_class.create_accelerator_and_postprocess

    def create(self):
        original(self)
        accelerator = self.accelerator
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        accelerator.state._mixed_precision = "fp16"
        accelerator.native_amp = True  # unscale before clipping, as on a GPU
        prepare_model = accelerator.prepare_model

        def prepare_without_autocast(*args, **kwargs):  # ... but no fp16 autocast around the CPU forward
            accelerator.native_amp = False
            try:
                return prepare_model(*args, **kwargs)
            finally:
                accelerator.native_amp = True

        accelerator.prepare_model = prepare_without_autocast

    trainer_class.create_accelerator_and_postprocess = create


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install()
    from adalora_cli.cli import app

    app(prog_name="adalora")
