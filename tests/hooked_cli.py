"""The `adalora` command line with test-only hooks, switched on by environment variables (tests only).

    python tests/hooked_cli.py train ...              (or under torchrun)

    ADALORA_TEST_KILL_AFTER_SAVE=N   SIGKILL this process right after checkpoint-N is complete
    ADALORA_TEST_NAN_AT_STEP=N       poison the classifier with NaN just before optimizer step N (1-based)
    ADALORA_TEST_TRACE=DIR           write DIR/rank<R>.json at exit: a fingerprint of the adapter and the
                                     allocator after every optimizer step, the final rank of every adapter
                                     layer, and every run-directory file this process wrote

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

    from adalora_cli import checkpoints, files, pipeline, rundir, training

    kill_after = int(os.environ.get("ADALORA_TEST_KILL_AFTER_SAVE", "0"))
    nan_at = int(os.environ.get("ADALORA_TEST_NAN_AT_STEP", "0"))
    trace_dir = os.environ.get("ADALORA_TEST_TRACE")
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

    def recorded(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            path = next(a for a in args if isinstance(a, (str, Path)))
            trace["writes"].append(str(Path(path).resolve()))
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    for module, name in ((files, "atomic_path"), (rundir, "reset_output_dir"), (pipeline, "_save_tokenizer")):
        recorded(module, name)

    if trace_dir:
        def dump():
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            (Path(trace_dir) / f"rank{rank}.json").write_text(json.dumps(trace, indent=1))

        atexit.register(dump)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install()
    from adalora_cli.cli import app

    app(prog_name="adalora")
