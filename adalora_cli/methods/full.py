"""Full fine-tuning: every weight of the model trains; the reference point for quality and cost."""

from __future__ import annotations

from dataclasses import dataclass

from adalora_cli.methods.registry import register_method
from adalora_cli.methods.base import Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning has no adapter; the shared adapter keys are accepted and ignored."""


register_method(
    Method(
        name="full",
        summary="full fine-tuning: all weights train (no adapter, no budget)",
        config_cls=FullConfig,
        default_lr=5e-5,
        adapter=False,
    )
)
