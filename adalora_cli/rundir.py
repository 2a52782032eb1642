"""The run directory: what training writes and what eval, predict, export and inspect read back (never the training
code). `RunDir` owns every file name in it, reads each file at most once, and writes through `files` (the one
atomic writer: a crash never leaves a half-written file or folder).

    config.yaml          the resolved RunConfig
    adapter_config.json  method, base model, and every adapted module's kept rank and scale
    adapter.safetensors  the adapter's kept tensors (full fine-tuning: model.safetensors, all weights)
    head.safetensors     the task head (classifier, and any layer the checkpoint lacked)
    tokenizer/           the tokenizer
    metrics.json  rank_pattern.json  rank_history.json  train_log.json  checkpoints/  logs/ (the trackers')
    rank_allocation.png  learning_curve.png                            drawn at the end of training
    eval.json  eval-<file stem>.json  eval_ranks.json  eval_ranks.png  written by `adalora eval`
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from adalora_cli import files
from adalora_cli.errors import UserError

FORMAT = "adalora-cli"


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


class LoadedRun(NamedTuple):
    """A trained run, rebuilt: its settings, adapter record, model, tokenizer, adapter layers by name, and the task
    as it applies to that model. Unpacks as (cfg, saved, model, tokenizer, layers, task)."""

    cfg: Any
    saved: SavedAdapter
    model: Any
    tokenizer: Any
    layers: dict
    task: Any


class RunDir:
    """A run directory (or a native export): the names of its files, each file read once (`config`, `adapter`,
    `metrics`...: cached, dropped when this object writes the file again), and what training writes into it.

    `run / RunDir.METRICS` is a file's path; the object is a path-like, so `Path(run)` and `str(run)` are the folder.
    `data_dir` replaces the data folder the run's config records (`adalora eval --data-dir`).
    """

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
    RANK_PLOT = "rank_allocation.png"
    LEARNING_CURVE = "learning_curve.png"
    EVAL = "eval.json"
    EVAL_RANKS = "eval_ranks.json"
    EVAL_RANKS_PLOT = "eval_ranks.png"
    CHECKPOINTS = "checkpoints"
    LOGS = "logs"
    _CACHED = {CONFIG: "config", ADAPTER_CONFIG: "adapter", METRICS: "metrics", RANK_HISTORY: "rank_history",
               TRAIN_LOG: "train_log"}  # file -> the cached property that reads it

    def __init__(self, path: str | os.PathLike, data_dir: str | None = None):
        self.path = Path(path)
        self.data_dir = data_dir

    @classmethod
    def of(cls, run: "str | os.PathLike | RunDir") -> "RunDir":
        """`run` itself when it is a RunDir already (its files read once), else a RunDir of that folder."""
        return run if isinstance(run, RunDir) else cls(run)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    @property
    def logs(self) -> Path:
        """The trackers' folder (`--report-to`)."""
        return self.path / self.LOGS

    def eval_name(self, input_path: Path | None = None) -> str:
        """The file `adalora eval` writes its scores to: eval.json, or eval-<file stem>.json for `--input FILE`."""
        return self.EVAL if input_path is None else f"eval-{Path(input_path).stem}.json"

    # -- the folder before a run -----------------------------------------------------------------------------

    def prepare(self, overwrite: bool) -> None:
        """Fail, before any work, on a non-empty output folder unless --overwrite was given."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"output path {path} is a file; choose another --output-dir")
        if path.is_dir() and any(p.name != files.LOCK for p in path.iterdir()) and not overwrite:
            resumable = self.checkpoints.is_dir() and not (self / self.METRICS).exists()
            hint = ", --resume to continue its checkpoints," if resumable else ""
            raise UserError(f"output directory {path} is not empty; pass --overwrite{hint} or choose another --output-dir")

    def reset(self) -> None:
        """Empty the output folder for a new run, keeping the lock file that the writing process holds."""
        self.path.mkdir(parents=True, exist_ok=True)
        for child in self.path.iterdir():
            if child.name == files.LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self._forget()

    # -- reading ---------------------------------------------------------------------------------------------

    def is_run(self) -> bool:
        return (self / self.ADAPTER_CONFIG).is_file() and (self / self.CONFIG).is_file()

    def require(self) -> "RunDir":
        """This object, after checking that the folder holds a finished run (or a native export)."""
        if not self.path.is_dir():
            raise UserError(f"{self.path} does not exist; pass the --output-dir of a finished `adalora train`")
        if not self.is_run():
            raise UserError(
                f"{self.path} is not a run directory (no {self.ADAPTER_CONFIG} and {self.CONFIG}); pass the "
                "--output-dir of a finished `adalora train` or an exported native adapter"
            )
        return self

    @cached_property
    def config(self):
        """The RunConfig the run was trained with (`data_dir` replacing the recorded data folder)."""
        from adalora_cli.config import from_dict, read_yaml

        cfg = from_dict(read_yaml(self.require() / self.CONFIG))
        if self.data_dir is not None:
            cfg.data_dir = self.data_dir
        return cfg

    @cached_property
    def adapter(self) -> SavedAdapter:
        """adapter_config.json, checked."""
        path = self.require() / self.ADAPTER_CONFIG
        data = files.read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} was not written by adalora-cli; pass a run directory")
        try:
            return SavedAdapter(data["method"], data["base_model"], data["task"], data["modules"],
                                data.get("method_config", {}), data.get("head", []))
        except KeyError as exc:
            raise UserError(f"{path} lacks {exc}; the run folder is damaged, re-run training") from None

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """metrics.json; {} before training has finished (or in an export without it)."""
        return self._optional_json(self.METRICS, {})

    @cached_property
    def rank_history(self) -> list[dict[str, float]]:
        """rank_history.json (adaptive methods); [] when the method has none."""
        return self._optional_json(self.RANK_HISTORY, [])

    @cached_property
    def train_log(self) -> list[dict[str, Any]]:
        return files.read_json(self / self.TRAIN_LOG)

    def _optional_json(self, name: str, absent: Any) -> Any:
        path = self / name
        return files.read_json(path) if path.is_file() else absent

    def load(self) -> LoadedRun:
        """Rebuild the trained model from the run's files: the base model, the adapter, the head, the tokenizer."""
        from adalora_cli import models
        from adalora_cli.inject import inject_adapters
        from adalora_cli.methods import get_method
        from adalora_cli.methods.base import RankPlan
        from adalora_cli.tasks import get_task

        cfg, saved = self.config, self.adapter
        method, task = get_method(saved.method), get_task(saved.task).with_settings(cfg.task_config())
        method_cfg = cfg.method_config(method.name)
        weights_file, head_file = self / (self.ADAPTER if method.adapter else self.FULL_WEIGHTS), self / self.HEAD
        weights, head = files.load_tensors(weights_file), files.load_tensors(head_file)  # fail before loading a model
        tokenizer_path = self / self.TOKENIZER
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
        _load_into(model, head, head_file)
        model.eval()
        return LoadedRun(cfg, saved, model, tokenizer, layers, task)

    # -- writing (training) ----------------------------------------------------------------------------------

    def write_json(self, name: str, data: Any) -> Path:
        self._forget(name)
        files.write_json(self / name, data)
        return self / name

    def write_config(self, cfg) -> None:
        """config.yaml: the resolved settings (what a later --resume checks its own against)."""
        from adalora_cli.config import dump_yaml

        self._forget(self.CONFIG)
        dump_yaml(cfg.to_dict(), self / self.CONFIG)

    def save_tokenizer(self, tokenizer) -> None:
        """tokenizer/, built in a temporary folder and swapped in whole (a resumed run may have saved it before)."""
        with files.atomic_folder(self / self.TOKENIZER, replace=True) as tmp:
            tokenizer.save_pretrained(str(tmp))

    def write_adapter(self, method, model, layers: dict, head_names: set[str], run_config, targets) -> dict[str, int]:
        """Save the adapter (kept tensors only), the head and adapter_config.json; return the rank pattern."""
        modules, tensors = {}, {}
        for target in targets:
            layer = layers.get(target.name)
            modules[target.name] = {"rank": layer.rank if layer is not None else 0,
                                    "scaling": layer.scaling if layer is not None else 0.0,
                                    "d_in": target.d_in, "d_out": target.d_out, "kind": target.kind,
                                    "layer": target.layer}
            if layer is not None:
                for key, tensor in layer.compact_state().items():
                    tensors[f"{target.name}.{key}"] = tensor
        params = dict(model.named_parameters())
        metadata = {"format": FORMAT, "method": method.name}
        if method.adapter:
            files.save_tensors(self / self.ADAPTER, tensors, metadata=metadata)
        else:
            files.save_tensors(self / self.FULL_WEIGHTS, _plain_state_dict(model), metadata=metadata)
        files.save_tensors(self / self.HEAD, {n: params[n] for n in sorted(head_names)}, metadata={"format": FORMAT})
        self.write_json(self.ADAPTER_CONFIG, {
            "format": FORMAT,
            "method": method.name,
            "base_model": run_config.model,
            "task": run_config.task,
            "modules": modules,
            "method_config": run_config.to_dict()[method.name],
            "head": sorted(head_names),
        })
        return {name: info["rank"] for name, info in modules.items()}

    def _forget(self, name: str | None = None) -> None:
        """Drop what was read of file `name` (every file when None): it is being written anew."""
        for file, attribute in self._CACHED.items():
            if name is None or name == file:
                self.__dict__.pop(attribute, None)


# The file names as module names too (tests and scripts write `rundir.METRICS`).
CONFIG, ADAPTER_CONFIG, ADAPTER, FULL_WEIGHTS = RunDir.CONFIG, RunDir.ADAPTER_CONFIG, RunDir.ADAPTER, RunDir.FULL_WEIGHTS
HEAD, TOKENIZER, METRICS, RANK_PATTERN = RunDir.HEAD, RunDir.TOKENIZER, RunDir.METRICS, RunDir.RANK_PATTERN
RANK_HISTORY, TRAIN_LOG, CHECKPOINTS = RunDir.RANK_HISTORY, RunDir.TRAIN_LOG, RunDir.CHECKPOINTS


def load_run(path: str | os.PathLike, data_dir: str | None = None) -> LoadedRun:
    """Rebuild a trained model from a run (or native export) folder: `RunDir(path, data_dir).load()`."""
    return RunDir(path, data_dir).load()


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
