"""The run directory: what training writes and what eval and export read back (never the training code).

    config.yaml          the resolved RunConfig
    adapter_config.json  method, base model, and every adapted module's kept rank and scale
    adapter.safetensors  the adapter's kept tensors (full fine-tuning: model.safetensors, all weights)
    head.safetensors     the task head (classifier, and any layer the checkpoint lacked)
    tokenizer/           the tokenizer
    metrics.json  rank_pattern.json  rank_history.json  train_log.json  checkpoints/

Every file is written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from adalora_cli.errors import UserError
from adalora_cli.files import LOCK, load_tensors, read_json, save_tensors, write_json

CONFIG = "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER = "adapter.safetensors"
FULL_WEIGHTS = "model.safetensors"
HEAD = "head.safetensors"
TOKENIZER = "tokenizer"
METRICS = "metrics.json"
RANK_PATTERN = "rank_pattern.json"
RANK_HISTORY = "rank_history.json"
TRAIN_LOG = "train_log.json"
CHECKPOINTS = "checkpoints"
FORMAT = "adalora-cli"


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Fail, before any work, on a non-empty output folder unless --overwrite was given."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} is a file; choose another --output-dir")
    if path.is_dir() and any(p.name != LOCK for p in path.iterdir()) and not overwrite:
        hint = ", --resume to continue its checkpoints," if (path / CHECKPOINTS).is_dir() and not (path / METRICS).exists() else ""
        raise UserError(f"output directory {path} is not empty; pass --overwrite{hint} or choose another --output-dir")


def reset_output_dir(path: Path) -> None:
    """Empty the output folder for a new run, keeping the lock file that the writing process holds."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@dataclass
class SavedAdapter:
    """What `adapter_config.json` holds, as read back."""

    method: str
    base_model: str
    task: str
    modules: dict[str, dict[str, Any]]  # name -> rank, scaling, d_in, d_out, kind, layer
    method_config: dict[str, Any]
    head: list[str]

    def rank_pattern(self) -> dict[str, int]:
        return {name: info["rank"] for name, info in self.modules.items()}

    def require_any_rank(self, method, options: str) -> None:
        """Choosing a rank (`options`: what the user passed, with its verb: "--rank needs") at eval, predict or
        export time needs an adapter trained for any rank."""
        if not method.any_rank:
            raise UserError(f"{options} an adapter trained for any rank (dylora); this run used {self.method}")

    def r_max(self, rank: int | None = None) -> int:
        """The run's largest rank, after checking that a chosen `rank` lies in 1..r_max."""
        r_max = max(self.rank_pattern().values(), default=0)
        if rank is not None and not 1 <= rank <= r_max:
            raise UserError(f"rank {rank} is outside 1..{r_max} (the run's r_max); choose a rank in that range")
        return r_max


def is_run(path: Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / CONFIG).is_file()


def require_run(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass the --output-dir of a finished `adalora train`")
    if not is_run(path):
        raise UserError(
            f"{path} is not a run directory (no {ADAPTER_CONFIG} and {CONFIG}); pass the --output-dir of a "
            "finished `adalora train` or an exported native adapter"
        )
    return path


def read_adapter_config(path: Path) -> SavedAdapter:
    data = read_json(Path(path) / ADAPTER_CONFIG)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{Path(path) / ADAPTER_CONFIG} was not written by adalora-cli; pass a run directory")
    try:
        return SavedAdapter(data["method"], data["base_model"], data["task"], data["modules"],
                            data.get("method_config", {}), data.get("head", []))
    except KeyError as exc:
        raise UserError(f"{Path(path) / ADAPTER_CONFIG} lacks {exc}; the run folder is damaged, re-run training") from None


def write_adapter(path: Path, method, model, layers: dict, head_names: set[str], run_config, targets) -> dict[str, int]:
    """Save the adapter (kept tensors only), the head and adapter_config.json; return the rank pattern."""
    path = Path(path)
    by_name = {t.name: t for t in targets}
    modules, tensors = {}, {}
    for name, target in by_name.items():
        layer = layers.get(name)
        rank = layer.rank if layer is not None else 0
        modules[name] = {"rank": rank, "scaling": layer.scaling if layer is not None else 0.0,
                         "d_in": target.d_in, "d_out": target.d_out, "kind": target.kind, "layer": target.layer}
        if layer is not None:
            for key, tensor in layer.compact_state().items():
                tensors[f"{name}.{key}"] = tensor
    params = dict(model.named_parameters())
    if method.adapter:
        save_tensors(path / ADAPTER, tensors, metadata={"format": FORMAT, "method": method.name})
    else:
        save_tensors(path / FULL_WEIGHTS, _plain_state_dict(model), metadata={"format": FORMAT, "method": method.name})
    save_tensors(path / HEAD, {n: params[n] for n in sorted(head_names)}, metadata={"format": FORMAT})
    write_json(path / ADAPTER_CONFIG, {
        "format": FORMAT,
        "method": method.name,
        "base_model": run_config.model,
        "task": run_config.task,
        "modules": modules,
        "method_config": run_config.to_dict()[method.name],
        "head": sorted(head_names),
    })
    return {name: info["rank"] for name, info in modules.items()}


def _plain_state_dict(model) -> dict[str, Any]:
    """The model's weights, with tied tensors stored once (safetensors refuses shared storage)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def read_run_config(path: Path, data_dir: str | None = None):
    """The RunConfig a run was trained with (`data_dir` replaces the recorded data folder)."""
    from adalora_cli.config import from_dict, read_yaml

    cfg = from_dict(read_yaml(require_run(path) / CONFIG))
    if data_dir is not None:
        cfg.data_dir = data_dir
    return cfg


class LoadedRun(NamedTuple):
    """A trained run, rebuilt: its settings, adapter record, model, tokenizer, adapter layers by name, and the task
    as it applies to that model. Unpacks as (cfg, saved, model, tokenizer, layers, task)."""

    cfg: Any
    saved: SavedAdapter
    model: Any
    tokenizer: Any
    layers: dict
    task: Any


def load_run(path: Path, data_dir: str | None = None) -> LoadedRun:
    """Rebuild a trained model from a run (or native export) folder."""
    from adalora_cli import models
    from adalora_cli.inject import inject_adapters
    from adalora_cli.methods import get_method
    from adalora_cli.methods.base import RankPlan
    from adalora_cli.tasks import get_task

    path = Path(path)
    cfg = read_run_config(path, data_dir)
    saved = read_adapter_config(path)
    method, task = get_method(saved.method), get_task(saved.task).with_settings(cfg.task_config())
    method_cfg = cfg.method_config(method.name)
    weights_file = path / (ADAPTER if method.adapter else FULL_WEIGHTS)
    weights, head = load_tensors(weights_file), load_tensors(path / HEAD)  # fail on bad files before loading a model
    tokenizer_path = path / TOKENIZER
    task, hf_config, tokenizer = models.for_task(cfg.model, task, cfg.trust_remote_code,
                                                 str(tokenizer_path) if tokenizer_path.is_dir() else None)
    model, _ = models.load_model(cfg.model, hf_config, task.auto_model, cfg.trust_remote_code)
    layers = {}
    if method.adapter:
        plan = RankPlan(saved.rank_pattern(), cfg.budget)
        scalings = {name: info["scaling"] for name, info in saved.modules.items()}
        layers = inject_adapters(model, method, method_cfg, plan, scalings)
        for name, layer in layers.items():
            _load_layer(layer, name, weights, weights_file)
    else:
        _load_into(model, weights, weights_file)
    _load_into(model, head, path / HEAD)
    model.eval()
    return LoadedRun(cfg, saved, model, tokenizer, layers, task)


def _load_layer(layer, name: str, tensors: dict[str, Any], file: Path) -> None:
    import torch

    for key, current in layer.compact_state().items():
        stored = tensors.get(f"{name}.{key}")
        if stored is None or tuple(stored.shape) != tuple(current.shape):
            raise UserError(f"{file} does not match {ADAPTER_CONFIG} at {name}.{key}; the run folder is damaged, re-run training")
        with torch.no_grad():
            getattr(layer, key).copy_(stored)


def _load_into(model, tensors: dict[str, Any], file: Path) -> None:
    import torch

    params = dict(model.state_dict())
    for key, value in tensors.items():
        if key not in params or tuple(params[key].shape) != tuple(value.shape):
            raise UserError(f"{file} holds {key!r}, which this model lacks or shapes differently; the run folder is damaged")
        with torch.no_grad():
            params[key].copy_(value)
