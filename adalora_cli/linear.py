"""The linear layers adapters wrap: `nn.Linear` (weight d_out x d_in) and transformers' `Conv1D` (GPT-2's
projections, weight stored transposed: d_in x d_out), told apart in one place."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer with its weight stored transposed (d_in x d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """Add a d_out x d_in update to a linear layer's weight, in its own layout and dtype."""
    with torch.no_grad():
        delta = delta.to(device=module.weight.device, dtype=torch.float32)
        delta = delta.T if is_conv1d(module) else delta
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
