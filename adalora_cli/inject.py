"""Find the linear layers to adapt (presets per architecture) and swap in a method's adapter layers.

A target is an `nn.Linear` or transformers' `Conv1D` (GPT-2's projections: a linear layer whose weight is
stored transposed, d_in x d_out). Presets name, per `config.model_type`, the transformer blocks (and for
encoder-decoder models their stack) and the matrices of each block: query, key, value, attention output (W*),
the decoder's cross-attention (C*), FFN in and out (Wf1, Wf2) and a gated FFN's gate (Wg). Blocks are numbered
in the order the input flows through them: an encoder's, then its decoder's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from adalora_cli.budget import Target
from adalora_cli.errors import UserError
from adalora_cli.heads import HEAD_MODULES
from adalora_cli.linear import is_linear, linear_dims
from adalora_cli.methods.base import AdapterLinear, Method, MethodConfig, RankPlan


@dataclass(frozen=True)
class Preset:
    """Where the blocks of an architecture are, and which matrices of a block to adapt."""

    blocks: str  # regex of a block's name prefix: group `index`, and `stack` (encoder/decoder) where there are two
    kinds: dict[str, str]  # matrix kind -> regex of the rest of the module name


_BERT_BLOCKS = r"(?:^|\.)layer\.(?P<index>\d+)\."
_BERT_LIKE = Preset(_BERT_BLOCKS, {
    "Wq": r"attention\.self\.query", "Wk": r"attention\.self\.key", "Wv": r"attention\.self\.value",
    "Wo": r"attention\.output\.dense", "Wf1": r"intermediate\.dense", "Wf2": r"output\.dense",
})
_BART_LIKE = Preset(r"(?:^|\.)(?P<stack>encoder|decoder)\.layers\.(?P<index>\d+)\.", {
    "Wq": r"self_attn\.q_proj", "Wk": r"self_attn\.k_proj", "Wv": r"self_attn\.v_proj", "Wo": r"self_attn\.out_proj",
    "Cq": r"encoder_attn\.q_proj", "Ck": r"encoder_attn\.k_proj", "Cv": r"encoder_attn\.v_proj",
    "Co": r"encoder_attn\.out_proj", "Wf1": r"fc1", "Wf2": r"fc2",
})
_LLAMA_LIKE = Preset(r"(?:^|\.)layers\.(?P<index>\d+)\.", {
    "Wq": r"self_attn\.q_proj", "Wk": r"self_attn\.k_proj", "Wv": r"self_attn\.v_proj", "Wo": r"self_attn\.o_proj",
    "Wg": r"mlp\.gate_proj", "Wf1": r"mlp\.up_proj", "Wf2": r"mlp\.down_proj",
})

PRESETS: dict[str, Preset] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "deberta-v2": Preset(_BERT_BLOCKS, {
        "Wq": r"attention\.self\.query_proj", "Wk": r"attention\.self\.key_proj",
        "Wv": r"attention\.self\.value_proj", "Wo": r"attention\.output\.dense", "Wf1": r"intermediate\.dense",
        "Wf2": r"output\.dense",
    }),
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "marian": _BART_LIKE,
    "t5": Preset(r"(?:^|\.)(?P<stack>encoder|decoder)\.block\.(?P<index>\d+)\.", {
        "Wq": r"layer\.0\.SelfAttention\.q", "Wk": r"layer\.0\.SelfAttention\.k",
        "Wv": r"layer\.0\.SelfAttention\.v", "Wo": r"layer\.0\.SelfAttention\.o",
        "Cq": r"layer\.1\.EncDecAttention\.q", "Ck": r"layer\.1\.EncDecAttention\.k",
        "Cv": r"layer\.1\.EncDecAttention\.v", "Co": r"layer\.1\.EncDecAttention\.o",
        "Wg": r"layer\.\d\.DenseReluDense\.wi_0", "Wf1": r"layer\.\d\.DenseReluDense\.wi(?:_1)?",
        "Wf2": r"layer\.\d\.DenseReluDense\.wo",
    }),
    "gpt2": Preset(r"(?:^|\.)h\.(?P<index>\d+)\.", {  # Conv1D projections; c_attn holds q, k and v together
        "Wqkv": r"attn\.c_attn", "Wo": r"attn\.c_proj", "Wf1": r"mlp\.c_fc", "Wf2": r"mlp\.c_proj",
    }),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}
# Column order of the rank-allocation report; kinds outside it follow in the order found.
MATRIX_KINDS = ("Wq", "Wk", "Wv", "Wqkv", "Wo", "Cq", "Ck", "Cv", "Co", "Wg", "Wf1", "Wf2")
ENCODER_KINDS = ("Wq", "Wk", "Wv", "Wo", "Wf1", "Wf2")  # the six matrices of an encoder block

_NEVER_TARGETS = HEAD_MODULES + ("pooler", "lm_head")


_GENERIC_BLOCKS = r"(?:^|\.)(?:layer|layers|h|block)\.(?P<index>\d+)\."  # architectures without a preset


def _block_of(preset: Preset | None, name: str) -> tuple[str, int] | None:
    match = re.search(preset.blocks if preset else _GENERIC_BLOCKS, name)
    if match is None:
        return None
    return match.groupdict().get("stack") or "", int(match.group("index"))


def find_targets(model: nn.Module, model_type: str, target_modules: list[str] | None = None) -> list[Target]:
    """Every linear layer of the model that the preset (or the user's patterns) selects, in module order.

    User patterns are regexes matched at the end of module names; a matched module still gets its preset
    matrix kind when the architecture has a preset, for the rank-allocation report. Blocks are numbered from 0
    through the encoder, then on through the decoder.
    """
    preset = PRESETS.get(model_type)
    if not target_modules and preset is None:
        raise UserError(
            f"no target preset for model type {model_type!r} (presets: {', '.join(sorted(PRESETS))}); "
            "name the layers with --set <method>.target_modules='[\"query\", \"value\"]'"
        )
    kinds = {k: re.compile(preset.blocks + p + "$") for k, p in preset.kinds.items()} if preset else {}
    chosen = [re.compile(pattern + "$") for pattern in target_modules or []]
    found = []
    for name, module in model.named_modules():
        if not is_linear(module) or any(part in _NEVER_TARGETS for part in name.split(".")):
            continue
        kind = next((k for k, pattern in kinds.items() if pattern.search(name)), None)
        if chosen:
            matched = next((p.pattern[:-1] for p in chosen if p.search(name)), None)
            if matched is None:
                continue
            kind = kind or matched
        elif kind is None:
            continue
        block = _block_of(preset, name)
        found.append((name, module, kind, block))
    if not found:
        raise UserError(
            f"no linear layer of this {model_type} model matches the target modules "
            f"{target_modules or list(preset.kinds)}; check <method>.target_modules"
        )
    encoder_blocks = 1 + max((b[1] for *_, b in found if b is not None and b[0] == "encoder"), default=-1)
    targets = []
    for name, module, kind, block in found:
        layer = 0 if block is None else block[1] + (encoder_blocks if block[0] == "decoder" else 0)
        targets.append(Target(name, *linear_dims(module), layer, kind))
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
        if not is_linear(base):
            raise TypeError(f"{name} is {type(base).__name__}, not a linear layer")
        scaling = scalings[name] if scalings else method.initial_scaling(rank, cfg)
        layer = method.make_layer(base, rank, scaling, cfg)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


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
