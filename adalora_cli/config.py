"""RunConfig: every setting of a run, from defaults, a YAML file, `--set key=value` and command-line options.

Precedence, lowest first: the defaults below, (with `--resume`) the run's saved config.yaml, `--config FILE`,
`--set key=value`, explicit options.
Keys are flat (`lr`, `epochs`, `budget`...) plus one section per method (`adalora.t_init`), one per task for its
settings (`squad.doc_stride`: `Task.settings_class`) and `trainer.<TrainingArguments field>` for anything else the
Hugging Face Trainer accepts. A flat key naming a setting of the run's task (`doc_stride: 64`, as the command line
and old config.yaml files give them) moves into the task's section; one of another task's settings is refused
unless it holds that setting's default (old files recorded every task's settings), and dropped from a run's own
saved config.yaml.
Unknown keys and values of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adalora_cli.budget import parse_budget
from adalora_cli.errors import UserError
from adalora_cli.files import atomic_write_text

DEFAULT_MODEL = "microsoft/deberta-v3-base"
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
DATA, EVAL = "Data", "Evaluation during training"  # help sections (`panel` in a field's metadata) besides "Options"
MAX_SAVE_STEPS = 500  # the longest default checkpoint interval, in optimizer steps


def default_save_steps(optimizer_steps: int) -> int:
    """The default checkpoint interval: a tenth of the run's optimizer steps (at least 1, at most 500), so that a
    crash loses at most a tenth of a short run."""
    return max(1, min(MAX_SAVE_STEPS, math.ceil(optimizer_steps / 10)))


@dataclass
class RunConfig:
    """Every setting of a run. A user-settable field's metadata (help, panel, shown) makes it a `train` option
    (adalora_cli/options.py); `internal` fields are filled by code."""

    task: str | None = field(default=None, metadata={
        "help": "Required (here or in --config): text-classification, text-regression, sst2, mnli, ..., squad, xsum, "
                "seq2seq, causal-lm, ... (`adalora tasks`)."})
    method: str = field(default="adalora", metadata={"help": "lora, adalora, prilora, dylora or full "
                                                             "(`adalora methods`)."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id, local folder, or minilm-l6 (embedded)."})
    budget: int | None = field(default=None, metadata={  # adapter parameters at the end of training, head excluded
        "help": "Adapter parameters at the end: 300000, 300k, 0.3M.", "shown": "none (each method's own default ranks)",
        "option_type": str})  # read as text, parsed by from_dict
    rank_plan: str | None = field(default=None, metadata={
        "help": "A rank plan (`adalora plan --out PLAN.json`, or a finished run folder): with --method lora, train "
                "each matrix at the plan's rank; the plan's budget is the run's unless --budget is given."})
    data_dir: str | None = field(default=None, metadata={"help": "Local data folder (GLUE TSVs, SQuAD JSON).",
                                                         "panel": DATA, "shown": "none: the hub"})
    train_file: str | None = field(default=None, metadata={"help": "Training file (.csv .tsv .json .jsonl; GLUE TSV, "
                                                           "SQuAD JSON).", "panel": DATA})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation file.", "panel": DATA})
    validation_split: float = field(default=0.1, metadata={
        "help": "Share of the training data held out for evaluation when no validation data is given.", "panel": DATA})
    output_dir: str | None = field(default=None, metadata={
        "help": "Required (here or in --config): the run directory to write."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides --epochs."})
    batch_size: int = field(default=32, metadata={"help": "Examples per device per micro-batch."})
    eval_batch_size: int = field(default=64, metadata={"help": "Examples per device per evaluation batch."})
    lr: float | None = field(default=None, metadata={"help": "Peak learning rate.", "shown": "the method's"})
    max_seq_length: int | None = field(default=None, metadata={"help": "Tokens per example.", "shown": "the task's"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Share of the optimizer steps over which the "
                                                                "learning rate rises to its peak."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradients are clipped to this norm."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_steps: int | None = field(default=None, metadata={  # None: default_save_steps, or every evaluation
        "help": "Checkpoint every N optimizer steps.",
        "shown": "a tenth of the run's steps, at most 500; with --keep-best every evaluation"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations."})
    precision: str = field(default="auto", metadata={  # resolved per machine: compute_precision
        "help": "auto (bf16 or fp16 autocast on a GPU, fp32 on a CPU), fp32, bf16 or fp16."})
    eval_every: str | None = field(default=None, metadata={
        "help": "Evaluate every N optimizer steps, or 'epoch'.", "panel": EVAL})
    keep_best: bool = field(default=False, metadata={
        "help": "Save the best evaluated adapter (at the final budget), not the last.", "panel": EVAL})
    metric: str | None = field(default=None, metadata={
        "help": "Metric for --keep-best / --early-stopping.", "shown": "the task's main metric", "panel": EVAL})
    early_stopping: int | None = field(default=None, metadata={
        "help": "Stop after N evaluations without improvement.", "panel": EVAL})
    report_to: str = field(default="none", metadata={
        "help": "tensorboard, wandb, mlflow or none (logs in OUTPUT_DIR/logs)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"internal": True})  # per section
    task_args: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"internal": True})  # per task
    trainer: dict[str, Any] = field(default_factory=dict)  # extra TrainingArguments: a section, `--set trainer.x=...`

    def method_config(self, name: str | None = None):
        """The typed, validated hyper-parameters of method `name` (default: this run's method)."""
        from adalora_cli.methods import get_method

        method = get_method(name or self.method)
        values = self.method_args.get(method.name, {})
        cfg = build_dataclass(method.config_cls, values, prefix=f"{method.name}.")
        cfg.validate()
        return cfg

    def compute_precision(self):
        """The run's precision resolved on this machine (`devices.Precision`): every command computes in it."""
        from adalora_cli.devices import resolve_precision

        return resolve_precision(self.precision, on_cpu=bool(self.trainer.get("use_cpu")))

    def task_config(self, name: str | None = None):
        """The typed, validated settings (`Task.settings_class`) of task `name` (default: this run's task)."""
        from adalora_cli.tasks import get_task

        task = get_task(name or self.task)
        settings = build_dataclass(task.settings_class, self.task_args.get(task.name, {}), prefix=f"{task.name}.")
        settings.validate()
        return settings

    def update_task_settings(self, values: dict[str, Any], only_unset: bool = False) -> None:
        """Set settings of the run's task (columns and classes read off the data, defaults the task resolved);
        with `only_unset`, only those not given yet (None)."""
        section = self.task_args.setdefault(self.task, {})
        for key, value in values.items():
            if not only_unset or section.get(key) is None:
                section[key] = value

    def validate(self) -> None:
        from adalora_cli.methods import available_methods, get_method
        from adalora_cli.tasks import get_task

        if not self.task:
            raise UserError("no task given; pass --task (e.g. --task sst2) or set `task:` in the config file")
        get_task(self.task)
        if self.rank_plan is not None and not get_method(self.method).takes_rank_plan:
            raise UserError(f"--rank-plan gives the ranks of plain LoRA training; use --method lora (not "
                            f"{self.method}), or drop --rank-plan")
        for section in self.task_args:
            self.task_config(section)
        for section in self.method_args:
            if section not in available_methods():
                raise UserError(f"unknown config section {section!r}; method sections: {', '.join(available_methods())}")
            self.method_config(section)
        positive = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
        for key in positive + ("max_steps", "max_seq_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"{key} must be at least 1, got {value}; give a positive whole number")
        if self.epochs <= 0 and self.max_steps is None:
            raise UserError(f"epochs must be positive, got {self.epochs}; give e.g. --epochs 3 or --max-steps")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}; give e.g. --lr 1e-3")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}; give a fraction such as 0.06")
        from adalora_cli.devices import PRECISIONS

        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if not 0 < self.validation_split < 1:
            raise UserError(f"validation_split must be a fraction in (0, 1), got {self.validation_split}; "
                            "give e.g. --validation-split 0.1")
        self._validate_evaluation()
        if self.report_to not in REPORT_TO:
            raise UserError(f"unknown --report-to {self.report_to!r}; choose one of: {', '.join(REPORT_TO)}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise UserError(f"data directory {self.data_dir} does not exist; pass the folder that holds the task's files")

    def optimizer_steps(self, train_rows: int, processes: int = 1) -> int:
        """The optimizer steps training takes, counted as the Trainer counts them: --max-steps, else the epochs over
        `train_rows` in batches of batch_size per process, gradient_accumulation_steps batches per step."""
        if self.max_steps:
            return self.max_steps
        batches = math.ceil(train_rows / (self.batch_size * processes))
        return math.ceil(self.epochs * max(1, math.ceil(batches / self.gradient_accumulation_steps)))

    def resolve_save_steps(self, train_rows: int, processes: int = 1) -> None:
        """Fill in the default checkpoint interval: with --keep-best every evaluation step (each evaluation is
        checkpointed), else default_save_steps of the run's length. A given save_steps stays."""
        if self.save_steps is None:
            steps = self.eval_steps()
            self.save_steps = steps if self.keep_best and isinstance(steps, int) else \
                default_save_steps(self.optimizer_steps(train_rows, processes))

    def eval_steps(self) -> int | str | None:
        """--eval-every as the Trainer wants it: a step count, "epoch", or None (no evaluation during training)."""
        if self.eval_every is None or self.eval_every == "epoch":
            return self.eval_every
        return int(self.eval_every)

    def _validate_evaluation(self) -> None:
        from adalora_cli.tasks import get_task

        if self.eval_every is not None:
            text = str(self.eval_every)
            if text != "epoch" and not (text.isdigit() and int(text) > 0):
                raise UserError(f"--eval-every must be a number of optimizer steps or 'epoch', got {text!r}")
            self.eval_every = text
        for flag, on in (("--keep-best", self.keep_best), ("--early-stopping", self.early_stopping is not None),
                         ("--metric", self.metric is not None)):
            if on and self.eval_every is None:
                raise UserError(f"{flag} follows the evaluations during training; add --eval-every N (optimizer "
                                "steps) or --eval-every epoch")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise UserError(f"--early-stopping must be at least 1 evaluation, got {self.early_stopping}")
        if self.metric is not None:
            names = get_task(self.task).metric_names
            if self.metric not in names:
                raise UserError(f"--metric {self.metric!r} is not a metric of {self.task}; choose one of: "
                                f"{', '.join(names)}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as written to a run's `config.yaml` (the run's method and task sections only; no
        task section for a task without settings)."""
        sections = ("method_args", "task_args", "trainer")
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in sections}
        data[self.method] = dataclasses.asdict(self.method_config())
        if self.task is not None:
            task_settings = dataclasses.asdict(self.task_config())
            if task_settings:
                data[self.task] = task_settings
        if self.trainer:
            data["trainer"] = dict(self.trainer)
        return data


def _field_types(cls) -> dict[str, Any]:
    """Settable fields and their types (fields marked internal are filled by code, never by the user)."""
    internal = {f.name for f in dataclasses.fields(cls) if f.metadata.get("internal")}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k not in internal}


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` converted to type `tp`, or a UserError naming the key and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key)
    bad = UserError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}; fix the value")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise bad
        return [coerce(v, args[0], key) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    return value


def build_dataclass(cls, values: dict[str, Any], prefix: str = ""):
    """An instance of dataclass `cls` from `values`, rejecting unknown keys and wrong types."""
    hints = _field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys: {', '.join(prefix + k for k in hints)}"
        )
    return cls(**{key: coerce(value, hints[key], prefix + key) for key, value in values.items()})


def _set_value(raw: dict[str, Any], key: str, value: Any) -> None:
    section, dot, sub = key.partition(".")
    if dot:
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"config key {section!r} is a section; set its keys as {section}.<key>=<value>")
        raw[section][sub] = value
    else:
        raw[key] = value


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as YAML (`3`, `1e-3`, `true`, `[query, value]`)."""
    raw: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item!r} is not key=value; write e.g. --set adalora.t_init=200")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _set_value(raw, key.strip(), value)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; check the --config path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML ({first}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}; "
                        "write one `key: value` per line")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def make_config(file: str | Path | None = None, sets: list[str] | None = None,
                options: dict[str, Any] | None = None, resume: bool = False) -> RunConfig:
    """The RunConfig from a YAML file, `--set` items and explicit options (None values are skipped); with `resume`,
    on top of the settings the run in the output directory they name was started with."""
    layers = [read_yaml(file) if file else {}, parse_set(sets or []),
              {k: v for k, v in (options or {}).items() if v is not None}]
    output_dir = next((layer["output_dir"] for layer in reversed(layers) if layer.get("output_dir") is not None), None)
    saved = resume and output_dir is not None
    if saved:
        from adalora_cli.checkpoints import saved_settings

        layers.insert(0, saved_settings(Path(str(output_dir))))
    task = next((layer["task"] for layer in reversed(layers) if layer.get("task") is not None), None)
    raw: dict[str, Any] = {}
    for i, layer in enumerate(layers):  # each layer's flat task settings into the task's section: a later layer wins
        raw = _merge(raw, _task_settings_in_section(layer, task, saved=saved and i == 0))
    return from_dict(raw)


def _task_settings_in_section(raw: dict[str, Any], task: Any, saved: bool = False) -> dict[str, Any]:
    """`raw` with every flat key that is a setting of `task` moved into the task's section (where the section names
    it too, the section wins). A flat key that is only another task's setting is refused, unless it holds that
    setting's default or None (an old config.yaml recorded every task's settings); in a run's `saved` config.yaml
    such a key is dropped whatever it holds (old runs recorded options that did not apply to them)."""
    from adalora_cli.tasks import get_task, tasks_with_setting

    fields = {f.name for f in dataclasses.fields(RunConfig)} | {"trainer"}
    loose = [key for key in raw if key not in fields and isinstance(key, str) and tasks_with_setting(key)]
    if not loose:
        return raw
    if task is not None:
        get_task(task)  # an unknown task: say so, not that its settings do not apply
    own = {f.name for f in dataclasses.fields(get_task(task).settings_class)} if task is not None else set()
    moved = {key: value for key, value in raw.items() if key not in loose}
    section = {key: raw[key] for key in loose if key in own}
    for key in loose:
        if key not in own and not saved and not _unset_elsewhere(key, raw[key]):
            if task is None:
                raise UserError(f"{key} is a setting of the tasks {', '.join(tasks_with_setting(key))}; give --task")
            raise UserError(f"--{key.replace('_', '-')} does not apply to {task} runs; it is a setting of "
                            f"{', '.join(tasks_with_setting(key))} (drop it, or choose one of those tasks)")
    if section:
        given = raw.get(task)
        moved[task] = {**section, **(given if isinstance(given, dict) else {})}
    return moved


def _unset_elsewhere(key: str, value: Any) -> bool:
    """Whether `value` is None or the default of `key` in every task family that has it."""
    from adalora_cli.tasks import get_task, tasks_with_setting

    if value is None:
        return True
    defaults = {f.default for name in tasks_with_setting(key)
                for f in dataclasses.fields(get_task(name).settings_class) if f.name == key}
    return all(value == default for default in defaults)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Split flat keys from sections (a method's, a task's, the Trainer's) and type-check everything. `raw` is a
    run's saved config.yaml or `make_config`'s merge: flat task settings of another task are dropped here
    (`make_config` has refused those the user gave)."""
    from adalora_cli.methods import available_methods
    from adalora_cli.tasks import available_tasks

    raw = _task_settings_in_section(raw, raw.get("task"), saved=True)
    flat, method_args, task_args, trainer = {}, {}, {}, {}
    for key, value in raw.items():
        if key in ("method_args", "task_args"):
            raise UserError(f"unknown config key {key!r}; give method and task settings as a section named after the "
                            "method or task")
        if key == "trainer":
            trainer = coerce(value, dict, "trainer")
        elif key in available_methods():
            method_args[key] = coerce(value if value is not None else {}, dict, key)
        elif key in available_tasks():
            task_args[key] = coerce(value if value is not None else {}, dict, key)
        else:
            flat[key] = value
    if "budget" in flat:
        flat["budget"] = parse_budget(flat["budget"])
    cfg = build_dataclass(RunConfig, flat)
    cfg.method_args, cfg.task_args, cfg.trainer = method_args, task_args, trainer
    return cfg


def dump_yaml(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
