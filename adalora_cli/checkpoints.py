"""What our pipeline adds to the Trainer's checkpoints, and how `--resume` picks one.

The Trainer's checkpoint (`OUT/checkpoints/checkpoint-N/`) already restores the model with its buffers
(AdaLoRA's kept masks, PRILoRA's input-norm EMA), the optimizer, the scheduler, the RNG states and the
position in the data. The allocator's own state (importance EMAs, budget, schedule position, DyLoRA's
rank generator...) is added beside it by `training.AllocationCallback`:

    allocator.safetensors   every tensor of `Allocator.state_dict()`
    allocator.json          everything else, with {"__tensor__": key} where a tensor was; written last,
                            so its presence marks a complete checkpoint

Nothing here unpickles: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from adalora_cli import files
from adalora_cli.rundir import FORMAT, RunDir
from adalora_cli.errors import UserError

logger = logging.getLogger("adalora_cli")

ALLOCATOR_TENSORS = "allocator.safetensors"
ALLOCATOR_STATE = "allocator.json"
TRAINER_STATE = "trainer_state.json"  # written by the Trainer after the model, optimizer and RNG files
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Settings that may differ between a run and its resumption without changing what is trained: where files
# are, how often the log and checkpoints are written, evaluation only, and recomputation of activations.
MAY_DIFFER_ON_RESUME = frozenset({
    "output_dir", "data_dir", "train_file", "validation_file", "eval_batch_size", "max_eval_samples",
    "logging_steps", "save_steps", "gradient_checkpointing", "report_to",
})


# -- allocator state ---------------------------------------------------------------------------------
def _split(value: Any, key: str, tensors: dict[str, Any]) -> Any:
    """`value` with every tensor moved into `tensors` (under a dotted key) and replaced by a reference."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"allocator state keys must be strings at {key!r}")
        return {k: _split(v, f"{key}.{k}" if key else k, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"allocator state holds a {type(value).__name__} at {key!r}; use tensors, numbers, lists, dicts")


def _join(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_allocator_state(folder: Path, state: dict[str, Any], world_size: int = 1) -> None:
    """Write an allocator's `state_dict()` into a checkpoint folder (tensors first, the JSON marker last)."""
    folder = Path(folder)
    tensors: dict[str, Any] = {}
    skeleton = _split(state, "", tensors)
    files.save_tensors(folder / ALLOCATOR_TENSORS, tensors, metadata={"format": FORMAT})
    files.write_json(folder / ALLOCATOR_STATE, {"format": FORMAT, "world_size": world_size, "state": skeleton})


def load_allocator_state(folder: Path) -> tuple[dict[str, Any], int]:
    """The allocator state saved in a checkpoint folder, and the number of processes that wrote it."""
    folder = Path(folder)
    data = files.read_json(folder / ALLOCATOR_STATE)
    if not isinstance(data, dict) or data.get("format") != FORMAT or "state" not in data:
        raise UserError(f"{folder / ALLOCATOR_STATE} was not written by adalora-cli; the checkpoint is damaged, "
                        "remove that checkpoint folder and resume again")
    tensors = files.load_tensors(folder / ALLOCATOR_TENSORS)
    return _join(data["state"], tensors), int(data.get("world_size", 1))


# -- choosing the checkpoint to resume ---------------------------------------------------------------
def checkpoint_folders(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder, oldest first."""
    if not Path(checkpoints).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(checkpoints).iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def is_complete(folder: Path, needs_allocator: bool) -> bool:
    """Whether the Trainer finished writing the folder, and our allocator state when the method has one."""
    return (folder / TRAINER_STATE).is_file() and (not needs_allocator or (folder / ALLOCATOR_STATE).is_file())


def last_complete_checkpoint(out: Path, needs_allocator: bool) -> Path | None:
    complete = [folder for _, folder in checkpoint_folders(RunDir.of(out).checkpoints)
                if is_complete(folder, needs_allocator)]
    return complete[-1] if complete else None


def saved_settings(out: Path) -> dict[str, Any]:
    """The raw settings a run was started with (OUT/config.yaml), for `--resume` to build on."""
    from adalora_cli.config import read_yaml

    out = RunDir.of(out)
    if not out.path.is_dir():
        raise UserError(f"--resume: output directory {out} does not exist; start the run without --resume")
    if not (out / out.CONFIG).is_file():
        raise UserError(f"--resume: {out} holds no {out.CONFIG}, so it is not a run started by `adalora train`; "
                        "check --output-dir")
    return read_yaml(out / out.CONFIG)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def setting_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every resolved setting that changes what is trained."""
    old, new = _flat(saved), _flat(now)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in MAY_DIFFER_ON_RESUME and old.get(key) != new.get(key)]


def _shown(value: Any) -> str:
    return "the default" if value is None else repr(value)


def resume_point(cfg, needs_allocator: bool) -> Path:
    """The checkpoint a `--resume` of `cfg` continues from, after checking that the run can be resumed exactly.

    Raises UserError when the folder is not a started run, already finished, holds no complete checkpoint,
    or was started with settings that differ in a way that changes training.
    """
    from adalora_cli.config import from_dict

    out = RunDir(cfg.output_dir)
    saved = from_dict(saved_settings(out))
    if (out / out.METRICS).is_file():
        raise UserError(f"--resume: the run in {out} already finished ({out.METRICS} is there); "
                        "start a new run with --overwrite or another --output-dir")
    differences = setting_differences(saved.to_dict(), cfg.to_dict())
    if differences:
        key, old, new = differences[0]
        raise UserError(f"--resume: setting {key!r} is {_shown(new)} but the run in {out} was started with "
                        f"{_shown(old)}; resume with the run's settings (drop the option) or start a new run")
    checkpoint = last_complete_checkpoint(out, needs_allocator)
    if checkpoint is None:
        every = f"save_steps={cfg.save_steps} optimizer steps" if cfg.save_steps is not None else \
            "tenth of the run's optimizer steps"
        raise UserError(f"--resume: no complete checkpoint in {out.checkpoints} (one is written every "
                        f"{every}); start the run again with --overwrite")
    return checkpoint


def drop_later_checkpoints(checkpoint: Path) -> None:
    """Remove checkpoint folders after `checkpoint` (a save cut short by the crash): the resumed run rewrites them."""
    step = int(_CHECKPOINT.match(checkpoint.name).group(1))
    for later, folder in checkpoint_folders(checkpoint.parent):
        if later > step:
            logger.warning("removing %s, written only in part before the run stopped", folder)
            shutil.rmtree(folder)
