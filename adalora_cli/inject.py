"""Find the linear layers to adapt (presets per architecture) and swap in a method's adapter layers."""

from __future__ import annotations

import re

from torch import nn

from adalora_cli.budget import Target
from adalora_cli.errors import UserError
from adalora_cli.methods.base import AdapterLinear, Method, MethodConfig, RankPlan

_BERT_LIKE = {
    "Wq": r"attention\.self\.query",
    "Wk": r"attention\.self\.key",
    "Wv": r"attention\.self\.value",
    "Wo": r"attention\.output\.dense",
    "Wf1": r"intermediate\.dense",
    "Wf2": r"output\.dense",
}

# Matrix types of one transformer block, by `config.model_type`: query, key, value, attention output,
# FFN in, FFN out. Each pattern must match the end of a module name right after `layer.<i>.`.
PRESETS: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "deberta-v2": {
        "Wq": r"attention\.self\.query_proj",
        "Wk": r"attention\.self\.key_proj",
        "Wv": r"attention\.self\.value_proj",
        "Wo": r"attention\.output\.dense",
        "Wf1": r"intermediate\.dense",
        "Wf2": r"output\.dense",
    },
}
MATRIX_KINDS = ("Wq", "Wk", "Wv", "Wo", "Wf1", "Wf2")
_LAYER_INDEX = re.compile(r"(?:^|\.)layer\.(\d+)\.")

# Modules that belong to the task head: they train with every method and are saved with the adapter.
# (A pooler trains too when the checkpoint lacks it, as DeBERTa's does: see models.load_model.)
HEAD_MODULES = ("classifier", "score", "qa_outputs")
_NEVER_TARGETS = HEAD_MODULES + ("pooler",)


def _preset_patterns(model_type: str) -> dict[str, re.Pattern]:
    preset = PRESETS.get(model_type, {})
    return {kind: re.compile(r"(?:^|\.)layer\.\d+\." + pattern + "$") for kind, pattern in preset.items()}


def find_targets(model: nn.Module, model_type: str, target_modules: list[str] | None = None) -> list[Target]:
    """Every `nn.Linear` of the model that the preset (or the user's patterns) selects, in module order.

    User patterns are regexes matched at the end of module names; a matched module still gets its preset
    matrix kind (Wq, ..., Wf2) when the architecture has a preset, for the rank-allocation report.
    """
    preset = _preset_patterns(model_type)
    if not target_modules and not preset:
        raise UserError(
            f"no target preset for model type {model_type!r} (presets: {', '.join(sorted(PRESETS))}); "
            "name the layers with --set <method>.target_modules='[\"query\", \"value\"]'"
        )
    chosen = [re.compile(pattern + "$") for pattern in target_modules or []]
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(part in _NEVER_TARGETS for part in name.split(".")):
            continue
        kind = next((k for k, pattern in preset.items() if pattern.search(name)), None)
        if chosen:
            matched = next((p.pattern[:-1] for p in chosen if p.search(name)), None)
            if matched is None:
                continue
            kind = kind or matched
        elif kind is None:
            continue
        layer = _LAYER_INDEX.search(name)
        targets.append(Target(name, module.in_features, module.out_features, int(layer.group(1)) if layer else 0, kind))
    if not targets:
        raise UserError(
            f"no linear layer of this {model_type} model matches the target modules "
            f"{target_modules or list(preset)}; check <method>.target_modules"
        )
    return targets


def inject_adapters(model: nn.Module, method: Method, cfg: MethodConfig, plan: RankPlan,
                    scalings: dict[str, float] | None = None) -> dict[str, AdapterLinear]:
    """Replace each planned `nn.Linear` by the method's adapter layer, in place.

    Args:
        scalings: per-module scale to use instead of the method's initial one (when reloading a
            trained adapter whose rank was pruned but whose scale was kept).
    Returns:
        The adapter layers by module name. Targets planned at rank 0 stay plain linear layers.
    """
    layers = {}
    for name, rank in plan.ranks.items():
        if rank == 0:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
        scaling = scalings[name] if scalings else method.initial_scaling(rank, cfg)
        layer = method.make_layer(base, rank, scaling, cfg)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def is_head_parameter(name: str) -> bool:
    return any(part in HEAD_MODULES for part in name.split("."))


def mark_trainable(model: nn.Module, method: Method, head_names: set[str]) -> tuple[int, int]:
    """Freeze everything but the adapter and the task head (full fine-tuning: train everything).

    Returns (trainable, total) parameter counts.
    """
    for name, p in model.named_parameters():
        if not method.adapter:
            p.requires_grad_(True)
        else:
            p.requires_grad_(name in head_names or ".lora_" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
