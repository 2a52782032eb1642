"""LoRA (Hu et al., 2021, arXiv:2106.09685): h = W0 x + (alpha / r) * B A x.

A is Kaiming-uniform and B zero, so the adapted model starts equal to the base model. Under a budget,
every target gets the same rank: the largest whose total cost (r * (d_in + d_out) summed) fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adalora_cli.budget import Target, largest_uniform_rank
from adalora_cli.errors import UserError
from adalora_cli.methods.registry import register_method
from adalora_cli.methods.base import AdapterLinear, LoraFactors, Method, MethodConfig, RankPlan


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8  # rank of every target when no --budget is given

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise UserError(f"lora.r must be at least 1, got {self.r}")


class LoraLinear(AdapterLinear):
    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, scaling, dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **self._factory()))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **self._factory()))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def to_lora(self) -> LoraFactors:
        return LoraFactors(self.lora_B.detach(), self.lora_A.detach(), self.scaling)

    def compact_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}


def plan_uniform(targets: list[Target], budget: int | None, cfg: LoraConfig) -> RankPlan:
    rank = cfg.r if budget is None else largest_uniform_rank(targets, budget)
    return RankPlan(ranks={t.name: rank for t in targets}, budget=budget, notes={"r": rank})


def make_layer(base: nn.Linear, rank: int, scaling: float, cfg: LoraConfig) -> LoraLinear:
    return LoraLinear(base, rank, scaling, cfg.dropout)


register_method(
    Method(
        name="lora",
        summary="LoRA: the same rank on every target, the largest that fits the budget",
        config_cls=LoraConfig,
        default_lr=1e-3,
        plan=plan_uniform,
        make_layer=make_layer,
        initial_scaling=lambda rank, cfg: cfg.alpha / rank,
        takes_rank_plan=True,  # `--rank-plan`: per-target ranks from `adalora plan`
    )
)
