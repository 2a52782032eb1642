"""`adalora export-adapter`: a trained run as our own files, as a PEFT LoRA adapter, or merged into the model.

    native  config.yaml, adapter_config.json, adapter.safetensors (full: model.safetensors), head.safetensors,
            tokenizer/: a folder `adalora eval` reads like a run
    peft    adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads on the
            base model; every method becomes plain LoRA factors through `AdapterLinear.to_lora()`
    merged  a plain Transformers model folder (W0 + scale * B @ A in every adapted Linear) with its tokenizer

The run is reloaded through `RunDir.load` only, never through the training code, so an export holds
exactly what `adalora eval` evaluates. Everything is written into a temporary folder beside `--out` and
renamed at the end (`files.atomic_folder`): a failure leaves nothing behind.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from adalora_cli import files
from adalora_cli.errors import UserError
from adalora_cli.heads import HEAD_MODULES
from adalora_cli.rundir import RunDir

FORMATS = ("native", "peft", "merged")

# PEFT's file names and key layout (peft 0.21, utils/save_and_load.py): adapter tensors are saved under the
# PeftModel's own module names, `base_model.model.<module>.lora_{A,B}.weight`, without the adapter name;
# modules_to_save keep their plain parameter names under the same prefix.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT's adapter_config.json has no place for the task's labels: they go beside it, for the base model's loader
# (`AutoModelFor*.from_pretrained(base, **labels)`), so that predictions name the classes.
PEFT_LABELS = "labels.json"

# Files of a run that a native export carries over unchanged (the last three serve `adalora inspect`).
NATIVE_FILES = (RunDir.CONFIG, RunDir.ADAPTER_CONFIG, RunDir.ADAPTER, RunDir.FULL_WEIGHTS, RunDir.HEAD,
                RunDir.RANK_PATTERN, RunDir.RANK_HISTORY, RunDir.METRICS)


def run_export(run: Path, fmt: str | None, out: Path | None, overwrite: bool = False, rank: int | None = None,
               base_model: str | None = None) -> Path:
    """Export the run at `run` in format `fmt` to the folder `out`; returns `out`.

    Args:
        rank: export an any-rank adapter (DyLoRA: `Method.any_rank`, layers with `set_rank`) truncated to
            this rank; None keeps the trained ranks.
        base_model: the base model a PEFT export names (`base_model_name_or_path`); None: `base_model_name`.
    """
    if fmt is None:
        raise UserError(f"no export format; pass --format {' | '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if out is None:
        raise UserError("no output folder; pass --out DIR")
    if base_model is not None and fmt != "peft":
        raise UserError(f"--base-model applies to --format peft (a {fmt} export does not name a base model); "
                        "drop --base-model")
    run, out = RunDir(run).require(), Path(out)
    _check_out(run.path, out, overwrite)
    saved = run.adapter
    from adalora_cli.methods import get_method

    method = get_method(saved.method)
    if not method.adapter and fmt == "peft":
        raise UserError(f"{run} is a full fine-tuning run: it has no adapter to export for PEFT; use --format merged")
    if rank is not None:
        _check_rank(saved, method, fmt, rank)

    cfg, saved, model, tokenizer, layers, task = run.load()
    factors = lora_factors(layers, rank) if method.adapter else {}
    with files.atomic_folder(out, replace=True) as tmp:  # an existing `out` is empty or --overwrite (_check_out)
        if fmt == "native":
            write_native(run, tmp, tokenizer)
        elif fmt == "peft":
            write_peft(tmp, saved, task, model, layers, factors, base_model or base_model_name(cfg.model))
        else:
            write_merged(tmp, model, layers, factors, tokenizer, task.generation_config(model, tokenizer))
    return out


# -- the adapter as plain LoRA factors ----------------------------------------------------------------

def lora_factors(layers: dict[str, Any], rank: int | None = None) -> dict[str, Any]:
    """Every adapter layer as `LoraFactors(B, A, scale)`, at its kept rank or truncated to `rank`.

    This is the one place an export asks a method for its update, so a new method is exported as soon as
    its layer implements `to_lora()`; an any-rank layer (DyLoRA) is first set to `rank` with `set_rank`.
    """
    factors = {}
    for name, layer in layers.items():
        if rank is not None:
            if not hasattr(layer, "set_rank"):
                raise UserError(f"{type(layer).__name__} adapters have one fixed rank; export without --rank")
            layer.set_rank(rank)
        factors[name] = layer.to_lora()
    return factors


def _check_rank(saved, method, fmt: str, rank: int) -> None:
    """A chosen rank needs an any-rank adapter, a rank it holds, and a format that can store a truncation."""
    saved.require_any_rank(method, "--rank needs")
    if fmt == "native":
        raise UserError("a native export keeps the run's whole adapter; use --rank with --format peft or merged")
    saved.r_max(rank)


# -- native ----------------------------------------------------------------------------------------------

def write_native(run: RunDir, folder: Path, tokenizer) -> None:
    """Our own files, copied byte for byte once `RunDir.load` has proven them readable and consistent."""
    for name in NATIVE_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, folder / name)
    if (run / run.TOKENIZER).is_dir():
        shutil.copytree(run / run.TOKENIZER, folder / run.TOKENIZER)
    else:
        tokenizer.save_pretrained(str(folder / run.TOKENIZER))


# -- PEFT ------------------------------------------------------------------------------------------------

def head_modules(head_params: list[str]) -> list[str]:
    """The modules PEFT must save whole (`modules_to_save`) so that it restores our trained head.

    A parameter under a task-head module (`classifier`, `qa_outputs`, ...) or a pooler names that module;
    any other head parameter (a layer the checkpoint lacked) names the module that owns it.
    """
    modules = []
    for param in head_params:
        parts = param.split(".")
        cut = next((i for i, part in enumerate(parts[:-1]) if part in HEAD_MODULES + ("pooler",)), len(parts) - 2)
        module = ".".join(parts[:cut + 1])
        if module not in modules:
            modules.append(module)
    return modules


def base_model_name(model: str) -> str:
    """What a PEFT export names as its base: the hub id where it is known (a hub model, the embedded MiniLM-L6, a
    folder of the hub cache), so that the adapter loads on any machine; else the local folder's absolute path."""
    from adalora_cli import models

    return models.hub_id(model) or models.resolve_model(model)


def peft_config(saved, task, factors: dict[str, Any], base_model: str, fan_in_fan_out: bool = False) -> dict[str, Any]:
    """PEFT's LoraConfig as JSON: every module's rank in `rank_pattern` and alpha = scale * rank in
    `alpha_pattern`, so that PEFT's scale alpha / r is ours whatever the method's own scale rule. GPT-2's Conv1D
    projections store their weight transposed, which PEFT is told with `fan_in_fan_out`."""
    ranks = {name: f.rank for name, f in factors.items()}
    alphas = {name: f.scale * f.rank for name, f in factors.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": task.peft_task_type,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": common,
        "lora_alpha": next(alphas[n] for n, r in ranks.items() if r == common),
        "lora_dropout": float(saved.method_config.get("dropout", 0.0)),
        "target_modules": sorted(factors),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "modules_to_save": head_modules(saved.head) or None,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def write_peft(folder: Path, saved, task, model, layers: dict[str, Any], factors: dict[str, Any],
               base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors, in the layout `PeftModel.save_pretrained` writes, and for
    a classifier (`Task.label_config`) labels.json. Modules pruned to rank 0 are left out: PEFT would otherwise build
    an empty layer for them."""
    from adalora_cli.linear import is_conv1d

    kept = {name: f for name, f in factors.items() if f.rank > 0}
    if not kept:
        raise UserError("every adapted module was pruned to rank 0, so there is no LoRA adapter; use --format merged")
    tensors = {}
    for name, f in kept.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.B
    params = dict(model.named_parameters())
    for name in saved.head:
        tensors[PEFT_PREFIX + name] = params[name]
    files.save_tensors(folder / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    fan_in_fan_out = any(is_conv1d(layers[name].base) for name in kept)
    files.write_json(folder / PEFT_CONFIG, peft_config(saved, task, kept, base_model, fan_in_fan_out))
    labels = task.label_config(model.config)
    if labels is not None:
        files.write_json(folder / PEFT_LABELS, labels)


# -- merged ----------------------------------------------------------------------------------------------

def merge_adapters(model, layers: dict[str, Any], factors: dict[str, Any]) -> None:
    """Fold scale * B @ A into each adapted linear layer and put the plain layer back in the adapter's place."""
    from adalora_cli.linear import add_to_weight

    for name, layer in layers.items():
        base = layer.base
        add_to_weight(base, factors[name].delta_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)


def write_merged(folder: Path, model, layers: dict[str, Any], factors: dict[str, Any], tokenizer,
                 decoding: dict[str, Any] | None = None) -> None:
    """A folder `AutoModelFor*.from_pretrained` and `AutoTokenizer.from_pretrained` load with no adapter
    library: the merged weights, the config (with the task's labels) and the tokenizer. A generator's
    generation_config.json holds `decoding`, the settings the run was evaluated with, not the base checkpoint's
    (whose min_length or beam settings would otherwise decide what `generate` writes)."""
    from transformers import GenerationConfig

    from adalora_cli.models import no_progress_bars

    if decoding is not None:
        model.generation_config = GenerationConfig(**decoding)
    merge_adapters(model, layers, factors)
    for p in model.parameters():
        p.requires_grad_(False)
    with no_progress_bars():
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))


# -- the output folder -----------------------------------------------------------------------------------

def _check_out(run: Path, out: Path, overwrite: bool) -> None:
    """Fail before any work on an output that exists (unless --overwrite) or that would swallow the run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder path")
    resolved_run, resolved_out = run.resolve(), out.resolve()
    if resolved_out == resolved_run or resolved_out in resolved_run.parents:
        raise UserError(f"--out {out} would replace the run folder {run} itself; choose a folder outside the run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty; pass --overwrite or choose another --out")

